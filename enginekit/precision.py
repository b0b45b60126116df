"""Mixed precision: what a step needs to know of fp32, bf16 and fp16."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["PRECISIONS", "Precision"]

PRECISIONS = ("fp32", "bf16", "fp16")


class Precision:
    """``fp32``; ``bf16`` (autocast on CPU and CUDA, no scaler); ``fp16`` (autocast with a
    GradScaler, CUDA only). Weights and optimizer state stay fp32 in every mode."""

    def __init__(self, name: str, device: torch.device) -> None:
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
        if name == "fp16" and device.type != "cuda":
            raise ValueError(
                f"precision='fp16' needs a CUDA device (GradScaler), but the device is {device}; "
                "use precision='bf16' on CPU"
            )
        self.name = name
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        self.scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)
