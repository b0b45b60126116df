"""Half-cosine learning-rate decay, appendix D.2 of the book."""

from __future__ import annotations

import math
from typing import Any

from enginekit import Engine
from enginekit.hookspec import hookimpl
from enginekit.plugin_api import check_number


def cosine_lr(step: int, warmup_steps: int, total_steps: int, peak_lr: float, min_lr: float) -> float:
    """The book's cosine phase, for ``step >= warmup_steps``::

    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    lr = min_lr + (peak_lr - min_lr) * 0.5 * (1 + cos(pi * progress))
    """
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class CosineDecay:
    """Decay the learning rate from the peak to ``min_lr`` along a half cosine.

    It decays over the steps from ``engine.state.warmup_steps`` (published by whichever warmup
    is registered, built-in or not; 0 without one, so alone it decays from step 0) to
    ``engine.state.total_steps``: with a warmup, in either registration order, the D.2 curve.
    It publishes ``engine.state.lr_decay`` in ``before_fit``, so a warmup knows not to hold the
    peak (and a second decay schedule, registered before or after it, is refused). It keeps no
    state of its own: a resumed run's plan is checked against the checkpoint's by :class:`Checkpoint`.

    Args:
        min_lr: learning rate the cosine approaches at the end of the run (>= 0).
        peak_lr: where the decay starts; ``None`` takes ``engine.state.peak_lrs`` (each group's
            lr at the start of fit, or the peak a warmup was given).
    """

    def __init__(self, min_lr: float, peak_lr: float | None = None) -> None:
        check_number("CosineDecay: ", "min_lr", min_lr, minimum=0.0)
        if peak_lr is not None:
            check_number("CosineDecay: ", "peak_lr", peak_lr, above=0.0)
        if peak_lr is not None and min_lr > peak_lr:
            raise ValueError(f"CosineDecay: min_lr ({min_lr}) must not exceed peak_lr ({peak_lr})")
        self.min_lr = float(min_lr)
        self.peak_lr = peak_lr
        self.plan: dict[str, Any] = {}
        self._published_peaks: list[float] | None = None
        self._first_step = True

    @hookimpl
    def before_fit(self, engine: Engine) -> None:
        st = engine.state
        st.lr_decay = engine.name_of(self)  # a second decay, before or after this one, is refused by TrainState
        self._published_peaks = None
        if self.peak_lr is not None:
            self._published_peaks = st.peak_lrs = [float(self.peak_lr)] * len(engine.optimizer.param_groups)
        self._first_step = True

    @hookimpl
    def before_step(self, engine: Engine, batch: Any) -> None:
        st = engine.state
        if self._first_step:  # the other plugins' facts are final now
            self._validate(st.warmup_steps, st.total_steps, st.peak_lrs)
            self._first_step = False
        step, warmup = st.step, st.warmup_steps
        if step >= warmup:
            for group, peak in zip(engine.optimizer.param_groups, st.peak_lrs):
                group["lr"] = cosine_lr(step, warmup, st.total_steps, peak, self.min_lr)

    def _validate(self, warmup_steps: int, total_steps: int, peak_lrs: list[float]) -> None:
        if self._published_peaks is not None and peak_lrs != self._published_peaks:
            raise ValueError(
                f"CosineDecay: peak_lr ({self.peak_lr}) differs from the peak another plugin published "
                f"({peak_lrs}); set peak_lr on one plugin only"
            )
        for peak in peak_lrs:
            if self.min_lr > peak:
                raise ValueError(f"CosineDecay: min_lr ({self.min_lr}) exceeds the peak lr ({peak})")
        self.plan = {"warmup_steps": warmup_steps, "total_steps": total_steps, "peak_lrs": list(peak_lrs)}
