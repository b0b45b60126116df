"""The errors ``fit`` raises on its own (a plugin's exception passes through with a note naming it)."""

from __future__ import annotations

import signal

__all__ = ["NonFiniteLossError", "TrainingInterrupted"]


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or infinite under the ``error`` policy, or too many steps were skipped."""


class TrainingInterrupted(SystemExit):
    """SIGINT or SIGTERM stopped ``fit`` after a finished step.

    A ``SystemExit`` whose code is ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), so
    a script that does not catch it exits with the shell's conventional status.
    """

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.step = step
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return f"training interrupted by {signal.Signals(self.signum).name} after {self.step} completed step(s)"
