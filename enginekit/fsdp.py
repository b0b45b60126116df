"""Sharded data parallelism (``strategy="fsdp"``) with PyTorch's ``fully_shard`` (FSDP2).

Which modules become units of their own (each all-gathers its parameters just before its
forward and frees them after, so only one unit is whole at a time):

1. the modules ``model.fsdp_units()`` returns, when the model has that method;
2. otherwise the children of ``model.trf_blocks`` (the book's ``GPTModel``: one unit per block);
3. otherwise none; and then always the root, which takes every parameter left over
   (embeddings, final norm, output head for a GPT).

Parameters, gradients and AdamW's moments are then sharded over the ranks (each rank holds
about ``1 / world_size`` of them); buffers (the causal mask) are replicated. The optimizer the
caller built on the whole parameters is pointed at the sharded ones, so it must not have
stepped yet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["STRATEGIES", "check_strategy", "full_state_dict", "gathered", "no_sync", "shard", "units"]

STRATEGIES = ("ddp", "fsdp")


def check_strategy(strategy: str, precision: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "fsdp" and precision == "fp16":
        # GradScaler's overflow check would see only this rank's shard: ranks could disagree on skipping a step
        raise ValueError("strategy='fsdp' does not support precision='fp16' yet: use precision='bf16' (or 'fp32')")


def units(model: nn.Module) -> list[nn.Module]:
    """The submodules that become FSDP units before the root (see the module docstring for the rule)."""
    if hasattr(model, "_orig_mod"):
        raise ValueError(
            "strategy='fsdp' needs the plain model, not a torch.compile'd one: pass the model uncompiled "
            "(compiling a sharded model is not supported by enginekit yet)"
        )
    chosen = getattr(model, "fsdp_units", None)
    if callable(chosen):
        found = list(chosen())
        if not all(isinstance(m, nn.Module) for m in found):
            raise ValueError(f"{type(model).__name__}.fsdp_units() must return nn.Module objects")
        return found
    blocks = getattr(model, "trf_blocks", None)
    if isinstance(blocks, nn.Module):
        return list(blocks.children())
    return []


def shard(
    model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, param_dtype: torch.dtype | None
) -> nn.Module:
    """``fully_shard`` each unit, then the root, in place; the optimizer is re-pointed at the shards.

    With bf16 the policy all-gathers and computes with bf16 copies of the parameters and reduces
    gradients in fp32; the sharded parameters and the optimizer state stay fp32.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if optimizer.state:
        raise ValueError(
            "strategy='fsdp': the optimizer has already stepped; pass a fresh optimizer (its state cannot be "
            "resharded onto the new sharded parameters)"
        )
    names = {id(p): name for name, p in model.named_parameters()}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for unit in units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # fully_shard replaced every parameter by a new DTensor parameter under the same name
    sharded = dict(model.named_parameters())
    for i, group in enumerate(optimizer.param_groups):
        try:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        except KeyError:
            raise ValueError(
                f"strategy='fsdp': optimizer param group {i} holds a tensor that is not a parameter of the model; "
                "build the optimizer on model.parameters()"
            ) from None
    return model


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Micro-batches before the last of a step: gradients accumulate unsharded and unreduced, and the
    parameters stay gathered after backward (no all-gather again in the next micro-batch's forward);
    the last micro-batch, outside this context, reduce-scatters the sum once."""
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    model.set_reshard_after_backward(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]
        model.set_reshard_after_backward(True)  # type: ignore[operator]


def _fsdp_modules(model: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every rank holds the whole (unsharded) model while inside, so one rank may run forward
    passes alone (a text sample on rank 0): no forward needs a collective then. Every rank must
    enter it. Costs a whole copy of the parameters (in the compute dtype) per rank meanwhile."""
    modules = _fsdp_modules(model)
    model.set_reshard_after_forward(False)  # type: ignore[operator]
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)  # type: ignore[operator]
        # the root keeps its parameters after forward (they are needed at once by backward), as fully_shard sets it
        model.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
        for m in modules:
            m.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU, on every rank (a collective per sharded tensor:
    every rank must call it); the same keys and shapes as the unsharded model's."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[key] = value.detach().cpu()
    return out
