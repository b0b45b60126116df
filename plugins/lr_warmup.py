"""Linear learning-rate warmup, appendix D.1 of the book."""

from __future__ import annotations

from typing import Any

from enginekit import Engine
from enginekit.hookspec import hookimpl
from enginekit.plugin_api import check_count, check_number


def warmup_lr(step: int, warmup_steps: int, initial_lr: float, peak_lr: float) -> float:
    """The book's warmup: ``initial_lr + step * (peak_lr - initial_lr) / warmup_steps`` for ``step < warmup_steps``.

    The increment is computed first, as in the book, so values match it to the last bit.
    """
    increment = (peak_lr - initial_lr) / warmup_steps
    return initial_lr + step * increment


class LRWarmup:
    """Raise the learning rate linearly from ``initial_lr`` to the peak over the first steps.

    Args:
        warmup_steps: steps of warmup (>= 1); or give ``warmup_fraction`` instead.
        initial_lr: learning rate of step 0 (default 3e-5, the book's ``train_model`` default).
        peak_lr: learning rate reached after warmup; ``None`` takes each parameter group's lr
            at the start of fit (``engine.state.peak_lrs``).
        warmup_fraction: warmup as a fraction of the run's total steps, ``int(f * total)`` as
            the book computes it (appendix D uses 0.2).

    It owns the plan fact ``engine.state.warmup_steps`` (and ``peak_lrs`` when ``peak_lr`` is
    given), published in ``before_fit``: decays start after it and ``GradClip("after_warmup")``
    clips from it, without knowing this plugin. It keeps no state of its own: a resumed run's
    plan (``warmup_steps``, ``peak_lrs``) is checked against the checkpoint's by
    :class:`Checkpoint`. After warmup it holds the peak, unless a decay
    schedule has published ``engine.state.lr_decay`` (such as :class:`CosineDecay`), which
    then owns those steps.
    """

    def __init__(
        self,
        warmup_steps: int | None = None,
        initial_lr: float = 3e-5,
        peak_lr: float | None = None,
        *,
        warmup_fraction: float | None = None,
    ) -> None:
        if (warmup_steps is None) == (warmup_fraction is None):
            raise ValueError("LRWarmup: give exactly one of warmup_steps and warmup_fraction")
        if warmup_steps is not None:
            check_count("LRWarmup: ", "warmup_steps", warmup_steps)
        if warmup_fraction is not None and not 0.0 < warmup_fraction < 1.0:  # NaN fails too
            raise ValueError(f"LRWarmup: warmup_fraction must be between 0 and 1, got {warmup_fraction!r}")
        check_number("LRWarmup: ", "initial_lr", initial_lr, minimum=0.0)
        if peak_lr is not None:
            check_number("LRWarmup: ", "peak_lr", peak_lr, above=0.0)
        if peak_lr is not None and initial_lr > peak_lr:
            raise ValueError(f"LRWarmup: initial_lr ({initial_lr}) must not exceed peak_lr ({peak_lr})")
        self.warmup_steps = warmup_steps
        self.warmup_fraction = warmup_fraction
        self.initial_lr = float(initial_lr)
        self.peak_lr = peak_lr
        self.resolved_steps = 0
        self.peak_lrs: list[float] = []
        self._published_peaks: list[float] | None = None
        self._first_step = True

    def resolve_steps(self, total_steps: int) -> int:
        """Warmup length for a run of ``total_steps``, validated against it."""
        steps = self.warmup_steps if self.warmup_steps is not None else int(self.warmup_fraction * total_steps)  # type: ignore[operator]
        if steps < 1:
            raise ValueError(
                f"LRWarmup: warmup_fraction {self.warmup_fraction} of {total_steps} total steps is "
                "less than one step; raise warmup_fraction or use warmup_steps"
            )
        if steps >= total_steps:
            raise ValueError(
                f"LRWarmup: warmup_steps ({steps}) must be smaller than the run's total_steps "
                f"({total_steps}); shorten the warmup or train longer"
            )
        return steps

    @hookimpl
    def before_fit(self, engine: Engine) -> None:
        st = engine.state
        self.resolved_steps = st.warmup_steps = self.resolve_steps(st.total_steps)
        self._published_peaks = None
        if self.peak_lr is not None:
            self._published_peaks = st.peak_lrs = [float(self.peak_lr)] * len(engine.optimizer.param_groups)
        self._first_step = True

    @hookimpl
    def before_step(self, engine: Engine, batch: Any) -> None:
        st = engine.state
        if self._first_step:  # the other plugins' facts are final now
            self._validate(st.peak_lrs)
            self.peak_lrs, self._first_step = list(st.peak_lrs), False
        step = st.step
        if step < self.resolved_steps:
            lrs = [warmup_lr(step, self.resolved_steps, self.initial_lr, peak) for peak in st.peak_lrs]
        elif st.lr_decay is None:
            lrs = st.peak_lrs
        else:
            return
        for group, lr in zip(engine.optimizer.param_groups, lrs):
            group["lr"] = lr

    def _validate(self, peak_lrs: list[float]) -> None:
        if self._published_peaks is not None and peak_lrs != self._published_peaks:
            raise ValueError(
                f"LRWarmup: peak_lr ({self.peak_lr}) differs from the peak another plugin published "
                f"({peak_lrs}); set peak_lr on one plugin only"
            )
        for peak in peak_lrs:
            if self.initial_lr > peak:
                raise ValueError(f"LRWarmup: initial_lr ({self.initial_lr}) exceeds the peak lr ({peak})")
