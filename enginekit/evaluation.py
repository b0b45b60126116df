"""Evaluation: the mean loss of a loader, as the book's ``calc_loss_loader`` computes it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["mean_loss"]


def mean_loss(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    max_batches: int | None = None,
) -> float:
    """Mean of ``loss_fn`` over the first ``max_batches`` batches (all when None), in eval mode
    without gradients; per-batch losses summed as Python floats; NaN for an empty loader."""
    n_total = len(loader)  # type: ignore[arg-type]
    n = n_total if max_batches is None else min(max_batches, n_total)
    was_training = model.training
    model.eval()
    total = 0.0
    try:  # a failure must not leave dropout off for whoever carries on
        with torch.no_grad():
            for i, (inputs, targets) in enumerate(loader):
                if i >= n:
                    break
                with autocast():
                    out = model(inputs.to(device, non_blocking=True))
                    total += loss_fn(out, targets.to(device, non_blocking=True)).item()
    finally:
        model.train(was_training)
    return total / n if n > 0 else float("nan")
