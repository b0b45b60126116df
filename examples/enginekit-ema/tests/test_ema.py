"""Isolation tests for the EMA plugin, written with enginekit.testing: no GPT, no data."""

from __future__ import annotations

import pytest
import torch
from enginekit_ema import EMA

from enginekit import hookimpl
from enginekit.testing import drive


class WeightLog:
    def __init__(self) -> None:
        self.after: list[torch.Tensor] = []

    @hookimpl
    def after_step(self, engine, loss):
        self.after.append(engine.model.weights[0].detach().clone())


def test_average_follows_the_formula():
    log, ema = WeightLog(), EMA(decay=0.5)
    run = drive([log, ema], steps_per_epoch=4, lr=0.1)
    expected = torch.ones(1)  # the stand-in's initial weight
    for w in log.after:
        expected = 0.5 * expected + 0.5 * w
    torch.testing.assert_close(ema.shadow[0], expected)
    assert ema.updates == 4 and not torch.equal(ema.shadow[0], run.engine.model.weights[0])


def test_swapped_puts_the_average_in_and_restores_the_weights():
    ema = EMA(decay=0.9)
    run = drive(ema, steps_per_epoch=3, lr=0.5)
    model = run.engine.model
    trained = model.weights[0].detach().clone()
    with ema.swapped(model):
        assert torch.equal(model.weights[0], ema.shadow[0])
    assert torch.equal(model.weights[0], trained)


def test_swap_at_end_leaves_the_average_in_the_model():
    ema = EMA(decay=0.9, swap_at_end=True)
    run = drive(ema, steps_per_epoch=3, lr=0.5)
    assert torch.equal(run.engine.model.weights[0], ema.shadow[0])


def test_state_round_trips_and_checks_decay():
    ema = EMA(decay=0.8)
    drive(ema, steps_per_epoch=2)
    clone = EMA(decay=0.8)
    clone.load_state_dict(ema.state_dict())
    assert clone.updates == 2 and torch.equal(clone.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="decay 0.8, this run uses 0.5"):
        EMA(decay=0.5).load_state_dict(ema.state_dict())


def test_invalid_decay():
    with pytest.raises(ValueError, match="EMA: decay must be in"):
        EMA(decay=1.0)


def test_state_survives_a_checkpoint_round_trip(tmp_path):
    from enginekit.plugins import Checkpoint
    from enginekit.testing import make_engine

    first = EMA(decay=0.7)
    drive([first, Checkpoint(tmp_path, every_steps=2)], steps_per_epoch=4, lr=0.3)
    second = EMA(decay=0.7)
    make_engine([second, Checkpoint(tmp_path, resume=True)], steps_per_epoch=4, lr=0.3).fit()
    assert second.updates == 4 and torch.equal(second.shadow[0], first.shadow[0])
