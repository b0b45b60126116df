from __future__ import annotations

import pytest

from enginekit import describe_error
from enginekit.plugins import LRWarmup, warmup_lr
from enginekit.testing import drive


def test_warmup_follows_the_books_formula_then_holds_the_peak():
    run = drive(LRWarmup(warmup_steps=20, initial_lr=1e-4), epochs=15, steps_per_epoch=9, lr=1e-2)
    increment = (1e-2 - 1e-4) / 20
    assert run.lrs[:20] == [1e-4 + step * increment for step in range(20)]  # exact, as the book computes it
    assert run.lrs[20:] == [1e-2] * 115  # figure D.1: flat at the peak
    assert len(run.lrs) == 135


def test_pure_function_matches_the_plugin():
    run = drive(LRWarmup(warmup_steps=5, initial_lr=0.0, peak_lr=0.5), steps_per_epoch=8, lr=0.1)
    assert run.lrs[:5] == [warmup_lr(s, 5, 0.0, 0.5) for s in range(5)] == [0.0, 0.1, 0.2, 0.30000000000000004, 0.4]
    assert run.lrs[5:] == [0.5] * 3


def test_warmup_fraction_uses_int_of_fraction_times_total():
    warm = LRWarmup(warmup_fraction=0.2, initial_lr=1e-5)
    drive(warm, epochs=15, steps_per_epoch=9, lr=1e-3)
    assert warm.resolved_steps == 27  # int(0.2 * 135), the book's final run


def test_peak_defaults_to_each_param_groups_lr():
    run = drive(LRWarmup(warmup_steps=2, initial_lr=0.0), steps_per_epoch=4, lr=[0.1, 0.4], param_groups=2)
    assert [s.lrs for s in run.steps] == [[0.0, 0.0], [0.05, 0.2], [0.1, 0.4], [0.1, 0.4]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"warmup_steps": 0}, "warmup_steps must be an int >= 1"),
        ({"warmup_steps": -3}, "warmup_steps must be an int >= 1"),
        ({"warmup_steps": 2.5}, "warmup_steps must be an int"),
        ({}, "give exactly one of warmup_steps and warmup_fraction"),
        ({"warmup_steps": 3, "warmup_fraction": 0.1}, "give exactly one"),
        ({"warmup_fraction": 1.5}, "warmup_fraction must be between 0 and 1"),
        ({"warmup_steps": 3, "initial_lr": -1.0}, "initial_lr must be a finite number >= 0"),
        ({"warmup_steps": 3, "peak_lr": 0.0}, "peak_lr must be a finite number > 0"),
        ({"warmup_steps": 3, "initial_lr": 0.1, "peak_lr": 0.01}, "initial_lr .* must not exceed peak_lr"),
    ],
)
def test_invalid_settings_are_named_when_built(kwargs, match):
    with pytest.raises(ValueError, match=f"LRWarmup: {match}"):
        LRWarmup(**kwargs)


def test_warmup_longer_than_the_run_is_rejected_before_the_first_step():
    with pytest.raises(
        ValueError, match="warmup_steps \\(12\\) must be smaller than the run's total_steps \\(10\\)"
    ) as info:
        drive(LRWarmup(warmup_steps=12), steps_per_epoch=10)
    assert "plugin 'lr_warmup' failed in hook 'before_fit'" in describe_error(info.value)


def test_fraction_giving_less_than_one_step_is_rejected():
    with pytest.raises(ValueError, match="less than one step"):
        drive(LRWarmup(warmup_fraction=0.05), steps_per_epoch=10)


def test_initial_above_the_optimizer_peak_is_rejected_at_fit():
    with pytest.raises(ValueError, match="initial_lr \\(0.5\\) exceeds the peak lr \\(0.1\\)"):
        drive(LRWarmup(warmup_steps=2, initial_lr=0.5), steps_per_epoch=10, lr=0.1)


def test_a_second_fit_plans_from_the_first_peak_not_the_last_lr():
    from enginekit.plugins import CosineDecay, cosine_lr
    from enginekit.testing import make_engine

    engine = make_engine([LRWarmup(warmup_steps=2, initial_lr=0.0), CosineDecay(min_lr=0.0)], steps_per_epoch=4, lr=1.0)
    engine.fit(epochs=1)
    assert engine.optimizer.param_groups[0]["lr"] < 1.0
    engine.fit(epochs=2)
    assert engine.plugins["cosine_decay"].plan["peak_lrs"] == [1.0]
    assert engine.optimizer.param_groups[0]["lr"] == cosine_lr(7, 2, 8, 1.0, 0.0)  # decayed from the same peak
