"""Keep the weights of the best evaluation so far, by a monitored metric."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from enginekit import Engine
from enginekit.hookspec import hookimpl
from enginekit.plugin_api import atomic_write, check_number

MODES = ("min", "max")
FORMAT = "enginekit-best-weights"


def beats(value: float, best: float | None, min_delta: float, mode: str) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (NaN never does)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class BestCheckpoint:
    """Write the model's weights to ``path`` whenever ``monitor`` beats its best so far.

    It reacts to ``after_evaluate`` (LossTracker's or any evaluator's report) and writes at once,
    so the file holds exactly the weights that evaluation measured, with the step it belongs to:
    ``{"model": state_dict, "step", "epoch", "tokens_seen", "monitor", "value", "mode"}``, where
    ``step`` is the 0-based index of the evaluated step (the weights after its update, as
    LossTracker evaluates them) and ``epoch`` is 0-based like ``TrainState.epoch``. The write is
    atomic (a temporary file, fsync, rename): a crash leaves the previous best or the new one,
    never a torn file. Only the main process writes. Load it with :meth:`load`
    (``torch.load(..., weights_only=True)``).

    Args:
        path: the file to write (its folder is created).
        monitor: the metric, a key of an evaluation's results (``"val_loss"``, yours).
        mode: ``"min"`` (lower is better) or ``"max"``.
        min_delta: an improvement must beat the best by more than this (>= 0).

    ``best`` and ``best_step`` travel with checkpoints, so a resumed run compares with the best
    of the run it continues (after a resume the file may hold a better evaluation of steps the
    resumed run replays; it is replaced by the next improvement on the restored best, and always
    holds the weights of the step it names). It is one file, overwritten, never one per
    improvement; its size is the model's weights alone (4 bytes per fp32 parameter).
    """

    def __init__(
        self, path: str | os.PathLike[str], monitor: str = "val_loss", mode: str = "min", min_delta: float = 0.0
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"BestCheckpoint: monitor must be a metric name, got {monitor!r}")
        if mode not in MODES:
            raise ValueError(f"BestCheckpoint: mode must be one of {MODES}, got {mode!r}")
        check_number("BestCheckpoint: ", "min_delta", min_delta, minimum=0.0)
        self.path = Path(path)
        self.monitor = monitor
        self.mode = mode
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.best_step: int | None = None
        self.saves = 0

    @hookimpl
    def before_fit(self, engine: Engine) -> None:
        if engine.state.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @hookimpl
    def after_evaluate(self, engine: Engine, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            return  # another evaluator's report
        value = float(metrics[self.monitor])
        if not beats(value, self.best, self.min_delta, self.mode):
            return
        st = engine.state
        step = engine.metrics.step  # the step these results belong to
        self.best, self.best_step = value, step
        if st.is_main:
            model = getattr(engine.model, "_orig_mod", engine.model)  # torch.compile: the module's own keys
            payload = {
                "format": FORMAT,
                "model": model.state_dict(),
                "step": step,
                "epoch": st.epoch,
                "tokens_seen": st.tokens_seen,
                "monitor": self.monitor,
                "value": value,
                "mode": self.mode,
            }
            atomic_write(self.path, lambda f: torch.save(payload, f))
            self.saves += 1
        engine.metrics.publish(f"{self.monitor}_best_step", float(step))

    @staticmethod
    def load(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
        """Read a file :class:`BestCheckpoint` wrote, with the safe loader (``weights_only=True``)."""
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"BestCheckpoint: {path} is not a best-weights file written by BestCheckpoint")
        return payload

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
