"""Stop training cleanly on SIGTERM, SIGINT or SIGUSR1: cluster preemption, Ctrl-C, SLURM's time-limit warning.

Once the training loop runs, a stop signal only sets a flag (before it, while data loads or features
are cached, there is nothing to save and the signal acts at once). At the next step boundary every
rank asks the others through Accelerate's cross-process trigger (`set_trigger` / `check_trigger`),
so all of them stop after the same optimizer update, whichever process the signal reached; the
trainer then saves a checkpoint of that step, closes the trackers and exits 0. `./launch.sh` turns
that stop into exit code `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL: "resume me") through the file named
by `STOP_FILE_ENV`.

One signal often arrives by several routes within seconds (the scheduler signals every process, the launcher
forwards it, `PR_SET_PDEATHSIG` reports the launcher's death), so repeats within `REPEAT_WINDOW_S` of the first are
the same request. The launcher's death comes as a signal of its own (`PARENT_DEATH_SIGNAL`), so the stop is named
after the signal that was sent whichever route is handled first (it gets a second to arrive), and after the
launcher's end only when no signal reached this process. A later one is a second request: the previous handler
takes over and acts on it at once (SIGTERM and SIGUSR1 end the process, SIGINT raises `KeyboardInterrupt`); a
checkpoint being written then is left in its temporary folder, so `latest` still names the last complete one.
"""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from accelerate import Accelerator

from atlas_vla.files import write_text_atomic
from atlas_vla.processes import parent_death_signal, set_parent_death_signal

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Accelerate >= 1.16's launcher re-sends a stop to the trainer once it has handled its own copy, which on a
# loaded machine takes seconds: within this window that is still the first request, not an order to end now
REPEAT_WINDOW_S = 10.0
PREEMPTED_EXIT_CODE = 75  # launch.sh's exit code after a stop that saved a checkpoint (EX_TEMPFAIL)
STOP_FILE_ENV = "ATLAS_VLA_STOP_FILE"  # launch.sh: the main process writes the stop's description here
WAIT_AT_STEP_ENV = "ATLAS_VLA_TEST_WAIT_AT_STEP"  # tests: every rank waits at this step (see `wait_for_test`)
# Linux sends it when the launcher dies (a launcher killed by a signal does not forward it): a real-time signal
# that nothing else sends, so that the launcher's end is never mistaken for the signal that ended it
PARENT_DEATH_SIGNAL = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else None
_LAUNCHER_ENDED = "the end of its launcher"


class StopRequest:
    """The stop signals of one training run: install the handlers with `with StopRequest() as stop:`."""

    def __init__(self) -> None:
        self.signal_name: str | None = None  # the stop signal this process received (or `_LAUNCHER_ENDED`)
        self.training = False  # set by the loop: before it, there is nothing to save and a signal acts at once
        self._first_at: float | None = None
        self._previous: dict[int, Any] = {}
        self._previous_death_signal = 0

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            logger.warning("training runs outside the main thread: SIGTERM/SIGINT/SIGUSR1 will not stop it cleanly")
            return self
        for signum in (*STOP_SIGNALS, PARENT_DEATH_SIGNAL) if PARENT_DEATH_SIGNAL else STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        if PARENT_DEATH_SIGNAL:
            self._previous_death_signal = parent_death_signal()
            set_parent_death_signal(PARENT_DEATH_SIGNAL)
        self._consoles = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = (stream if stream is None else _ReaderlessConsole(stream) for stream in self._consoles)
        atexit.unregister(_end_workers_at_exit)
        atexit.register(_end_workers_at_exit)  # after multiprocessing's own exit handler, so it runs before it
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous:  # first, or a launcher dying now would deliver a signal nothing handles any more
            set_parent_death_signal(self._previous_death_signal if PARENT_DEATH_SIGNAL else 0)
            sys.stdout, sys.stderr = self._consoles
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        name = _LAUNCHER_ENDED if signum == PARENT_DEATH_SIGNAL else signal.Signals(signum).name
        if not self.training:  # loading data, caching features: stop now, as without these handlers
            self._pass_on(signum, frame)
        elif self._first_at is None:
            self._first_at, self.signal_name = now, name
            what = "its launcher ended" if name == _LAUNCHER_ENDED else f"{name} received"
            sys.stderr.write(f"\n{what}: stopping after this step and saving a checkpoint "
                             f"(a second signal after {REPEAT_WINDOW_S:.0f} s stops at once)\n")
        elif now - self._first_at > REPEAT_WINDOW_S:
            self._pass_on(signum, frame)
        elif self.signal_name == _LAUNCHER_ENDED:  # the signal that ended the launcher, by a slower route
            self.signal_name = name

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        """Act on the signal as the handler installed before this one would (by default: end the process;
        the launcher's end acts as SIGTERM)."""
        if signum == PARENT_DEATH_SIGNAL:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signum = signal.SIGTERM
        previous = self._previous.get(signum, signal.SIG_DFL)
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signum)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank, at the same step, once any rank received a stop signal (a collective: all
        ranks call it after each optimizer update)."""
        if self.signal_name is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def describe(self, wait_s: float = 1.0) -> str:
        """What stopped training, for the stop's message. When only the launcher's end has been seen, the signal
        that ended it may still be on its way by a slower route: it gets `wait_s` to arrive."""
        deadline = time.monotonic() + wait_s
        while self.signal_name == _LAUNCHER_ENDED and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.signal_name or "a stop signal received by another process"


class _ReaderlessConsole:
    """stdout/stderr that keep working once nobody reads them: Accelerate >= 1.16's launcher reads the
    trainer's stderr through a pipe, and a launcher that a stop signal ended (SIGUSR1's default action,
    SIGKILL) leaves that pipe without a reader; the next progress bar or W&B line would raise
    `BrokenPipeError` and the trainer would die before finishing the W&B run it is saving. At the first
    broken write the stream's file descriptor is pointed at /dev/null (what Python's documentation advises
    for EPIPE), so later writes and the flush at exit succeed too."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer, ...
        return getattr(self._stream, name)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Data-loader workers (`worker_init_fn`): ignore the stop signals. A scheduler signals every process of
    the job; torch's workers would die of it, and the trainer would then fail on a dead worker instead of
    saving. Their loaders shut them down; `_end_workers_at_exit` ends any that are left."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _end_workers_at_exit() -> None:
    """At interpreter exit, before multiprocessing terminates its daemonic children with a SIGTERM that
    loader workers ignore (and then waits for them forever): let the garbage collector close the loaders
    still alive (e.g. after an error), which ends their workers, and kill whatever is left."""
    gc.collect()
    leftover = [child for child in multiprocessing.active_children() if child.daemon]
    if leftover:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each as a failed worker
        for child in leftover:
            child.kill()


def record_stop(message: str) -> None:
    """Tell `launch.sh` (through `STOP_FILE_ENV`) that training stopped on a signal after saving."""
    path = os.environ.get(STOP_FILE_ENV)
    if path:
        write_text_atomic(path, message + "\n")


def wait_for_test(step: int, output_dir: Path, stop: StopRequest, rank: int) -> None:
    """Tests only (`ATLAS_VLA_TEST_WAIT_AT_STEP=N`): at step N write `<output_dir>/.wait-rank-R` holding
    this process's pid, then wait until this process receives a stop signal (it then deletes the file, so
    the test knows the signal has landed) or the file is deleted."""
    if os.environ.get(WAIT_AT_STEP_ENV) != str(step):
        return
    marker = output_dir / f".wait-rank-{rank}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while marker.exists() and stop.signal_name is None and time.monotonic() < deadline:
        time.sleep(0.05)
    marker.unlink(missing_ok=True)
