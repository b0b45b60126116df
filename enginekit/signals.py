"""SIGINT/SIGTERM during ``fit``: stop after the current step, not in the middle of it."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .errors import TrainingAborted

__all__ = ["StopSignals"]


class StopSignals:
    """While installed, the first SIGINT/SIGTERM is only remembered (``received``), so the loop
    can finish the step, save and raise; a second one aborts at once (:class:`~enginekit.errors.TrainingAborted`, a
    ``KeyboardInterrupt`` that names the signal).
    The previous handlers come back when the ``with`` block ends."""

    def __init__(self, announce: Callable[[str], None]) -> None:
        self.received: int | None = None
        self._announce = announce

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise TrainingAborted(signum)
        self.received = signum
        self._announce(f"enginekit: {signal.Signals(signum).name} received, stopping after the current step")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        self.received = None
        if threading.current_thread() is not threading.main_thread():  # only the main thread may
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
