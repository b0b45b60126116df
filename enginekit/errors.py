"""The errors ``fit`` raises on its own (a plugin's exception passes through with a note naming it)."""

from __future__ import annotations

import signal

__all__ = ["NonFiniteLossError", "TrainingAborted", "TrainingInterrupted"]


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


class TrainingAborted(KeyboardInterrupt):
    """A second SIGINT or SIGTERM during ``fit``: stopped at once, without finishing the step or
    the checkpoint write in progress (an abandoned write leaves no temporary file behind).

    A ``KeyboardInterrupt`` (so code that catches Ctrl-C still catches it) that knows which
    signal it was: ``exit_code`` is ``128 + signal number``, 130 for SIGINT, 143 for SIGTERM.
    """

    def __init__(self, signum: int, second: bool = True) -> None:
        super().__init__(signum)
        self.signum = signum
        self.signame = signal.Signals(signum).name
        self.exit_code = 128 + signum
        self.second = second  # False: the first signal, outside fit (a script's own handler)

    def __str__(self) -> str:
        if not self.second:
            return f"stopped by {self.signame} outside training"
        return f"training aborted by a second {self.signame}: stopped at once, the step or save in progress unfinished"
