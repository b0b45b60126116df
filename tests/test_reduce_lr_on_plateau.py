"""ReduceLROnPlateau: torch's plateau rule as a factor on top of any schedule."""

from __future__ import annotations

import random

import pytest
import torch

from enginekit import hookimpl
from enginekit.plugins import LRWarmup, ReduceLROnPlateau, plateau_better
from enginekit.testing import drive


def torch_lrs(values: list[float], steps: int, **kwargs) -> list[float]:
    """The lr of each step of the usual loop: evaluate at the end of step s, scheduler.step(value)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    lrs = []
    for step in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(values[step])
    return lrs


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "min", "factor": 0.5, "patience": 1},
        {"mode": "max", "factor": 0.3, "patience": 0, "threshold_mode": "abs", "threshold": 0.05},
        {"mode": "min", "factor": 0.5, "patience": 0, "cooldown": 2, "threshold": 0.0},
    ],
)
def test_matches_torchs_reduce_lr_on_plateau_step_by_step(settings):
    rng = random.Random(0)
    values = [rng.uniform(1.0, 2.0) for _ in range(20)]
    torch_kwargs = {k.replace("min_scale", "min_lr"): v for k, v in settings.items()}
    want = torch_lrs(values, 20, **torch_kwargs)
    evaluations = {s: {"val_loss": v} for s, v in enumerate(values)}
    run = drive(ReduceLROnPlateau(**settings), steps_per_epoch=20, lr=1.0, evaluations=evaluations)
    assert run.lrs == pytest.approx(want, rel=1e-12)
    assert len(set(want)) > 2  # the case reduces more than once


def test_min_scale_is_a_floor_and_other_evaluators_are_ignored():
    class Other:
        @hookimpl
        def after_step(self, engine, loss):
            engine.publish_evaluation({"accuracy": 0.5})

    plateau = ReduceLROnPlateau(factor=0.5, patience=0, min_scale=0.2)
    run = drive([plateau, Other()], steps_per_epoch=8, lr=1.0, evaluations=lambda s: {"val_loss": 1.0})
    assert run.lrs == [1.0, 1.0, 0.5, 0.25, 0.2, 0.2, 0.2, 0.2]
    assert plateau.reductions == [1, 2, 3] and run.engine.metrics["reduce_lr_on_plateau_scale"] == 0.2


def test_scales_the_warmup_instead_of_fighting_it():
    run = drive(
        [ReduceLROnPlateau(factor=0.5, patience=0), LRWarmup(warmup_steps=4, initial_lr=0.0)],
        steps_per_epoch=6,
        lr=1.0,
        evaluations={0: {"val_loss": 1.0}, 1: {"val_loss": 1.5}},
    )
    assert run.lrs == [0.0, 0.25, 0.25, 0.375, 0.5, 0.5]  # the warmup's own shape, halved from step 2


def test_state_round_trips():
    first = ReduceLROnPlateau(factor=0.5, patience=0, cooldown=1)
    drive(first, steps_per_epoch=4, evaluations=lambda s: {"val_loss": 1.0 + s})
    second = ReduceLROnPlateau(factor=0.5, patience=0, cooldown=1)
    second.load_state_dict(first.state_dict())
    assert second.state_dict() == first.state_dict() and second.scale == first.scale < 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"factor": 1.0}, "factor must be below 1"),
        ({"factor": 0.0}, "factor must be a finite number > 0.0"),
        ({"patience": -1}, "patience must be an int >= 0"),
        ({"mode": "lowest"}, "mode must be one of"),
        ({"threshold_mode": "pct"}, "threshold_mode must be one of"),
        ({"min_scale": 2.0}, "min_scale must be at most 1"),
        ({"monitor": ""}, "monitor must be a metric name"),
    ],
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=f"ReduceLROnPlateau: {match}"):
        ReduceLROnPlateau(**kwargs)


def test_plateau_better_is_torchs_rule():
    assert plateau_better(0.9, 1.0, "min", 0.05, "rel") and not plateau_better(0.96, 1.0, "min", 0.05, "rel")
    assert plateau_better(1.2, 1.0, "max", 0.1, "abs") and not plateau_better(1.05, 1.0, "max", 0.1, "abs")
    assert not plateau_better(float("nan"), None, "min", 0.0, "rel") and plateau_better(5.0, None, "min", 0.0, "rel")
