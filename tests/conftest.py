"""Shared test fixtures: paths to the reference data, and a guard against tests that leak process state."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from helpers import HAS_SIM

REPO_ROOT = Path(__file__).resolve().parents[1]
# beside the checkout; ATLAS_VLA_FIXTURES names it where the tests run from a copy (.ci/mutation-score)
SHARED_FIXTURES = Path(os.environ.get("ATLAS_VLA_FIXTURES") or REPO_ROOT.parent / "shared" / "fixtures")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if HAS_SIM:
    # the simulator's libraries set environment variables on first import (OpenGL platform, Qt and library
    # paths): import them before any test, so every test sees the same environment whichever runs first
    try:
        import libero.libero.envs  # noqa: F401
    except (ImportError, OSError):  # a broken simulator install fails the simulator tests, not collection
        pass

# variables that pytest sets for every test phase, or that torch sets for itself the first time a process
# needs them (its compiler cache on the first fused optimizer step, its OpenMP setting); not a test's doing
NOT_A_TESTS_DOING = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "KMP_DUPLICATE_LIB_OK"}
GUARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # the stop signals training handles
# multiprocessing's resource tracker: the standard library starts one per process and keeps it to the end
PROCESS_SINGLETONS = ("multiprocessing.resource_tracker",)
CHILD_EXIT_GRACE_S = 10.0  # a child that is ending (a server's worker, a loader) gets this long to go


def _process_state() -> dict[str, object]:
    """What one test could change for every later test of this process (values compared after each test)."""
    return {
        "environment": {k: v for k, v in os.environ.items() if k not in NOT_A_TESTS_DOING},
        "working directory": os.getcwd(),
        "torch threads": torch.get_num_threads(),
        "torch default dtype": torch.get_default_dtype(),
        "signal handlers": {s.name: signal.getsignal(s) for s in GUARDED_SIGNALS},
    }


def _live_children() -> dict[int, str]:
    children = {}
    for child in psutil.Process().children(recursive=True):
        try:
            command = " ".join(child.cmdline())
            if child.status() != psutil.STATUS_ZOMBIE and not any(s in command for s in PROCESS_SINGLETONS):
                children[child.pid] = command[:200]
        except psutil.NoSuchProcess:
            continue
    return children


def _detached_wandb_services() -> dict[int, str]:
    """W&B services started outside any process tree (`WandbService`): a trainer must stop the one it started."""
    found = {}
    for process in psutil.process_iter(["cmdline", "status"]):
        command = " ".join(process.info["cmdline"] or [])
        if "wandb-core" in command and "--detached" in command and process.info["status"] != psutil.STATUS_ZOMBIE:
            found[process.pid] = command[:200]
    return found


def _differences(before: dict[str, object], after: dict[str, object]) -> list[str]:
    found = []
    for what, old in before.items():
        new = after[what]
        if what == "environment":
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))  # names only: no secrets
            if changed:
                found.append(f"environment variables {changed}")
        elif new != old:
            found.append(f"{what}: {old!r} -> {new!r}")
    return found


@pytest.fixture(autouse=True)
def no_leaked_process_state():
    """Every test starts from the same global random state and must leave the process as it found it:
    environment, working directory, torch's threads and default dtype, signal handlers, and no process it
    started (a child: a server, a worker; or a detached W&B service) still running. A test that leaves such
    a change behind fails here, and the change is undone so that the tests after it are not affected."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    before = _process_state()
    processes_before = set(_live_children()) | set(_detached_wandb_services())

    def started_here() -> dict[int, str]:
        alive = {**_live_children(), **_detached_wandb_services()}
        return {pid: command for pid, command in alive.items() if pid not in processes_before}

    yield
    problems = _differences(before, _process_state())
    deadline = time.monotonic() + CHILD_EXIT_GRACE_S
    while (left := started_here()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, command in left.items():
        problems.append(f"process {pid} still running: {command}")
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    for name in set(os.environ) - set(before["environment"]) - NOT_A_TESTS_DOING:
        del os.environ[name]
    os.environ.update(before["environment"])
    os.chdir(before["working directory"])
    torch.set_num_threads(before["torch threads"])
    torch.set_default_dtype(before["torch default dtype"])
    for name, handler in before["signal handlers"].items():
        signal.signal(signal.Signals[name], handler)
    if problems:
        pytest.fail("this test leaked process state into the tests after it: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """`../shared/fixtures`: reference data produced by the real systems (never edited)."""
    if not SHARED_FIXTURES.is_dir():
        message = f"shared fixtures not found at {SHARED_FIXTURES}"
        if os.environ.get("CI"):  # on CI a missing fixture is a broken checkout, not a reason to test less
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def sim_demos_dir(fixtures_dir: Path) -> Path:
    """60 real LIBERO simulator demonstrations in the LeRobot v2 layout."""
    return fixtures_dir / "libero" / "sim_demos"


@pytest.fixture(scope="session")
def observation_file(fixtures_dir: Path) -> Path:
    """One real LIBERO-Spatial observation (.npz: agentview_image, wrist_image, state, task_description)."""
    return fixtures_dir / "libero" / "sample_libero_spatial_observation.npz"
