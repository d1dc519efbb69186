"""`atlas-vla eval-watch` beside a real training run: every checkpoint evaluated in step order as it
appears, results written into the checkpoint folders, success logged to W&B in the training run's group
at the checkpoints' steps, the watcher done after `final/`; restarts skip what was evaluated, and a
checkpoint removed before the watcher reaches it is skipped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ACCELERATE_CPU_1, HAS_SIM, offline_environment, synthetic_dataset, tiny_args

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.skipif(not HAS_SIM, reason="the LIBERO simulator ([sim] extra) is not installed"),
              pytest.mark.sim, pytest.mark.slow]
EVAL = ["--eval.tasks", "[0]", "--eval.initial_states", "[0]", "--eval.max_episode_steps", "3",
        "--eval.camera_size", "128", "--eval.num_workers", "1", "--eval.videos", "false"]


def test_eval_watch_follows_a_training_run_to_its_final_policy(tmp_path):
    from wandb_records import find_run_files, read_run

    data = synthetic_dataset(tmp_path, num_episodes=4)
    out = tmp_path / "run"
    env = offline_environment(MUJOCO_GL="egl")
    watcher = subprocess.Popen([sys.executable, "-m", "atlas_vla.cli", "eval-watch", str(out), "--poll-seconds", "1"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        training = subprocess.run([*ACCELERATE_CPU_1, *tiny_args(data, out, "--report_to", "wandb",
                                                                 "--checkpoints_total_limit", "5", *EVAL)],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert training.returncode == 0, training.stderr[-3000:]
        printed, _ = watcher.communicate(timeout=900)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, printed[-3000:]
    assert "evaluated 3 checkpoint(s)" in printed  # steps 2, 4, 6; final/ (step 6) reuses step 6's results
    for folder in ("checkpoints/checkpoint-2", "checkpoints/checkpoint-4", "checkpoints/checkpoint-6", "final"):
        results = json.loads((out / folder / "eval_results.json").read_text())
        assert results["episodes"] == 1 and results["episodes_detail"][0]["steps"] == 3
    assert json.loads((out / "final" / "eval_results.json").read_text())["settings"]["step"] == 6
    train_run_id = (out / "wandb_run_id.txt").read_text().strip()
    [eval_file] = find_run_files(out / "eval_watch")
    eval_run = read_run(eval_file)
    assert eval_run.run_id == f"{train_run_id}-eval"
    assert [step for step, _ in eval_run.history["eval/success_rate"]] == [2, 4, 6]
    assert [step for step, _ in eval_run.history["eval/libero_spatial/task_0"]] == [2, 4, 6]

    # restarted: nothing left to do; a checkpoint removed (retention) before it is reached is skipped
    again = subprocess.run([sys.executable, "-m", "atlas_vla.cli", "eval-watch", str(out), "--once"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "evaluated 0 checkpoint(s)" in again.stdout, again.stderr[-2000:]
    for folder in ("checkpoints/checkpoint-4", "checkpoints/checkpoint-6", "final"):
        (out / folder / "eval_results.json").unlink()
    shutil.rmtree(out / "checkpoints" / "checkpoint-4" / "policy")  # retention's rmtree, caught halfway
    again = subprocess.run([sys.executable, "-m", "atlas_vla.cli", "eval-watch", str(out), "--once",
                            "--report-to", "none"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "evaluated 1 checkpoint(s)" in again.stdout  # checkpoint-6; final/ copies its results
    assert "checkpoint-4 was removed (checkpoints_total_limit) before it was evaluated; skipped" in again.stderr
    assert (out / "final" / "eval_results.json").is_file() and not (out / "checkpoints" / "checkpoint-4" /
                                                                   "eval_results.json").exists()


def test_eval_watch_refuses_what_is_not_a_run_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "atlas_vla.cli", "eval-watch", str(tmp_path), "--once"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert result.returncode == 2 and "is not a training run's output folder" in result.stderr
