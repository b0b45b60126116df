"""Stop training when a monitored evaluation metric stops improving."""

from __future__ import annotations

import math
from typing import Any

from enginekit import Engine
from enginekit.hookspec import hookimpl
from enginekit.plugin_api import check_count, check_number

MODES = ("min", "max")


def improved(value: float, best: float | None, min_delta: float, mode: str) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (NaN never does)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping:
    """End the run once ``monitor`` has not improved for ``patience`` evaluations in a row.

    It reacts to ``after_evaluate``: whoever evaluates (LossTracker, your own evaluator) reports
    through the engine, so it needs no other plugin and is right in any registration order.
    The stop takes effect after the current step (``engine.state.should_stop``), and the step's
    checkpoint holds the decision: a resumed run that had stopped stays stopped.

    Args:
        monitor: the metric to watch, a key of an evaluation's results (``"val_loss"``,
            ``"train_loss"``, or what your evaluator reports).
        patience: evaluations without improvement tolerated (>= 1).
        min_delta: an improvement must beat the best by more than this (>= 0).
        mode: ``"min"`` (lower is better) or ``"max"``.

    ``best``, ``best_step`` and ``stopped_step`` say what it saw; it publishes
    ``<monitor>_best`` on the metrics channel at every evaluation it judges.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 3, min_delta: float = 0.0, mode: str = "min") -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"EarlyStopping: monitor must be a metric name, got {monitor!r}")
        check_count("EarlyStopping: ", "patience", patience)
        check_number("EarlyStopping: ", "min_delta", min_delta, minimum=0.0)
        if mode not in MODES:
            raise ValueError(f"EarlyStopping: mode must be one of {MODES}, got {mode!r}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.mode = mode
        self.best: float | None = None
        self.best_step: int | None = None
        self.wait = 0
        self.stopped_step: int | None = None
        self._judged = False
        self._seen: set[str] = set()

    @hookimpl
    def before_fit(self, engine: Engine) -> None:
        self._judged, self._seen = False, set()

    @hookimpl
    def after_evaluate(self, engine: Engine, metrics: dict[str, float]) -> None:
        self._seen.update(metrics)
        if self.monitor not in metrics:
            return  # another evaluator's report; ours comes in its own after_evaluate
        self._judged = True
        value, step = float(metrics[self.monitor]), engine.state.step
        if improved(value, self.best, self.min_delta, self.mode):
            self.best, self.best_step, self.wait = value, step, 0
        else:
            self.wait += 1
        if self.best is not None:
            engine.metrics.publish(f"{self.monitor}_best", self.best)
        if self.wait >= self.patience and self.stopped_step is None:
            self.stopped_step = step
            engine.state.should_stop = True
            engine.print(
                f"EarlyStopping: {self.monitor} has not improved by more than {self.min_delta} for "
                f"{self.wait} evaluations (best {self.best} at step {self.best_step}); stopping after step {step}"
            )

    @hookimpl
    def after_fit(self, engine: Engine) -> None:
        if self._judged or self.stopped_step is not None:
            return
        reported = ", ".join(sorted(self._seen)) or "nothing: no plugin evaluated (add LossTracker or your evaluator)"
        engine.print(
            f"EarlyStopping: no evaluation reported {self.monitor!r} in this fit, so it never judged; "
            f"reported: {reported}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "wait": self.wait, "stopped_step": self.stopped_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.wait, self.stopped_step = int(state["wait"]), state["stopped_step"]
