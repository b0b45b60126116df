"""Half-cosine learning-rate decay, appendix D.2 of the book."""

from __future__ import annotations

import math
from typing import Any

from enginekit.engine import Engine
from enginekit.hookspec import hookimpl

from .lr_warmup import LRWarmup, optimizer_lrs, set_lr


def cosine_lr(step: int, warmup_steps: int, total_steps: int, peak_lr: float, min_lr: float) -> float:
    """The book's cosine phase, for ``step >= warmup_steps``::

    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    lr = min_lr + (peak_lr - min_lr) * 0.5 * (1 + cos(pi * progress))
    """
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class CosineDecay:
    """Decay the learning rate from ``peak_lr`` to ``min_lr`` along a half cosine.

    Alone it decays from step 0. With :class:`LRWarmup` registered (in either order) it decays
    over the steps after warmup and leaves the warmup steps to it: the D.2 curve.

    Args:
        min_lr: learning rate the cosine approaches at the end of the run (>= 0).
        peak_lr: where the decay starts; ``None`` takes LRWarmup's ``peak_lr`` if it set one,
            else each parameter group's lr at the start of fit.
    """

    #: Tells LRWarmup that this plugin sets the learning rate after warmup.
    decays_after_warmup = True

    def __init__(self, min_lr: float, peak_lr: float | None = None) -> None:
        if min_lr < 0:
            raise ValueError(f"CosineDecay: min_lr must be >= 0, got {min_lr!r}")
        if peak_lr is not None and peak_lr <= 0:
            raise ValueError(f"CosineDecay: peak_lr must be > 0, got {peak_lr!r}")
        if peak_lr is not None and min_lr > peak_lr:
            raise ValueError(f"CosineDecay: min_lr ({min_lr}) must not exceed peak_lr ({peak_lr})")
        self.min_lr = float(min_lr)
        self.peak_lr = peak_lr
        self.peak_lrs: list[float] = []
        self.warmup_steps = 0
        self.total_steps = 0

    @hookimpl
    def before_fit(self, engine: Engine) -> None:
        warmup = engine.find_plugin(LRWarmup)
        self.total_steps = engine.state.total_steps
        self.warmup_steps = warmup.resolve_steps(self.total_steps) if warmup is not None else 0
        peak = self.peak_lr
        if warmup is not None and warmup.peak_lr is not None:
            if peak is not None and peak != warmup.peak_lr:
                raise ValueError(
                    f"CosineDecay: peak_lr ({peak}) differs from LRWarmup's peak_lr ({warmup.peak_lr}); "
                    "set it on one of them only"
                )
            peak = warmup.peak_lr
        n_groups = len(engine.optimizer.param_groups)
        self.peak_lrs = [float(peak)] * n_groups if peak is not None else optimizer_lrs(engine)
        for p in self.peak_lrs:
            if self.min_lr > p:
                raise ValueError(f"CosineDecay: min_lr ({self.min_lr}) exceeds the peak lr ({p})")

    @hookimpl
    def before_step(self, engine: Engine, batch: Any) -> None:
        step = engine.state.step
        if step >= self.warmup_steps:
            set_lr(
                engine, [cosine_lr(step, self.warmup_steps, self.total_steps, p, self.min_lr) for p in self.peak_lrs]
            )

    def state_dict(self) -> dict[str, Any]:
        return {"peak_lrs": list(self.peak_lrs), "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (int(state["warmup_steps"]), int(state["total_steps"]))
        if self.total_steps and saved != (self.warmup_steps, self.total_steps):
            raise ValueError(
                f"CosineDecay: the checkpoint's run decays over steps {saved[0]}-{saved[1]}, this run over "
                f"{self.warmup_steps}-{self.total_steps}; resume with the same epochs/max_steps and warmup"
            )
        self.peak_lrs = list(state["peak_lrs"])
        self.warmup_steps = int(state["warmup_steps"])
        self.total_steps = int(state["total_steps"])
