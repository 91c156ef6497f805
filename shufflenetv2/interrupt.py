"""Graceful stops: SIGTERM or SIGINT asks training to finish its step, save a checkpoint and exit.

Schedulers (SLURM, Kubernetes, torchrun) send SIGTERM some time before they kill, and Ctrl-C sends
SIGINT to every process of the terminal's group.  The handler only records the request: the loop
looks at it after each optimizer step, all ranks agree that one of them was asked to stop, the
checkpoint is written, and the process exits with ``EXIT_INTERRUPTED`` so scripts can tell "stopped
and saved, resume me" from success (0), a bad input (2) and a crash.  A second Ctrl-C stops at once,
without saving, for when the save itself is not wanted.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import sys
import threading
from types import FrameType

from .errors import ShuffleNetV2Error

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL in sysexits.h: a temporary condition, run the command again to go on
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(ShuffleNetV2Error):
    """Training stopped on request after saving; the message names the checkpoint to resume from."""


class StopRequest:
    """Records SIGTERM / SIGINT while installed; ``signal_name`` is None until one arrives."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        """Handlers can only be set from the main thread; elsewhere (a notebook worker thread) this does nothing."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, do not save
            return
        self.signal_name = name
        print(
            f"\n{name} received: finishing the current step, then saving a checkpoint and stopping "
            "(press Ctrl-C again to stop at once without saving)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()


def ignore_in_worker() -> None:
    """DataLoader workers leave stopping to the main process.  A terminal's Ctrl-C and a scheduler's
    group-wide SIGTERM reach the workers too; if they died of it, the main process would fail inside
    its current step (torch raises from its SIGCHLD handler) instead of finishing it and saving."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_reaper_registered = False


def reap_workers_at_exit() -> None:
    """At exit, multiprocessing stops daemonic children with SIGTERM and waits for them; workers that
    ignore SIGTERM would make it wait forever, so they are killed first (atexit runs newest first).
    Workers hold nothing worth saving; they also exit by themselves when their parent is gone."""
    global _reaper_registered
    if not _reaper_registered:
        atexit.register(_kill_daemonic_children)
        _reaper_registered = True


def _kill_daemonic_children() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise "worker killed" in here
    children = [child for child in multiprocessing.active_children() if child.daemon]
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)
