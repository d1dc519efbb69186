"""W&B sweeps: the sweep files speak our flags, and the in-process train_function trains with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
import yaml
from helpers import synthetic_dataset
from wandb_records import find_run_files, read_run

from atlas_vla.config import load_config
from atlas_vla.sweep import sweep_overrides, train_function
from atlas_vla.training.tracking import sweep_trial_dir, sweep_trial_run_id

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "configs").glob("sweep*.yaml"))
LOGGED = {"val/loss", "val/pose_loss", "val/gripper_loss", "val/pose_l2_error", "val/pose_l1_error", "val/gripper_error"}


def sample(spec: dict):
    return spec["values"][0] if "values" in spec else spec.get("min", spec.get("value"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_speaks_our_flags(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes")
    assert (REPO / sweep["program"]).is_file()
    assert sweep["metric"]["name"] in LOGGED
    command = sweep["command"]
    assert command[:4] == ["${env}", "accelerate", "launch", "${program}"] and command[-1] == "${args}"
    base = command[command.index("--config") + 1]
    # every parameter is a flag or a config key of train.py, with a value of the right type
    overrides = sweep_overrides({name: sample(spec) for name, spec in sweep["parameters"].items()})
    load_config(REPO / base, overrides)


def test_grid_is_learning_rate_by_batch_size():
    grid = yaml.safe_load((REPO / "configs" / "sweep.yaml").read_text())
    assert grid["method"] == "grid" and set(grid["parameters"]) == {"learning_rate", "train_batch_size"}


def test_unknown_sweep_parameter_fails_with_a_suggestion():
    with pytest.raises(ValueError, match="did you mean '--learning_rate'"):
        sweep_overrides({"learning_rat": 0.1})


@pytest.mark.slow
def test_train_function_trains_with_the_sweep_values(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    data = synthetic_dataset(tmp_path, num_episodes=4)
    values = {"learning_rate": 0.0003, "train_batch_size": 4, "max_train_steps": 3, "validation_steps": 3,
              "checkpointing_steps": 3, "output_dir": str(tmp_path / "trial"), "data.source": str(data),
              "data.generate_synthetic": False, "data.val_fraction": 0.25, "model.image_size": 56}
    try:
        run = wandb.init(mode="offline", dir=str(tmp_path), project="atlas-vla-sweep-test", config=values)
        final = train_function("configs/demo.yaml")
    finally:
        wandb.teardown()  # this process's W&B service and its WANDB_SERVICE go: later tests start without them
    assert final == tmp_path / "trial" / f"sweep-{run.id}" / "final"  # the trial's own folder
    assert (final / "model.safetensors").is_file()
    logged = [read_run(f) for f in find_run_files(tmp_path)]
    ours = [r for r in logged if r.run_id == run.id]
    config = {k: v for r in ours for k, v in r.config.items()}
    assert config["training.learning_rate"] == 0.0003 and config["training.train_batch_size"] == 4
    assert any("val/pose_l1_error" in r.history for r in ours)


def test_a_sweep_trial_is_recognised_from_the_agents_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    assert sweep_trial_run_id() is None  # a run id alone (e.g. a chosen id) is not a sweep trial
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw33p")
    assert sweep_trial_run_id() == "abc123"
    trial = sweep_trial_dir(tmp_path / "out", "abc123")
    assert trial == tmp_path / "out" / "sweep-abc123"
    assert sweep_trial_dir(trial, "abc123") == trial  # applying it twice (train_function, then train) is harmless


@pytest.mark.slow
def test_a_cli_agent_trial_writes_its_own_folder_and_its_run_id(tmp_path):
    data = synthetic_dataset(tmp_path, num_episodes=4)
    out = tmp_path / "shared-output"
    # what `wandb agent` exports before it runs the sweep's command (wandb_agent.py, Agent._command_run)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_SWEEP_ID": "sw33p", "WANDB_RUN_ID": "trial42x", "WANDB_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train.py",
               "--config", "configs/demo.yaml", "--report_to", "wandb", "--data.source", str(data),
               "--data.generate_synthetic", "false", "--data.val_fraction", "0.25", "--output_dir", str(out),
               "--model.image_size", "56", "--train_batch_size", "4", "--max_train_steps", "2",
               "--validation_steps", "2", "--checkpointing_steps", "2", "--learning_rate", "0.0003"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trial = out / "sweep-trial42x"
    assert [p.name for p in out.iterdir()] == ["sweep-trial42x"]
    assert (trial / "final" / "model.safetensors").is_file()
    assert (trial / "wandb_run_id.txt").read_text().strip() == "trial42x"
    state = json.loads((trial / "checkpoints" / "checkpoint-2" / "training_state.json").read_text())
    assert state["wandb_run_id"] == "trial42x"
    [logged] = [read_run(f) for f in find_run_files(tmp_path)]
    assert logged.run_id == "trial42x" and logged.config["training.learning_rate"] == 0.0003
