"""Evaluation: the mean loss of a loader, as the book's ``calc_loss_loader`` computes it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from .batches import to_device

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["mean_loss"]


def mean_loss(engine: Engine, loader: Iterable[Any], max_batches: int | None = None) -> float:
    """Mean of the engine's loss over the first ``max_batches`` batches of ``loader`` (all when
    None), through its ``forward_fn`` and precision, in eval mode without gradients; per-batch
    losses summed as Python floats; NaN for an empty loader."""
    model = engine.model  # train/eval mode is the plain module's; a compiled wrapper follows it
    forward_model = engine.eval_module()
    n_total = len(loader)  # type: ignore[arg-type]
    n = n_total if max_batches is None else min(max_batches, n_total)
    was_training = model.training
    model.eval()
    total = 0.0
    try:  # a failure must not leave dropout off for whoever carries on
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= n:
                    break
                with engine._precision.autocast():
                    outputs, targets = engine.forward_fn(forward_model, to_device(batch, engine.device))
                    total += engine.loss_fn(outputs, targets).item()
    finally:
        model.train(was_training)
    return total / n if n > 0 else float("nan")
