"""Mixed precision: what a step needs to know of fp32, bf16 and fp16."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["PRECISIONS", "Precision"]

PRECISIONS = ("fp32", "bf16", "fp16")

T = TypeVar("T")


class Precision:
    """``fp32``; ``bf16`` (autocast on CPU and CUDA, no scaler); ``fp16`` (autocast with a
    GradScaler). Weights and optimizer state stay fp32 in every mode.

    fp16 is meant for CUDA. On CPU it runs too (torch's CPU autocast to float16 and
    ``GradScaler("cpu")``), with a warning: it is slow there and exists so the scaler path can be
    tested without a GPU.
    """

    def __init__(self, name: str, device: torch.device) -> None:
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
        if name == "fp16" and device.type not in ("cuda", "cpu"):
            raise ValueError(f"precision='fp16' needs a CUDA device (or the CPU, for testing), got {device}")
        if name == "fp16" and device.type == "cpu":
            warnings.warn(
                "precision='fp16' on CPU exercises the GradScaler path for testing and is slow; "
                "use precision='bf16' to train on a CPU",
                stacklevel=3,
            )
        self.name = name
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def overflowed(self, optimizer: torch.optim.Optimizer) -> bool:
        """After ``unscale_``: whether the scaled gradients overflowed (one host read, fp16 only)."""
        if self.scaler is None:
            return False
        found = self.scaler._found_inf_per_device(optimizer)
        return bool(sum(v.item() for v in found.values()))

    def autocasting(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` run under autocast to this precision's dtype; in fp32 ``fn`` itself, so the
        per-step path enters no context at all."""
        if self.dtype is None:
            return fn
        device_type, dtype = self.device_type, self.dtype

        def autocast_fn(*args: Any) -> T:
            with torch.autocast(device_type=device_type, dtype=dtype):
                return fn(*args)

        return autocast_fn

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)
