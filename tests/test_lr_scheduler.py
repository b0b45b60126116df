"""LRScheduler: any torch scheduler as a schedule or as a modifier, saved and restored."""

from __future__ import annotations

import signal
from itertools import permutations

import pytest
import torch
from torch.optim import lr_scheduler as torch_sched

from enginekit import TrainingInterrupted, hookimpl
from enginekit.plugins import Checkpoint, CosineDecay, LRScheduler, LRWarmup, ReduceLROnPlateau, cosine_lr, warmup_lr
from enginekit.testing import HookRecorder, drive, make_engine


def hand_loop_lrs(make, steps: int) -> list[float]:
    """The usual loop: the lr of step s is the scheduler's after s calls of step()."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch_sched.LambdaLR(opt, lambda e: 0.5**e),
        lambda opt: torch_sched.OneCycleLR(opt, max_lr=2.0, total_steps=10, cycle_momentum=False),
        lambda opt: torch_sched.LinearLR(opt, start_factor=0.1, total_iters=6),  # chainable: from the last lr
    ],
    ids=["LambdaLR", "OneCycleLR", "LinearLR"],
)
def test_as_a_schedule_it_gives_the_hand_loops_lrs(make):
    run = drive(LRScheduler(lambda opt, st: make(opt)), steps_per_epoch=10, lr=1.0)
    assert run.lrs == pytest.approx(hand_loop_lrs(make, 10), rel=1e-12)


def test_the_factory_gets_the_runs_totals():
    seen = []

    def factory(opt, state):
        seen.append(state.total_steps)
        return torch_sched.OneCycleLR(opt, max_lr=1.0, total_steps=state.total_steps, cycle_momentum=False)

    drive(LRScheduler(factory), epochs=3, steps_per_epoch=4)
    assert seen == [12]


def test_as_a_modifier_it_scales_warmup_and_cosine_in_every_order():
    for order in permutations(range(3)):
        chosen = [
            LRWarmup(warmup_steps=2, initial_lr=0.0),
            CosineDecay(min_lr=0.0),
            LRScheduler(lambda opt, st: torch_sched.LambdaLR(opt, lambda e: 0.9**e), role="modifier"),
        ]
        run = drive([chosen[j] for j in order], steps_per_epoch=6, lr=1.0)
        base = [warmup_lr(s, 2, 0.0, 1.0) if s < 2 else cosine_lr(s, 2, 6, 1.0, 0.0) for s in range(6)]
        assert run.lrs == pytest.approx([b * 0.9**s for s, b in enumerate(base)], rel=1e-12), order


def test_torchs_plateau_fed_from_evaluations_equals_the_built_in():
    values = {s: v for s, v in enumerate([2.0, 2.1, 2.2, 1.0, 1.5, 1.6, 1.7, 1.8])}
    evaluations = {s: {"val_loss": v} for s, v in values.items()}
    torch_plateau = LRScheduler(
        lambda opt, st: torch_sched.ReduceLROnPlateau(opt, factor=0.5, patience=1), role="modifier", monitor="val_loss"
    )
    run = drive([torch_plateau, LRWarmup(warmup_steps=3, initial_lr=0.0)], steps_per_epoch=8, evaluations=evaluations)
    ours = drive(
        [ReduceLROnPlateau(factor=0.5, patience=1), LRWarmup(warmup_steps=3, initial_lr=0.0)],
        steps_per_epoch=8,
        evaluations=evaluations,
    )
    assert run.lrs == ours.lrs and min(run.lrs[3:]) < max(run.lrs)


class Kill:
    def __init__(self, at_step: int) -> None:
        self._at = at_step

    @hookimpl
    def after_backward(self, engine):
        if engine.state.step == self._at:
            signal.raise_signal(signal.SIGTERM)


@pytest.mark.parametrize("role", ["schedule", "modifier"])
def test_resumed_equals_uninterrupted(tmp_path, role):
    def plugins(folder, resume=False) -> list:
        make = lambda opt, st: torch_sched.LinearLR(opt, start_factor=0.1, total_iters=6)  # noqa: E731
        extra = [] if role == "schedule" else [CosineDecay(min_lr=0.0)]
        return [LRScheduler(make, role=role), *extra, Checkpoint(folder, resume=resume, async_write=False)]

    whole = drive(plugins(tmp_path / "whole"), steps_per_epoch=10, lr=1.0)
    cut = make_engine([*plugins(tmp_path / "cut"), Kill(3)], steps_per_epoch=10, lr=1.0)
    first = HookRecorder(cut)
    with pytest.raises(TrainingInterrupted):
        cut.fit()
    resumed = make_engine(plugins(tmp_path / "cut", resume=True), steps_per_epoch=10, lr=1.0)
    second = HookRecorder(resumed)
    resumed.fit()
    assert first.lrs + second.lrs == whole.lrs and len(second.lrs) == 6


@pytest.mark.parametrize(
    "plugins, match",
    [
        (
            [LRScheduler(lambda o, s: torch_sched.LambdaLR(o, lambda e: 1.0)), LRWarmup(warmup_steps=2)],
            "as a schedule it sets the lr of every step, but a warmup of 2 steps is published too",
        ),
        (
            [LRScheduler(lambda o, s: torch_sched.ReduceLROnPlateau(o), role="modifier")],
            "a ReduceLROnPlateau steps with an evaluation metric: pass monitor=",
        ),
        ([LRScheduler(lambda o, s: o)], "factory returned SGD, not a torch.optim.lr_scheduler scheduler"),
        (
            [LRScheduler(lambda o, s: torch_sched.LambdaLR(o, lambda e: 1.0)), CosineDecay(min_lr=0.0)],
            "plan fact TrainState.lr_decay has two owners",
        ),
    ],
)
def test_misuse_is_one_clear_line(plugins, match):
    for order in (plugins, plugins[::-1]):
        with pytest.raises(ValueError, match=match):
            drive(list(order), steps_per_epoch=4)


def test_invalid_settings():
    with pytest.raises(ValueError, match="LRScheduler: role must be one of"):
        LRScheduler(lambda o, s: None, role="decay")
    with pytest.raises(ValueError, match="monitor .* needs role='modifier'"):
        LRScheduler(lambda o, s: None, monitor="val_loss")
    with pytest.raises(ValueError, match="factory must be callable"):
        LRScheduler(None)
