"""Preemption: SIGTERM, SIGINT and SIGUSR1 stop every rank at the same step with a checkpoint, the W&B run
is closed (not crashed), no process is left behind, and resuming is bit-identical to an uninterrupted run.

Real `accelerate launch` / `launch.sh` processes; `ATLAS_VLA_TEST_WAIT_AT_STEP` holds every rank at a step
until the test has sent its signal, so the stop step is chosen by the test, not by timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import accelerate
import helpers
import pytest
from helpers import ACCELERATE_CPU_1, ACCELERATE_CPU_2, offline_environment, synthetic_dataset
from packaging.version import Version
from safetensors.torch import load_file
from wandb_records import find_run_files, read_run

from atlas_vla.processes import parent_death_signal
from atlas_vla.training.preemption import (PARENT_DEATH_SIGNAL, PREEMPTED_EXIT_CODE, REPEAT_WINDOW_S, WAIT_AT_STEP_ENV,
                                          StopRequest)

REPO = Path(__file__).resolve().parents[2]
# plain `accelerate launch`'s own exit status after a SIGTERM reached it: from 1.16 it handles the signal and exits
# 128 + 15; earlier ones (1.15 measured) die of the signal itself, one process, or report torchrun's failure, 1
LAUNCHER_SIGTERM_STATUS = ({128 + signal.SIGTERM} if Version(accelerate.__version__) >= Version("1.16")
                           else {-signal.SIGTERM, 1})
LAUNCH_2 = ["./launch.sh", "--mode", "cpu", "--num_processes", "2", "--"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("preemption-data"), num_episodes=8)


def tiny_args(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return helpers.tiny_args(data_dir, output_dir, "--training.dataloader_num_workers", "1", *extra)


def finish(command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO, env=offline_environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def stopped_run(command: list[str], out: Path, ranks: int, step: int, send) -> tuple[int, str]:
    """Start `command` in its own session, hold its ranks at `step`, call `send(launcher_pid, rank_pids)`,
    release the ranks and return (exit code, output) once it ended."""
    process = subprocess.Popen(command, cwd=REPO, env=offline_environment(**{WAIT_AT_STEP_ENV: str(step)}),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    markers = [out / f".wait-rank-{rank}" for rank in range(ranks)]
    try:
        deadline = time.monotonic() + 300
        while not all(m.exists() and m.read_text() for m in markers):
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the ranks never reached the step"
            time.sleep(0.1)
        send(process.pid, [int(m.read_text()) for m in markers])
        while all(m.exists() for m in markers):  # a rank deletes its marker once the signal has reached it
            assert time.monotonic() < deadline, "no rank received the signal"
            time.sleep(0.05)
        for marker in markers:  # the ranks the signal did not reach learn it through the cross-process trigger
            marker.unlink(missing_ok=True)
        output, _ = process.communicate(timeout=300)  # a hang is a failure here, not a wait for the suite's limit
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, output


def leftover_processes(out: Path) -> list[str]:
    """Command lines of the live processes that name `out` (read from /proc: no `ps` needed)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended while we looked
            continue
        if str(out) in args:
            found.append(f"{cmdline.parent.name}: {args}")
    return found


def same_weights(a: Path, b: Path) -> None:
    first, second = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        assert (first[key] == second[key]).all(), key


def preempted_wandb_run(out: Path, step: int) -> str:
    """The offline W&B run of `out` holds every logged `train/*` value up to `step` (equal to `metrics.jsonl`),
    is marked as preempted and finished (exit code 0, not crashed); returns its id."""
    [run_file] = find_run_files(out)
    run = read_run(run_file)
    assert run.preempting and run.exit_code == 0, run
    local = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [(row["step"], row["train/loss"]) for row in local if "train/loss" in row]
    assert [s for s, _ in expected] == list(range(1, step + 1))
    assert [s for s, _ in run.history["train/loss"]] == [s for s, _ in expected]
    assert [v for _, v in run.history["train/loss"]] == pytest.approx([v for _, v in expected], rel=1e-6)
    return run.run_id


@pytest.mark.slow
def test_sigterm_to_the_launcher_alone_stops_the_trainer_with_a_checkpoint_and_resume_is_exact(tmp_path, data_dir):
    """Kubernetes signals the container's first process only. Accelerate >= 1.16's launcher then terminates its
    whole process tree (5 s of grace, then SIGKILL); older ones die at once and the trainer learns it from the
    parent-death signal. Either way the trainer saves, and the W&B run, whose service is no descendant of the
    launcher, holds everything up to the stop and continues under the same id after the resume."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    finish([*ACCELERATE_CPU_1, *tiny_args(data_dir, straight)])
    code, _ = stopped_run([*ACCELERATE_CPU_1, *tiny_args(data_dir, stopped, "--report_to", "wandb")], stopped, 1, 3,
                          lambda launcher, ranks: os.kill(launcher, signal.SIGTERM))
    assert code in LAUNCHER_SIGTERM_STATUS  # the launcher itself was ended by the signal; the trainer went on to save
    deadline = time.monotonic() + 60
    while leftover_processes(stopped) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftover_processes(stopped) == []
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert not (stopped / "final").exists()
    run_id = preempted_wandb_run(stopped, 3)
    finish([*ACCELERATE_CPU_1,
            *tiny_args(data_dir, stopped, "--report_to", "wandb", "--resume_from_checkpoint", "latest")])
    same_weights(straight / "final", stopped / "final")
    runs = [read_run(f) for f in find_run_files(stopped)]
    assert {r.run_id for r in runs} == {run_id}
    assert max(s for r in runs for s, _ in r.history["train/loss"]) == 6


@pytest.mark.slow
def test_sigusr1_to_one_of_two_ranks_stops_both_at_that_step_and_launch_sh_says_resume(tmp_path, data_dir):
    """SLURM's `--signal=USR1@90` warning reaching one rank: both ranks stop after the same update."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    finish([*LAUNCH_2, *tiny_args(data_dir, straight)])
    code, output = stopped_run([*LAUNCH_2, *tiny_args(data_dir, stopped)], stopped, 2, 3,
                               lambda launcher, ranks: os.kill(ranks[1], signal.SIGUSR1))
    assert code == PREEMPTED_EXIT_CODE, output[-3000:]
    assert "stopped by a stop signal received by another process after step 3 of 6" in output
    assert "Traceback" not in output
    assert leftover_processes(stopped) == []
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    finish([*LAUNCH_2, *tiny_args(data_dir, stopped, "--resume_from_checkpoint", "latest")])
    same_weights(straight / "final", stopped / "final")


def signal_every_process(launcher: int, ranks: list[int]) -> None:
    """A signal to the process groups (launch.sh's, and the launcher's with its ranks), as a shell or SLURM's
    process-group tracking sends it; the W&B service, in a session of its own, is not in them."""
    os.killpg(launcher, signal.SIGTERM)
    os.killpg(os.getpgid(ranks[0]), signal.SIGTERM)


def signal_first_process(launcher: int, ranks: list[int]) -> None:
    """What Kubernetes does: the container's first process gets SIGTERM."""
    os.kill(launcher, signal.SIGTERM)


def usr1_to_every_process(launcher: int, ranks: list[int]) -> None:
    """SLURM's `--signal=USR1@90` warning: every process of the job step gets SIGUSR1. Accelerate's launcher does
    not handle it and ends at once, leaving the trainer's stderr (a pipe it read) without a reader."""
    os.killpg(launcher, signal.SIGUSR1)
    os.killpg(os.getpgid(ranks[0]), signal.SIGUSR1)


@pytest.mark.slow
@pytest.mark.parametrize("launcher, processes, send, name", [
    ("launch.sh", 1, signal_every_process, "SIGTERM"),
    ("launch.sh", 1, usr1_to_every_process, "SIGUSR1"),
    ("launch.sh", 2, signal_first_process, "SIGTERM"),
    ("accelerate", 1, signal_every_process, "SIGTERM"),
    ("accelerate", 2, signal_every_process, "SIGTERM"),
], ids=["launch.sh-1-slurm-every-process", "launch.sh-1-slurm-usr1-warning", "launch.sh-2-kubernetes-first-process",
        "accelerate-1-slurm-every-process", "accelerate-2-slurm-every-process"])
def test_a_stop_signal_leaves_the_checkpoint_of_that_step_and_a_preempted_wandb_run(tmp_path, data_dir, launcher,
                                                                                    processes, send, name):
    """launch.sh exits 75 ("resume me"); plain `accelerate launch` exits with a failure status. In every case
    the checkpoint of the stop step is complete and the W&B run holds every value up to it, marked preempted."""
    out = tmp_path / "run"
    args = tiny_args(data_dir, out, "--report_to", "wandb")
    if launcher == "launch.sh":
        command = ["./launch.sh", "--mode", "cpu", "--num_processes", str(processes), "--", *args]
    else:
        command = (ACCELERATE_CPU_1 if processes == 1 else ACCELERATE_CPU_2) + args
    code, output = stopped_run(command, out, processes, 3, send)
    if launcher == "launch.sh":
        assert code == PREEMPTED_EXIT_CODE, output[-3000:]
        assert f"stopped by {name} after step 3 of 6" in output, output[-3000:]
    else:
        assert code in LAUNCHER_SIGTERM_STATUS, output[-3000:]
    assert leftover_processes(out) == []
    assert (out / "checkpoints" / "checkpoint-3" / "training_state.json").is_file()
    assert not (out / "final").exists()
    preempted_wandb_run(out, 3)


def test_signals_before_training_act_at_once_and_a_repeat_within_the_window_is_the_same_request(monkeypatch):
    """Real signals to this process. Before the training loop a signal goes straight to the handler installed
    before (nothing to save yet). In the loop the first sets the flag, a repeat inside `REPEAT_WINDOW_S`
    (another route of the same signal) is ignored, a later one goes to the handler installed before."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        clock = [100.0]
        monkeypatch.setattr(time, "monotonic", lambda: clock[0])
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)  # before the training loop: nothing to save, it acts at once
            assert received == [signal.SIGUSR1] and stop.signal_name is None
        received.clear()
        with StopRequest() as stop:
            stop.training = True
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.signal_name == "SIGUSR1" and received == []
            clock[0] += REPEAT_WINDOW_S / 2
            os.kill(os.getpid(), signal.SIGUSR1)
            assert received == []
            clock[0] += REPEAT_WINDOW_S
            os.kill(os.getpid(), signal.SIGUSR1)
            assert received == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is handler  # restored on leaving
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.skipif(PARENT_DEATH_SIGNAL is None, reason="no real-time signals on this platform")
def test_the_launchers_end_names_the_stop_only_when_no_signal_came(monkeypatch):
    """The parent-death signal (the launcher died) and a signal sent to this process, in either order within the
    window: the stop is named after the signal. Alone, it is named after the launcher's end; before the training
    loop, or after the window, it acts as SIGTERM would. Linux is asked for it only inside the block."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    before = parent_death_signal()
    try:
        clock = [100.0]
        monkeypatch.setattr(time, "monotonic", lambda: clock[0])
        with StopRequest():
            assert parent_death_signal() == (PARENT_DEATH_SIGNAL if sys.platform.startswith("linux") else 0)
            os.kill(os.getpid(), PARENT_DEATH_SIGNAL)
            assert received == [signal.SIGTERM]
        assert parent_death_signal() == before
        for first, then, name in [(PARENT_DEATH_SIGNAL, signal.SIGUSR1, "SIGUSR1"),
                                  (signal.SIGUSR1, PARENT_DEATH_SIGNAL, "SIGUSR1"),
                                  (PARENT_DEATH_SIGNAL, None, "the end of its launcher")]:
            with StopRequest() as stop:
                stop.training = True
                for signum in (first, then):
                    if signum is not None:
                        os.kill(os.getpid(), signum)
                assert stop.describe(wait_s=0) == name
        assert received == [signal.SIGTERM]
        with StopRequest() as stop:
            stop.training = True
            os.kill(os.getpid(), signal.SIGUSR1)
            clock[0] += 2 * REPEAT_WINDOW_S
            os.kill(os.getpid(), PARENT_DEATH_SIGNAL)  # a second request: acts as SIGTERM at once
            assert received == [signal.SIGTERM, signal.SIGTERM] and stop.describe() == "SIGUSR1"
    finally:
        signal.signal(signal.SIGTERM, previous)
