from __future__ import annotations

import math

import pytest

from enginekit.plugins import CosineDecay, LRWarmup, cosine_lr, warmup_lr
from enginekit.testing import drive


def book_schedule(total: int, warmup: int, initial: float, peak: float, minimum: float) -> list[float]:
    """Appendix D's train_model schedule, written from its formulas."""
    out = []
    increment = (peak - initial) / warmup
    for step in range(total):
        if step < warmup:
            out.append(initial + step * increment)
        else:
            progress = (step - warmup) / (total - warmup)
            out.append(minimum + (peak - minimum) * 0.5 * (1 + math.cos(math.pi * progress)))
    return out


@pytest.mark.parametrize("order", ["warmup_first", "cosine_first"])
def test_warmup_plus_cosine_is_the_d2_curve_in_either_order(order):
    plugins = [LRWarmup(warmup_steps=20, initial_lr=1e-4), CosineDecay(min_lr=1e-5)]
    if order == "cosine_first":
        plugins.reverse()
    run = drive(plugins, epochs=15, steps_per_epoch=9, lr=1e-2)
    assert run.lrs == book_schedule(135, 20, 1e-4, 1e-2, 1e-5)  # bit for bit
    assert run.lrs[20] == 1e-2 and max(run.lrs) == 1e-2
    assert 1e-5 < run.lrs[-1] < 1.2e-5  # approaches min_lr; the book's last step stops short of it


def test_cosine_alone_decays_from_step_zero():
    run = drive(CosineDecay(min_lr=0.0), steps_per_epoch=10, lr=1.0)
    assert run.lrs == [cosine_lr(s, 0, 10, 1.0, 0.0) for s in range(10)]
    assert run.lrs[0] == 1.0 and run.lrs[5] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(run.lrs, run.lrs[1:]))


def test_cosine_takes_the_peak_set_on_warmup():
    run = drive(
        [CosineDecay(min_lr=0.0), LRWarmup(warmup_steps=2, initial_lr=0.0, peak_lr=0.5)], steps_per_epoch=6, lr=0.1
    )
    assert run.lrs[:2] == [warmup_lr(s, 2, 0.0, 0.5) for s in range(2)]
    assert run.lrs[2] == 0.5


def test_conflicting_peaks_are_an_error():
    for order in (1, -1):
        plugins = [CosineDecay(min_lr=0.0, peak_lr=0.2), LRWarmup(warmup_steps=2, peak_lr=0.5)][::order]
        with pytest.raises(ValueError, match="peak_lr \\(0.[25]\\) differs from the peak another plugin published"):
            drive(plugins, steps_per_epoch=6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_lr": -1.0}, "min_lr must be a finite number >= 0"),
        ({"min_lr": 0.1, "peak_lr": 0.01}, "min_lr \\(0.1\\) must not exceed peak_lr \\(0.01\\)"),
        ({"min_lr": 0.0, "peak_lr": -2.0}, "peak_lr must be a finite number > 0"),
    ],
)
def test_invalid_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=f"CosineDecay: {match}"):
        CosineDecay(**kwargs)


def test_min_lr_above_the_optimizer_lr_is_rejected_at_fit():
    with pytest.raises(ValueError, match="min_lr \\(0.5\\) exceeds the peak lr \\(0.1\\)"):
        drive(CosineDecay(min_lr=0.5), lr=0.1)
