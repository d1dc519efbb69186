"""The README's commands: every shell block names files, flags and subcommands that exist (`bash`
blocks run offline; `sh` blocks need the network or a GPU, so they are checked without running);
`python` blocks import what exists."""

from __future__ import annotations

import configparser
import itertools
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from atlas_vla.cli import build_parser
from atlas_vla.config import parse_overrides

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PRODUCED = ("outputs/", "data/", "logs/", "stats.json")  # written by the commands before them (demo, generator)


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[list[str]]:
    found = []
    for block in blocks("bash") + blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                for part in line.split("&&"):
                    words = shlex.split(part)
                    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                        words = words[1:]  # environment assignments
                    if words:
                        found.append(words)
    return found


def check_path(path: str) -> None:
    if not path.startswith(PRODUCED):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"


def check_train_args(args: list[str]) -> None:
    config, _ = parse_overrides(args)  # unknown flags or keys raise
    if config:
        check_path(config)


def check(words: list[str]) -> None:
    if words[:2] == ["pip", "install"]:
        extras = configparser.ConfigParser()
        extras.read(REPO / "setup.cfg")
        known = set(extras["options.extras_require"])
        for flag, value in itertools.pairwise(words):
            if flag == "-c":  # a constraints file
                check_path(value)
        for word in words[2:]:
            if word.startswith("-e"):
                continue
            match = re.fullmatch(r"\.\[(.*)\]", word.strip('"'))
            if match:
                assert set(match.group(1).split(",")) <= known, word
        return
    if words[:2] == ["accelerate", "launch"] and "-m" in words:  # a module run by every process
        module = words.index("-m") + 1
        assert words[module] == "atlas_vla.cli", f"README launches an unknown module: {' '.join(words)}"
        check(["atlas-vla", *words[module + 1:]])
        return
    if words[:2] == ["accelerate", "launch"]:
        index = words.index("train.py")
        check_path("train.py")
        check_train_args(words[index + 1:])
        return
    if words[:2] == ["python", "train.py"]:
        check_train_args(words[2:])
        return
    if words[0] == "./launch.sh":
        result = subprocess.run(["./launch.sh", "--dry-run", *words[1:]], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return
    if words[:3] == ["python", "-m", "pytest"] or words[:2] == ["accelerate", "config"]:
        return
    if words[0] == "srun":  # a SLURM job step runs the rest of the line
        check(words[1:])
        return
    if words[0] in ("[", "scontrol"):  # the SLURM recipe's requeue line
        return
    if words[:2] == ["wandb", "sweep"]:
        check_path(words[2])
        return
    if words[:2] == ["wandb", "agent"]:
        return
    if words[0] == "python" and words[1].startswith("benchmarks/"):
        check_path(words[1])
        return
    if words[0] == "atlas-vla":
        parser = build_parser()
        try:
            parser.parse_args(words[1:])
        except SystemExit as error:
            pytest.fail(f"README command does not parse: {' '.join(words)} ({error})")
        for word in words[1:]:
            if word.startswith(("configs/", "notebooks/", "benchmarks/")):
                check_path(word)
        return
    pytest.fail(f"README has a runnable command this test does not know: {' '.join(words)}")


@pytest.mark.parametrize("words", commands(), ids=lambda w: " ".join(w)[:60])
def test_readme_command(words):
    check(words)


def test_the_two_commands_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    first = blocks("bash")[0]
    for line in first.splitlines():
        if line.strip() and not line.startswith("#"):
            assert line.split(" #")[0].strip() in ci, line


def test_python_blocks_import_what_exists():
    for block in blocks("python"):
        for line in block.splitlines():
            if line.startswith(("from atlas_vla", "import atlas_vla")):
                exec(line, {})


def test_every_subcommand_and_flag_is_documented():
    for command in ("data-info", "convert-libero-hdf5", "compute-stats", "make-synthetic-libero", "predict",
                    "eval-offline", "eval-libero", "eval-report", "eval-watch", "serve", "cache-features"):
        assert command in README, command
    for flag in ("--report_to", "--resume_from_checkpoint", "--checkpoints_total_limit", "--mixed_precision",
                 "--gradient_accumulation_steps", "--eval_libero_steps", "--push_to_hub"):
        assert flag in README, flag
