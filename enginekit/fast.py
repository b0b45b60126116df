"""The opt-in fast path, one switch per part; with every switch off, the run is the book's.

Each part is independent, so a speed-up can be traced to the part that gave it:

* :func:`adamw`: AdamW with ``fused=True`` (one kernel over all parameters; CPU too in current
  torch) or ``foreach=True``; the book's loop uses the default per-tensor implementation on CPU;
* :func:`allow_tf32`: TF32 matmuls and convolutions on CUDA (no effect on a CPU);
* ``vocab_padding_multiple`` in the GPT config (see :mod:`enginekit.gpt`): an aligned output head;
* ``Engine(precision="bf16")``: autocast;
* ``Engine(compile=True)``: torch.compile of the model (see :mod:`enginekit.compiling`).

:data:`FAST` names them all, as the examples' ``--fast`` switches them on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

__all__ = ["FAST", "adamw", "allow_tf32"]

#: What the examples' ``--fast`` turns on.
FAST: dict[str, Any] = {
    "adamw": "fused",
    "tf32": True,
    "vocab_padding_multiple": 64,
    "precision": "bf16",
    "compile": True,
}


def adamw(
    params: Iterable[Any],
    *,
    lr: float,
    weight_decay: float,
    implementation: Literal["default", "fused", "foreach"] = "fused",
    **kwargs: Any,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with the chosen implementation: ``"default"`` is torch's choice
    (what the book's loop gets), ``"fused"`` one kernel for all parameters, ``"foreach"``
    grouped tensor operations. Results agree to float rounding, not bit for bit."""
    if implementation not in ("default", "fused", "foreach"):
        raise ValueError(f"adamw: implementation must be 'default', 'fused' or 'foreach', got {implementation!r}")
    if implementation == "fused":
        kwargs["fused"] = True
    elif implementation == "foreach":
        kwargs["foreach"] = True
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)


def allow_tf32(enabled: bool = True) -> bool:
    """Let CUDA matmuls and convolutions in fp32 use TF32 (process-wide, as torch's setting is);
    returns whether CUDA is there to use it."""
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision  # type: ignore[attr-defined]
    return torch.cuda.is_available()
