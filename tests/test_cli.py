"""`atlas-vla`: the commands that build a training configuration take train.py's overrides as train.py does,
and every path a command is given means the folder it was started in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import synthetic_dataset

from atlas_vla.cli import main, parse_args
from atlas_vla.training.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
OVERRIDES = ["--data.source", "[a, b]", "--learning_rate", "1e-4", "--training.cached_copies=2", "--wandb"]
COMMANDS = [  # every command that builds a training configuration, with its own arguments
    ["cache-features", "--config", DEMO, "--output", "store"],
    ["compute-stats", "--config", DEMO, "--output", "stats.json"],
    ["eval-offline", "--policy", "run/final", "--config", DEMO],
    ["eval-libero", "--policy", "run/final", "--config", DEMO, "--tasks", "0"],
    ["eval-watch", "run", "--once"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command[0])
def test_train_overrides_are_taken_as_train_py_takes_them_with_or_without_a_separator(command, tmp_path, capsys,
                                                                                       monkeypatch):
    (tmp_path / "run" / "final").mkdir(parents=True)  # a policy folder here, not a Hub id
    monkeypatch.chdir(tmp_path)
    plain, separated = parse_args([*command, *OVERRIDES]), parse_args([*command, "--", *OVERRIDES])
    assert plain._train_overrides == separated._train_overrides == OVERRIDES
    assert vars(plain) == vars(separated)
    # the command's own paths mean the folder it was started in
    for name in ("output", "output_dir", "policy"):
        if getattr(plain, name, None) is not None:
            assert Path(getattr(plain, name)).is_absolute() and str(tmp_path) in getattr(plain, name)
    # a flag train.py refuses is refused the same way, with the same did-you-mean
    assert train_main(["--config", DEMO, "--learning_rat", "1"]) == 2
    expected = capsys.readouterr().err.strip().removeprefix("train.py: error: ")
    assert main([*command, "--learning_rat", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"atlas-vla {command[0]}: error: {expected}"
    assert expected == "unknown option --learning_rat (did you mean '--learning_rate'?)"


def test_a_near_miss_of_a_command_flag_names_that_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["compute-stats", "data", "--outptu", "s.json"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --outptu (did you mean --output?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a command without a training configuration takes no train.py flag
        parse_args(["serve", "--policy", "p", "--learning_rate", "1"])


def test_compute_stats_reads_relative_sources_and_overrides_like_train_py(tmp_path, monkeypatch, capsys):
    data = synthetic_dataset(tmp_path, num_episodes=8).name
    monkeypatch.chdir(tmp_path)
    assert main(["compute-stats", "--output", "a.json", "--data.source", data, "--data.val_fraction", "0.25"]) == 0
    assert main(["compute-stats", data, "--output", "b.json", "--", "--data.val_fraction", "0.25"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(f"wrote {tmp_path / 'a.json'}: ")
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
    assert main(["compute-stats", "synthetic-9", "--output", "c.json"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"atlas-vla compute-stats: error: data source {tmp_path / 'synthetic-9'} does not exist: no such file or "
        f"folder, and not a Hub dataset id of the form 'org/name' (did you mean {tmp_path / data}?)")
    assert not (tmp_path / "c.json").exists()
