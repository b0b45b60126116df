"""How a batch becomes a loss: device moves for nested batches, the default forward, token counts."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["count_targets", "count_tokens", "default_forward", "to_device", "token_weights"]


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (non-blocking), through tuples, lists and dicts.

    A batch already on ``device`` comes back as the very same object, with no copy of its containers.
    """
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):  # before Mapping: an ABC check costs more than these
        for item in batch:  # the usual case, every tensor already there, costs no new object
            if not isinstance(item, torch.Tensor) or item.device != device:
                break
        else:
            return batch
        moved = [to_device(v, device) for v in batch]
        if all(map(operator.is_, moved, batch)):
            return batch
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)  # namedtuple or not
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    return batch


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        for item in batch:
            found = item if isinstance(item, torch.Tensor) else _first_tensor(item)
            if found is not None:
                return found
        return None
    if isinstance(batch, Mapping):
        if isinstance(batch.get("input_ids"), torch.Tensor):
            return batch["input_ids"]
        return _first_tensor(list(batch.values()))
    return None


def count_tokens(batch: Any) -> int:
    """What ``tokens_seen`` adds for a batch: the element count of its inputs, as the book counts
    ``input_batch.numel()``. The inputs are the first tensor of a tuple or list (``(inputs,
    targets)``, ``(inputs, mask, targets)``), and of a dict its ``"input_ids"`` entry, else its
    first tensor; 0 when the batch holds no tensor."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].numel()  # (inputs, targets, ...): the usual batch, counted without a walk
    found = _first_tensor(batch)
    return found.numel() if found is not None else 0


def count_targets(batch: Any, ignore_index: int = -100) -> torch.Tensor | None:
    """The target tokens :func:`~enginekit.engine.lm_loss` averages over in an ``(inputs, targets)``
    batch (those not ``ignore_index``), as a tensor (no host read); None for another batch shape."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        return (batch[1] != ignore_index).sum()
    return None


def token_weights(
    batches: list[Any], world_size: int, mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor | None:
    """Each micro-batch's share of the step's target tokens, over micro-batches and ranks, times
    the world size (DDP averages gradients over ranks); None when a batch has no targets to count.

    lm_loss is a mean over a micro-batch's target tokens (those not -100): weighted so, the step's
    gradient is the big batch's mean over all its target tokens, however unevenly they fall (a
    short last batch, padding). Averaging per micro-batch means would weigh a token of a short
    batch more. Another loss_fn gets the plain mean over micro-batches, exact when its
    micro-batches weigh alike."""
    counts = [count_targets(batch) for batch in batches]
    if any(c is None for c in counts):
        return None
    device = counts[0].device  # type: ignore[union-attr]
    exact = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    stacked = torch.stack(counts).to(exact)  # type: ignore[arg-type]
    total = stacked.sum()
    if mean_over_ranks is not None:
        total = mean_over_ranks(total) * world_size
    return stacked * world_size / total


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a dict with keys {list(batch)}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}"
    return f"a {type(batch).__name__}"


def default_forward(model: nn.Module, batch: Any) -> tuple[Any, Any]:
    """The default ``forward_fn``: ``(inputs, targets)`` batches, ``model(inputs)`` against ``targets``."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            f"the default forward_fn takes (inputs, targets) batches, but the loader gave {_describe(batch)}; "
            "pass Engine(..., forward_fn=f) with f(model, batch) -> (outputs, targets), e.g. "
            "lambda model, b: (model(b['input_ids']), b['labels'])"
        )
    inputs, targets = batch
    return model(inputs), targets
