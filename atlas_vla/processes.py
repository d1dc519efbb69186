"""Process lifetime: a child that must not outlive the process that started it."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int) -> None:
    """Linux: deliver `signum` to this process when its parent dies (0: no longer); elsewhere nothing. A parent
    killed by a signal (SIGKILL included) runs no cleanup, so this is how its children learn it."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        except (OSError, AttributeError):
            pass


def die_with_parent() -> None:
    """A worker process's initializer: end (SIGKILL) when the process that started it ends, however it ended."""
    set_parent_death_signal(signal.SIGKILL)
