"""Stopping a run on request: the one path from a signal to a checkpointed end.

SIGTERM or SIGINT reach the driver's ``StopOnSignal``; on Ray it sets a ``StopFlag`` actor beside it. Rank
0 asks (``WorkerContext.should_stop``: the flag, or the event itself with ``--local``) where records are
read, and every rank follows its answer (``training.distributed.agree``), so all of them save the same
step and end. A second signal aborts without saving.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any


class StopOnSignal:
    """SIGTERM/SIGINT ask the run to save a checkpoint and exit (at the next step whose records are read,
    every ``train.log_every`` steps); a second signal aborts. ``on_stop`` also tells remote workers."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.on_stop: Callable[[], Any] | None = None
        self._old: dict[int, Any] = {}

    def is_set(self) -> bool:
        return self._event.is_set()

    def __enter__(self):
        self.install()
        return self

    def install(self) -> None:
        """(Again) make ours the handlers: starting Ray installs its own, which end the process."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old = signal.signal(sig, self._handle)
                self._old.setdefault(sig, old)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt
        print(
            f"\n{signal.Signals(signum).name}: saving a checkpoint and exiting (send it again to abort without saving)",
            flush=True,
        )
        self._event.set()
        if self.on_stop is not None:
            self.on_stop()


class StopFlag:
    """A tiny Ray actor: the driver sets it on SIGTERM/SIGINT; rank 0 reads it where records are read."""

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def get(self) -> bool:
        return self.value
