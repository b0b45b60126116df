"""The non-finite loss policy: error before the update, or skip and retry (enginekit/nonfinite.py)."""

from __future__ import annotations

import pytest
import torch

from enginekit import NonFiniteLossError, hookimpl
from enginekit.testing import HookRecorder, drive, make_engine


def test_nonfinite_loss_error_policy_stops_before_the_update():
    losses = [1.0, 1.0, float("nan"), 1.0]
    engine = make_engine([], steps_per_epoch=4, losses=losses)
    rec = HookRecorder(engine)
    before = None

    class Snap:
        @hookimpl
        def after_step(self, engine, loss):
            nonlocal before
            before = [p.detach().clone() for p in engine.model.parameters()]

    engine.register(Snap())
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2"):
        engine.fit()
    assert rec.hooks[-2:] == ["before_step", "on_exception"]  # no after_backward, no update
    assert all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))
    assert engine.state.step == 2


def test_nonfinite_loss_skip_policy_retries_the_step_with_the_next_batch():
    losses = {2: float("inf")}
    run = drive([], steps_per_epoch=5, losses=lambda step: losses.pop(step, 1.0), nonfinite="skip")
    # the batch of the skipped attempt is consumed: 5 batches give 4 steps, indices unbroken
    assert [s.step for s in run.steps] == [0, 1, 2, 3]
    assert run.hooks.count("before_step") == 5


def test_nonfinite_skip_gives_up_after_max_skips():
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        drive(
            [],
            steps_per_epoch=10,
            losses=lambda step: float("nan") if step >= 1 else 1.0,
            nonfinite="skip",
            max_skips=3,
        )
