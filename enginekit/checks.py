"""Setting checks shared by the engine and plugins: one clear line naming the setting."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_count", "check_number"]


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
