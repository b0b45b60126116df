"""Linear learning-rate warmup, appendix D.1 of the book."""

from __future__ import annotations

from typing import Any

from enginekit.engine import Engine
from enginekit.hookspec import hookimpl


def warmup_lr(step: int, warmup_steps: int, initial_lr: float, peak_lr: float) -> float:
    """The book's warmup: ``initial_lr + step * (peak_lr - initial_lr) / warmup_steps`` for ``step < warmup_steps``.

    The increment is computed first, as in the book, so values match it to the last bit.
    """
    increment = (peak_lr - initial_lr) / warmup_steps
    return initial_lr + step * increment


def set_lr(engine: Engine, lrs: list[float]) -> None:
    """Write one learning rate per optimizer parameter group."""
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr


def optimizer_lrs(engine: Engine) -> list[float]:
    """Each group's lr as first seen by a schedule, kept as ``initial_lr`` in the group (as torch's
    schedulers do), so a second ``fit`` or a resumed run plans from the same peak, not the last lr."""
    return [float(group.setdefault("initial_lr", group["lr"])) for group in engine.optimizer.param_groups]


class LRWarmup:
    """Raise the learning rate linearly from ``initial_lr`` to ``peak_lr`` over the first steps.

    Args:
        warmup_steps: steps of warmup (>= 1); or give ``warmup_fraction`` instead.
        initial_lr: learning rate of step 0 (default 3e-5, the book's ``train_model`` default).
        peak_lr: learning rate reached after warmup; ``None`` takes each parameter group's lr
            at the start of fit.
        warmup_fraction: warmup as a fraction of the run's total steps, ``int(f * total)`` as
            the book computes it (appendix D uses 0.2).

    After warmup it holds ``peak_lr``, unless a decay schedule is registered (any plugin with
    ``decays_after_warmup = True``, such as :class:`CosineDecay`), which then owns those steps.
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
        if warmup_steps is not None and (
            isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1
        ):
            raise ValueError(f"LRWarmup: warmup_steps must be an int >= 1, got {warmup_steps!r}")
        if warmup_fraction is not None and not 0.0 < warmup_fraction < 1.0:
            raise ValueError(f"LRWarmup: warmup_fraction must be between 0 and 1, got {warmup_fraction!r}")
        if initial_lr < 0:
            raise ValueError(f"LRWarmup: initial_lr must be >= 0, got {initial_lr!r}")
        if peak_lr is not None and peak_lr <= 0:
            raise ValueError(f"LRWarmup: peak_lr must be > 0, got {peak_lr!r}")
        if peak_lr is not None and initial_lr > peak_lr:
            raise ValueError(f"LRWarmup: initial_lr ({initial_lr}) must not exceed peak_lr ({peak_lr})")
        self.warmup_steps = warmup_steps
        self.warmup_fraction = warmup_fraction
        self.initial_lr = float(initial_lr)
        self.peak_lr = peak_lr
        self.peak_lrs: list[float] = []
        self.resolved_steps = 0
        self._hold = True

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
        self.resolved_steps = self.resolve_steps(engine.state.total_steps)
        self.peak_lrs = (
            [float(self.peak_lr)] * len(engine.optimizer.param_groups) if self.peak_lr else optimizer_lrs(engine)
        )
        for peak in self.peak_lrs:
            if self.initial_lr > peak:
                raise ValueError(f"LRWarmup: initial_lr ({self.initial_lr}) exceeds the peak lr ({peak})")
        self._hold = not any(getattr(p, "decays_after_warmup", False) for p in engine.plugins.values())

    @hookimpl
    def before_step(self, engine: Engine, batch: Any) -> None:
        step = engine.state.step
        if step < self.resolved_steps:
            set_lr(engine, [warmup_lr(step, self.resolved_steps, self.initial_lr, peak) for peak in self.peak_lrs])
        elif self._hold:
            set_lr(engine, self.peak_lrs)

    def state_dict(self) -> dict[str, Any]:
        return {"peak_lrs": list(self.peak_lrs), "warmup_steps": self.resolved_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.resolved_steps and int(state["warmup_steps"]) != self.resolved_steps:
            raise ValueError(
                f"LRWarmup: the checkpoint's run warms up for {state['warmup_steps']} steps, this run for "
                f"{self.resolved_steps}; resume with the same warmup and run length"
            )
        # The saved peak wins, so a resumed run keeps its schedule even if the optimizer was rebuilt.
        self.peak_lrs = list(state["peak_lrs"])
        self.resolved_steps = int(state["warmup_steps"])
