"""A killed evaluation continues from its episode log: the log's rules without the simulator, then a real
`eval-libero` killed with SIGKILL mid-run whose rerun ends with the results of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import HAS_SIM, offline_environment, synthetic_dataset, tiny_policy_config

from atlas_vla.eval.episode_log import EpisodeLog, identity, log_path
from atlas_vla.eval.libero_sim import EpisodeResult, EpisodeSpec

EVAL = {"suite": "libero_spatial", "tasks": [0], "initial_states": [30, 31, 32], "seed": 0, "num_workers": 2,
        "videos": False}


def spec(state: int) -> EpisodeSpec:
    return EpisodeSpec("libero_spatial", 0, state, max_steps=12, replan_steps=None)


def result(state: int, **changes) -> EpisodeResult:
    values = dict(suite="libero_spatial", task_id=0, initial_state=state, instruction="put the bowl on the plate",
                  success=state % 2 == 0, steps=12, seconds=1.5)
    return EpisodeResult(**{**values, **changes})


def test_the_log_sits_beside_the_results_and_ignores_how_episodes_are_run():
    assert log_path("out/results.json") == Path("out/results.episodes.jsonl")
    one = identity("sha256 abc", EVAL)
    assert one == identity("sha256 abc", {**EVAL, "num_workers": 8, "videos": True})
    assert one != identity("sha256 abc", {**EVAL, "seed": 1}) and one != identity("sha256 abd", EVAL)


def test_a_rerun_skips_what_the_log_holds_and_runs_errors_again(tmp_path):
    path = tmp_path / "r.episodes.jsonl"
    evaluation = identity("sha256 abc", EVAL)
    log = EpisodeLog(path, evaluation)
    assert json.loads(path.read_text().splitlines()[0]) == evaluation
    log.append(result(30))
    log.append(result(31, error="worker died (exit code -9)", success=False, steps=0))
    again = EpisodeLog(path, evaluation)
    assert list(again.finished.values()) == [result(30)]
    assert again.remaining([spec(30), spec(31), spec(32)]) == [spec(31), spec(32)]


def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "r.episodes.jsonl"
    evaluation = identity("sha256 abc", EVAL)
    EpisodeLog(path, evaluation).append(result(30))
    with path.open("a") as handle:
        handle.write('{"suite": "libero_spatial", "task_id": 0, "initial_')
    log = EpisodeLog(path, evaluation)
    assert list(log.finished) == [("libero_spatial", 0, 30)]
    log.append(result(31))
    assert [json.loads(line)["initial_state"] for line in path.read_text().splitlines()[1:]] == [30, 31]


def test_the_log_of_another_evaluation_is_refused_naming_what_differs(tmp_path):
    path = tmp_path / "r.episodes.jsonl"
    EpisodeLog(path, identity("sha256 abc", EVAL)).append(result(30))
    before = path.read_bytes()
    with pytest.raises(ValueError) as raised:
        EpisodeLog(path, identity("sha256 abd", {**EVAL, "seed": 3}))
    assert str(raised.value) == (f"{path} logs another evaluation (eval.seed: 0 logged, 3 now; policy: 'sha256 abc' "
                                 f"logged, 'sha256 abd' now): rerun with its settings to continue it, pass --fresh to "
                                 f"start over, or choose another --output")
    assert path.read_bytes() == before


@pytest.mark.skipif(not HAS_SIM, reason="the LIBERO simulator ([sim] extra) is not installed")
@pytest.mark.sim
@pytest.mark.slow
def test_an_evaluation_killed_mid_run_continues_to_the_uninterrupted_results(tmp_path):
    from atlas_vla.data.normalization import compute_norm_stats
    from atlas_vla.data.sources import load_libero
    from atlas_vla.models.policy import AtlasPolicy

    stats = compute_norm_stats(load_libero(str(synthetic_dataset(tmp_path, num_episodes=4))))
    policy = AtlasPolicy(tiny_policy_config(), stats).save_pretrained(tmp_path / "policy")

    def command(output: Path) -> list[str]:
        return [sys.executable, "-m", "atlas_vla.cli", "eval-libero", "--policy", str(policy), "--suite",
                "libero_spatial", "--tasks", "0", "--initial-states", "30-32", "--max-episode-steps", "12",
                "--camera-size", "128", "--num-workers", "1", "--output", str(output)]

    env = offline_environment(MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    straight = subprocess.run(command(tmp_path / "straight.json"), env=env, capture_output=True, text=True,
                              timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = tmp_path / "killed.json"
    process = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (log_path(killed).is_file() and len(log_path(killed).read_text().splitlines()) >= 2):
            assert process.poll() is None and time.monotonic() < deadline, "no episode finished"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the evaluation, its server thread and its simulator worker
        process.wait()
    logged = len(log_path(killed).read_text().splitlines()) - 1
    assert not killed.exists() and 1 <= logged < 3
    resumed = subprocess.run(command(killed), env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{logged} of 3 episodes are done" in resumed.stdout
    assert sum(line.startswith("task 0 init ") for line in resumed.stdout.splitlines()) == 3 - logged  # the rest only

    def outcomes(path: Path) -> list[tuple]:
        return [(e["task_id"], e["initial_state"], e["success"], e["steps"], e["failure"], e["error"])
                for e in json.loads(path.read_text())["episodes_detail"]]

    assert outcomes(killed) == outcomes(tmp_path / "straight.json")
    assert len(log_path(killed).read_text().splitlines()) == 1 + 3  # every episode once
