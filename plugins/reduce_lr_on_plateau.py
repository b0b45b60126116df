"""Scale the learning rate down when a monitored evaluation metric stops improving."""

from __future__ import annotations

import math
from typing import Any

from enginekit import Engine
from enginekit.hookspec import hookimpl
from enginekit.plugin_api import check_count, check_number

MODES = ("min", "max")
THRESHOLD_MODES = ("rel", "abs")


def plateau_better(value: float, best: float | None, mode: str, threshold: float, threshold_mode: str) -> bool:
    """torch's ``ReduceLROnPlateau`` rule: ``value`` beats ``best`` by more than ``threshold``
    (relative: ``best * (1 -/+ threshold)``; absolute: ``best -/+ threshold``). NaN never does."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    if mode == "min":
        bar = best * (1.0 - threshold) if threshold_mode == "rel" else best - threshold
        return value < bar
    bar = best * (1.0 + threshold) if threshold_mode == "rel" else best + threshold
    return value > bar


class ReduceLROnPlateau:
    """Multiply the learning rate by ``factor`` once ``monitor`` has not improved for more than
    ``patience`` evaluations, as torch's ``ReduceLROnPlateau``, on top of any schedule.

    It is a modifier: it never writes ``param_groups``. It keeps a scale (1.0 at first) and sets
    ``engine.lr_scales[<its registration name>]``, which the engine multiplies into whatever the
    schedules (LRWarmup, CosineDecay, LRScheduler, yours) set each step, so the reduction holds
    through warmup and decay in every registration order. It reacts to ``after_evaluate``
    (whoever evaluates: LossTracker or your own evaluator), counting from the next step on. Its
    state (best, counters, scale) travels with checkpoints; the scale is not a plan fact, so a
    resumed run neither refuses nor undoes it.

    Args:
        monitor: the metric to watch, a key of an evaluation's results.
        factor: the scale is multiplied by this at each reduction (0 < factor < 1).
        patience: evaluations without improvement tolerated; the next one reduces (>= 0).
        mode: ``"min"`` (lower is better) or ``"max"``.
        threshold: how much better counts as an improvement (>= 0), ...
        threshold_mode: ... relative to the best (``"rel"``) or absolute (``"abs"``).
        cooldown: evaluations after a reduction during which none is counted as bad (>= 0).
        min_scale: the scale never goes below this (>= 0; the lr floor is ``base * min_scale``).
        eps: a reduction smaller than this is skipped, as torch does (>= 0).

    It publishes ``<name>_scale`` (its scale) on the metrics channel at every evaluation it
    judges; ``scale``, ``best``, ``num_bad`` and ``reductions`` (the steps it reduced at) say
    what it saw.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        mode: str = "min",
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_scale: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"ReduceLROnPlateau: monitor must be a metric name, got {monitor!r}")
        check_number("ReduceLROnPlateau: ", "factor", factor, above=0.0)
        if factor >= 1.0:
            raise ValueError(f"ReduceLROnPlateau: factor must be below 1 (it reduces), got {factor!r}")
        check_count("ReduceLROnPlateau: ", "patience", patience, minimum=0)
        if mode not in MODES:
            raise ValueError(f"ReduceLROnPlateau: mode must be one of {MODES}, got {mode!r}")
        check_number("ReduceLROnPlateau: ", "threshold", threshold, minimum=0.0)
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(
                f"ReduceLROnPlateau: threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}"
            )
        check_count("ReduceLROnPlateau: ", "cooldown", cooldown, minimum=0)
        check_number("ReduceLROnPlateau: ", "min_scale", min_scale, minimum=0.0)
        if min_scale > 1.0:
            raise ValueError(f"ReduceLROnPlateau: min_scale must be at most 1, got {min_scale!r}")
        check_number("ReduceLROnPlateau: ", "eps", eps, minimum=0.0)
        self.monitor = monitor
        self.factor = float(factor)
        self.patience = patience
        self.mode = mode
        self.threshold = float(threshold)
        self.threshold_mode = threshold_mode
        self.cooldown = cooldown
        self.min_scale = float(min_scale)
        self.eps = float(eps)
        self.scale = 1.0
        self.best: float | None = None
        self.num_bad = 0
        self.cooldown_left = 0
        self.reductions: list[int] = []

    @hookimpl
    def after_evaluate(self, engine: Engine, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            return  # another evaluator's report
        value = float(metrics[self.monitor])
        if plateau_better(value, self.best, self.mode, self.threshold, self.threshold_mode):
            self.best, self.num_bad = value, 0
        else:
            self.num_bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.num_bad = 0  # as torch: bad evaluations during cooldown do not count
        name = engine.name_of(self)
        if self.num_bad > self.patience:
            new = max(self.scale * self.factor, self.min_scale)
            if self.scale - new > self.eps:
                self.scale = new
                self.reductions.append(engine.state.step)
                engine.lr_scales[name] = self.scale
            self.cooldown_left, self.num_bad = self.cooldown, 0
        engine.metrics.publish(f"{name}_scale", self.scale)

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "best": self.best,
            "num_bad": self.num_bad,
            "cooldown_left": self.cooldown_left,
            "reductions": list(self.reductions),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.best = float(state["scale"]), state["best"]
        self.num_bad, self.cooldown_left = int(state["num_bad"]), int(state["cooldown_left"])
        self.reductions = [int(s) for s in state["reductions"]]
