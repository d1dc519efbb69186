"""launch.sh: the accelerate command lines it builds, its help and its errors, and that the paths it is given
mean the folder it is started from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import offline_environment

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs" / "train_config.yaml"  # the default config: this checkout's, wherever it is started from


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["./launch.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,expected", [
    ([], f"+ accelerate launch --num_processes 1 --num_machines 1 --quiet {REPO}/train.py --config {DEFAULT}"),
    (["--mode", "multi", "--gpus", "8", "--wandb", "--log", "logs/x.log"],
     f"+ accelerate launch --multi_gpu --num_processes 8 --num_machines 1 --quiet {REPO}/train.py --config {DEFAULT} "
     "--wandb"),
    (["--mode", "cpu", "--gpus", "2", "--", "--config", "configs/demo.yaml", "--seed", "3"],
     "+ ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --quiet "
     f"{REPO}/train.py --config configs/demo.yaml --seed 3"),
    (["--mode", "multi", "--gpus", "4", "--nodes", "2", "--node_rank", "1", "--main_process_ip", "10.1.1.1"],
     "+ accelerate launch --multi_gpu --num_processes 8 --machine_rank 1 --main_process_ip 10.1.1.1 "
     f"--main_process_port 29500 --num_machines 2 --quiet {REPO}/train.py --config {DEFAULT}"),
    (["--accelerate_config", "accelerate_configs/fsdp.yaml", "--mode", "multi"],
     "+ accelerate launch --config_file accelerate_configs/fsdp.yaml --multi_gpu --num_processes 8"),
])
def test_command_lines(args, expected):
    result = launch("--dry-run", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(expected)


def test_help():
    result = launch("--help")
    assert result.returncode == 0 and "--mode single|multi|cpu" in result.stdout and "--log FILE" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--mode", "tpu"], "--mode must be single, multi or cpu, got 'tpu'"),
    (["--gpus", "two"], "--gpus must be a positive integer, got 'two'"),
    (["--mode", "single", "--gpus", "2"], "use --mode multi"),
    (["--nodes", "2"], "--nodes 2 needs --main_process_ip"),
    (["--config", "nope.yaml"], "config file not found: nope.yaml"),
    (["--frobnicate"], "unknown option '--frobnicate'"),
])
def test_errors(args, message):
    result = launch("--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr


def test_num_processes_names_what_gpus_counts_in_cpu_mode():
    new = launch("--dry-run", "--mode", "cpu", "--num_processes", "2", "--", "--config", "configs/demo.yaml")
    old = launch("--dry-run", "--mode", "cpu", "--gpus", "2", "--", "--config", "configs/demo.yaml")
    assert new.returncode == old.returncode == 0 and new.stdout == old.stdout
    assert "--multi_gpu --num_processes 2" in new.stdout and not new.stderr
    assert "in cpu mode --gpus counts CPU processes; --num_processes 2 says so" in old.stderr
    assert "--num_processes must be a positive integer, got 'x'" in launch("--dry-run", "--num_processes", "x").stderr


@pytest.mark.parametrize("mode", [["--mode", "cpu"], ["--mode", "cpu", "--num_processes", "2"]])
def test_a_mistyped_flag_is_one_line_before_anything_starts(mode):
    result = launch(*mode, "--", "--config", "configs/demo.yaml", "--learning_rat", "1")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == ["train.py: error: unknown option --learning_rat (did you mean '--learning_rate'?)"], result.stderr


def repository_files() -> set[str]:
    """Every file of the checkout (git's own folder and Python's caches aside)."""
    skip = (".git", "__pycache__", ".pytest_cache", ".ruff_cache")
    return {str(path.relative_to(REPO)) for path in REPO.rglob("*")
            if path.is_file() and not any(part in skip or part.endswith(".egg-info") for part in path.parts)}


def from_folder(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """launch.sh started from `folder`, as a user in a folder of their own starts it (W&B offline)."""
    # PYTHONPATH: `python -m atlas_vla.cli` below also where the checkout is not pip-installed
    env = offline_environment(PYTHONPATH=str(REPO))
    return subprocess.run([str(REPO / "launch.sh"), *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_missing_source_named_on_the_command_line_stops_before_anything_is_written(tmp_path):
    (tmp_path / "data").mkdir()
    result = from_folder(tmp_path, "--mode", "cpu", "--log", "logs/train.log", "--", "--config",
                         str(REPO / "configs" / "demo.yaml"), "--data.source", "dta", "--output_dir", "run")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [f"train.py: error: data source {tmp_path / 'dta'} does not exist: no such file or folder, and "
                      f"not a Hub dataset id of the form 'org/name' (did you mean {tmp_path / 'data'}?)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no log, no run folder, no synthetic data


@pytest.mark.slow
def test_relative_paths_mean_the_folder_it_is_started_from(tmp_path):
    before = repository_files()
    subprocess.run([sys.executable, "-m", "atlas_vla.cli", "make-synthetic-libero", "data", "--episodes", "8",
                    "--image-size", "32"], cwd=tmp_path, env=offline_environment(PYTHONPATH=str(REPO)), check=True,
                   capture_output=True)
    result = from_folder(tmp_path, "--mode", "cpu", "--wandb", "--log", "logs/launch.log", "--",
                         "--config", str(REPO / "configs" / "demo.yaml"), "--data.source", "data", "--output_dir", "run",
                         "--log", "logs/train.log", "--model.image_size", "28", "--train_batch_size", "8",
                         "--max_train_steps", "2", "--validation_steps", "2", "--checkpointing_steps", "2",
                         "--data.val_fraction", "0.25", "--lr_warmup_steps", "1", "--logging.log_media", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())  # what the run read, absolute
    assert saved["data"]["source"] == str(tmp_path / "data") and saved["data"]["generate_synthetic"] is False
    assert saved["training"]["output_dir"] == str(tmp_path / "run")
    assert saved["logging"]["log_file"] == str(tmp_path / "logs" / "train.log")
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert f"exported the policy to {tmp_path / 'run' / 'final'}" in (tmp_path / "logs" / "train.log").read_text()
    assert f"exported the policy to {tmp_path / 'run' / 'final'}" in (tmp_path / "logs" / "launch.log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "logs", "run"]
    assert repository_files() == before  # nothing was read from or written into the checkout
