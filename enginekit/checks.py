"""Setting checks shared by the engine and plugins: one clear line naming the setting."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["check_count", "check_hyperparameters", "check_number", "check_optimizer_of"]


def check_count(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; a bool, a float (even 2.0) or NaN is refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_number(
    owner: str, name: str, value: Any, *, minimum: float | None = None, above: float | None = None
) -> float:
    """``value`` as a finite float, ``>= minimum`` or ``> above``; NaN and infinities are refused."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value >= minimum
    if ok and above is not None:
        ok = value > above
    if not ok:
        bound = f" >= {minimum}" if minimum is not None else f" > {above}" if above is not None else ""
        raise ValueError(f"{owner}{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_hyperparameters(optimizer: torch.optim.Optimizer) -> None:
    """Every numeric hyper-parameter of every param group finite (lr, betas, eps, momentum, ...).

    torch checks some when the optimizer is built, none when a group is changed later, and SGD
    takes ``momentum=nan`` as it is: the first update then turns the weights into NaN."""
    for i, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key == "params":
                continue
            for number in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(number, torch.Tensor) and number.numel() == 1:
                    number = number.item()  # a tensor lr: once per fit, not per step
                if isinstance(number, float) and not math.isfinite(number):
                    raise ValueError(f"optimizer: param group {i}'s {key} must be finite, got {value!r}")


def check_optimizer_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer updates at least one of the model's parameters (else training changes nothing)."""
    own = {id(p) for p in model.parameters()}
    if own and not any(id(p) in own for group in optimizer.param_groups for p in group["params"]):
        raise ValueError(
            "optimizer: none of its parameters belongs to the model, so training would update nothing; "
            "build it on this model's parameters: torch.optim.AdamW(model.parameters(), ...)"
        )
