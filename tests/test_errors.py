"""The errors fit raises on its own (enginekit/errors.py)."""

from __future__ import annotations

import signal

import pytest

from enginekit import NonFiniteLossError, TrainingInterrupted


@pytest.mark.parametrize("signum, code, name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_training_interrupted_exits_with_the_shells_status(signum, code, name):
    error = TrainingInterrupted(signum, step=12)
    assert isinstance(error, SystemExit) and error.code == code and error.exit_code == code
    assert (error.signum, error.step) == (signum, 12)
    assert str(error) == f"training interrupted by {name} after 12 completed step(s)"


def test_a_non_finite_loss_is_a_floating_point_error():
    assert issubclass(NonFiniteLossError, FloatingPointError)
    with pytest.raises(ArithmeticError):  # what a generic numeric handler catches
        raise NonFiniteLossError("loss is nan at step 3")
