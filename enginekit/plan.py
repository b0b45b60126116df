"""Two rules that keep plugins order-free: how learning rates compose, and one owner per plan fact.

* :class:`LRScales` is ``engine.lr_scales``: schedules set each group's *base* learning rate in
  ``before_step``; modifiers (a plateau reducer, any factor) never write ``param_groups``, they
  set a factor under their registration name, and the engine multiplies them in after every
  ``before_step`` implementation has run. The product does not depend on who set a factor first.
* :func:`plugin_on_stack` finds which registered plugin's code is running, so a plan fact set
  twice in one fit (``TrainState.warmup_steps``, ``TrainState.lr_decay``) names both owners,
  whichever registered first.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, MutableMapping, Sequence
from types import FrameType
from typing import Any

__all__ = ["LRScales", "plugin_on_stack"]

Factor = float | tuple[float, ...]


def _check_factor(name: str, value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise ValueError(f"engine.lr_scales[{name!r}]: a factor must be a finite number >= 0, got {value!r}")
    return float(value)


class LRScales(MutableMapping[str, Factor]):
    """``engine.lr_scales``: the learning-rate factors of modifiers, by owner (a registration name).

    ``engine.lr_scales[engine.name_of(self)] = 0.5`` halves every group's learning rate on top of
    whatever the schedules set; a sequence gives one factor per parameter group. The effective
    rate of group ``i`` is ``base_i * product of every factor``, the factors multiplied in the
    order of their names, so the result is the same whichever plugin set its factor first. Delete
    the entry (or set 1.0) to stop scaling.

    When it applies: after every ``before_step`` implementation, before the forward pass; a factor
    set in ``before_step`` counts for that step, one set anywhere else (``after_evaluate``,
    ``after_step``) from the next step on. After ``after_step`` the engine writes the base rates
    back into ``param_groups``, so a factor never compounds (without a schedule the base is the
    optimizer's own lr) and checkpoints hold the base. The factors travel with
    :meth:`Engine.state_dict`; they are not plan facts (resuming with them is not a change).
    With no factor set, the step does not touch the learning rates at all. A factor stays,
    across fits too, until its owner changes or deletes it.
    """

    def __init__(self) -> None:
        self._factors: dict[str, Factor] = {}
        #: whether any factor is set: a plain attribute, so the engine's per-step check is free
        self.active = False

    def __setitem__(self, name: str, factor: float | Sequence[float]) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"engine.lr_scales: keys are owner names (non-empty strings), got {name!r}")
        if isinstance(factor, (list, tuple)):
            if not factor:
                raise ValueError(f"engine.lr_scales[{name!r}]: give a number or one factor per parameter group")
            self._factors[name] = tuple(_check_factor(name, f) for f in factor)
        else:
            self._factors[name] = _check_factor(name, factor)
        self.active = True

    def __getitem__(self, name: str) -> Factor:
        return self._factors[name]

    def __delitem__(self, name: str) -> None:
        del self._factors[name]
        self.active = bool(self._factors)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._factors))

    def __len__(self) -> int:
        return len(self._factors)

    def __repr__(self) -> str:
        return f"LRScales({dict(sorted(self._factors.items()))})"

    def factors(self, n_groups: int) -> list[float]:
        """The product of every factor, per parameter group, multiplied in name order."""
        totals = [1.0] * n_groups
        for name in sorted(self._factors):
            factor = self._factors[name]
            if isinstance(factor, tuple):
                if len(factor) != n_groups:
                    raise ValueError(
                        f"engine.lr_scales[{name!r}] has {len(factor)} factors but the optimizer has "
                        f"{n_groups} parameter group(s); give one number or one factor per group"
                    )
                totals = [t * f for t, f in zip(totals, factor)]
            else:
                totals = [t * factor for t in totals]
        return totals

    def apply(self, param_groups: list[dict[str, Any]]) -> list[float]:
        """Scale each group's lr in place; returns the base rates for :meth:`restore`."""
        base = [group["lr"] for group in param_groups]
        for group, lr, factor in zip(param_groups, base, self.factors(len(param_groups))):
            group["lr"] = lr * factor
        return base

    @staticmethod
    def restore(param_groups: list[dict[str, Any]], base: list[float]) -> None:
        """Put the base rates that :meth:`apply` returned back."""
        for group, lr in zip(param_groups, base):
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {name: list(f) if isinstance(f, tuple) else f for name, f in self._factors.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._factors, self.active = {}, False
        for name, factor in state.items():
            self[name] = factor


def plugin_on_stack(pm: Any) -> str | None:
    """The registration name of the innermost registered plugin whose code is running now
    (a hook implementation, or a method of a registered plugin object), or None."""
    by_id = {id(plugin): name for name, plugin in pm.list_name_plugin()}
    codes = {}
    for caller in vars(pm.hook).values():
        for impl in getattr(caller, "get_hookimpls", list)():
            code = getattr(impl.function, "__code__", None)
            if code is not None:
                codes[code] = impl.plugin_name
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code in codes:
            return codes[frame.f_code]
        if "self" in frame.f_code.co_varnames[:1]:
            owner = frame.f_locals.get("self")
            if id(owner) in by_id and pm.get_plugin(by_id[id(owner)]) is owner:
                return by_id[id(owner)]
        frame = frame.f_back
    return None
