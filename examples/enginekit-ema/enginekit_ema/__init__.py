"""An exponential moving average of the weights, as an installable enginekit plugin."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from enginekit import Engine, hookimpl

__all__ = ["EMA"]


class EMA:
    """Keep ``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step.

    Args:
        decay: weight of the past, in [0, 1).
        swap_at_end: copy the averaged weights into the model when fit ends.

    ``swapped(model)`` is a context manager that puts the average in the model and restores the
    trained weights afterwards, for evaluation or sampling. State (shadow weights and update
    count) round-trips through enginekit checkpoints.
    """

    plugin_name = "ema"

    def __init__(self, decay: float = 0.999, swap_at_end: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.swap_at_end = swap_at_end
        self.shadow: list[torch.Tensor] = []
        self.updates = 0
        self._params: list[torch.nn.Parameter] = []

    @hookimpl
    def before_fit(self, engine: Engine) -> None:
        self._params = [p for p in engine.model.parameters() if p.requires_grad]
        if not self.shadow:  # a resumed run already holds its restored average
            self.shadow = [p.detach().clone() for p in self._params]
        self._follow_params()

    @hookimpl
    def after_step(self, engine: Engine, loss: Any) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self._params], 1.0 - self.decay)
        self.updates += 1

    @hookimpl
    def after_fit(self, engine: Engine) -> None:
        if self.swap_at_end:
            with torch.no_grad():
                torch._foreach_copy_(self._params, self.shadow)

    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily load the averaged weights into ``model``."""
        params = [p for p in model.parameters() if p.requires_grad]
        if len(params) != len(self.shadow):
            raise RuntimeError("EMA: no average for this model yet (has fit started?)")
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, self.shadow)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": [t.detach().clone() for t in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["decay"] != self.decay:
            raise ValueError(f"EMA: checkpoint was made with decay {state['decay']}, this run uses {self.decay}")
        self.updates = int(state["updates"])
        self.shadow = [t.clone() for t in state["shadow"]]
        self._follow_params()

    def _follow_params(self) -> None:
        """Keep the average on the weights' devices (checkpoints load onto the CPU)."""
        if self._params and len(self._params) == len(self.shadow):
            self.shadow = [t.to(p.device, p.dtype) for t, p in zip(self.shadow, self._params)]
