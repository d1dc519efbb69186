"""A worker started with `processes.die_with_parent` ends when its parent is killed (no cleanup runs there)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

PARENT = """
import multiprocessing as mp, os, signal, sys, time
from concurrent.futures import ProcessPoolExecutor
from atlas_vla.processes import die_with_parent

def pid():
    return os.getpid()

if __name__ == "__main__":
    with_it = sys.argv[1] == "1"
    pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=die_with_parent if with_it else None)
    print(pool.submit(pid).result(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("with_it", [True, False], ids=["die_with_parent", "without"])
def test_a_worker_ends_with_its_killed_parent_only_with_die_with_parent(tmp_path, with_it):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    printed = tmp_path / "printed"
    with printed.open("w") as out:  # a file, not a pipe: a surviving worker would hold a pipe open
        parent = subprocess.run([sys.executable, str(script), "1" if with_it else "0"], stdout=out,
                                stderr=subprocess.STDOUT, timeout=120,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert parent.returncode == -signal.SIGKILL, printed.read_text()
    worker = int(printed.read_text().split()[0])
    try:
        deadline = time.monotonic() + 30
        while alive(worker) and with_it and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive(worker) is not with_it
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
