"""Process lifetime: a child that must not outlive the process that started it."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2


def set_parent_death_signal(signum: int) -> None:
    """Linux: deliver `signum` to this process when the thread that started it ends (its parent's main thread, for
    the processes this package starts; 0: no longer); elsewhere nothing. A parent killed by a signal (SIGKILL
    included) runs no cleanup, so this is how its children learn it."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        except (OSError, AttributeError):
            pass


def parent_death_signal() -> int:
    """The signal `set_parent_death_signal` set for this process (0: none, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    value = ctypes.c_int(0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
    except (OSError, AttributeError):
        return 0
    return value.value


def die_with_parent() -> None:
    """A worker process's initializer: end (SIGKILL) when the process that started it ends, however it ended; a
    parent that was gone before this ran ends the worker now."""
    set_parent_death_signal(signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)
