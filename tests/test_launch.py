"""launch.sh: the accelerate command lines it builds, its help and its errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["./launch.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,expected", [
    ([], "+ accelerate launch --num_processes 1 --num_machines 1 --quiet train.py --config configs/train_config.yaml"),
    (["--mode", "multi", "--gpus", "8", "--wandb", "--log", "logs/x.log"],
     "+ accelerate launch --multi_gpu --num_processes 8 --num_machines 1 --quiet train.py --config configs/train_config.yaml --wandb"),
    (["--mode", "cpu", "--gpus", "2", "--", "--config", "configs/demo.yaml", "--seed", "3"],
     "+ ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --quiet train.py --config configs/demo.yaml --seed 3"),
    (["--mode", "multi", "--gpus", "4", "--nodes", "2", "--node_rank", "1", "--main_process_ip", "10.1.1.1"],
     "+ accelerate launch --multi_gpu --num_processes 8 --machine_rank 1 --main_process_ip 10.1.1.1 "
     "--main_process_port 29500 --num_machines 2 --quiet train.py --config configs/train_config.yaml"),
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
