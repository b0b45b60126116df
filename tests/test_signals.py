"""SIGINT and SIGTERM during fit (enginekit/signals.py)."""

from __future__ import annotations

import signal

import pytest

from enginekit import hookimpl
from enginekit.testing import HookRecorder, drive, make_engine


def test_signal_handlers_are_restored_after_fit():
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    inside = []

    class Look:
        @hookimpl
        def after_step(self, engine, loss):
            inside.append(signal.getsignal(signal.SIGTERM))

    drive(Look(), steps_per_epoch=2)
    assert inside[0] is not before[1]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_finishes_the_step_then_raises_training_interrupted():
    from enginekit import TrainingInterrupted

    class Kill:
        @hookimpl
        def after_backward(self, engine):
            if engine.state.step == 1:
                signal.raise_signal(signal.SIGTERM)

    engine = make_engine([Kill()], steps_per_epoch=5)
    rec = HookRecorder(engine)
    with pytest.raises(TrainingInterrupted) as info:
        engine.fit()
    assert info.value.code == 143 and info.value.exit_code == 143
    assert engine.state.step == 2  # step 1 finished
    assert rec.hooks[-6:] == [
        *["after_backward", "before_optimizer_step", "after_step"],
        *["on_save_point", "on_save_point", "on_exception"],
    ]
    assert [c.kwargs["reason"] for c in rec.calls[-3:-1]] == ["step", "signal"]


def test_a_second_signal_aborts_at_once_even_during_set_up_or_resume_loading():
    class TwoTerms:
        @hookimpl
        def before_fit(self, engine):
            signal.raise_signal(signal.SIGTERM)  # deferred: remembered, the hook goes on
            signal.raise_signal(signal.SIGTERM)  # the second one aborts right here
            raise AssertionError("not reached")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        drive([TwoTerms()], steps_per_epoch=2)
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are restored after the abort too
