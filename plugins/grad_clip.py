"""Gradient-norm clipping, appendix D.3 of the book."""

from __future__ import annotations

from typing import Literal

import torch

from enginekit import Engine
from enginekit.hookspec import hookimpl
from enginekit.plugin_api import check_number


class GradClip:
    """``clip_grad_norm_(model.parameters(), max_norm)`` once per optimizer step, from ``start_step`` on.

    It runs in ``before_optimizer_step``, the hook for changing gradients: they are complete and
    unscaled, and every ``after_backward`` reader has seen them unclipped, so it is right with
    gradient accumulation, fp16 and any plugin order. The book clips from the
    first step after warmup: pass ``start_step="after_warmup"`` to clip from
    ``engine.state.warmup_steps``, whichever plugin published it (0 when nothing warms up), or
    an explicit step index.

    Each clipped step publishes ``grad_norm`` (the total norm before clipping, a device tensor:
    no host sync) on ``engine.metrics``; ``last_norm`` keeps the latest one too.
    """

    def __init__(self, max_norm: float = 1.0, start_step: int | Literal["after_warmup"] = 0) -> None:
        check_number("GradClip: ", "max_norm", max_norm, above=0.0)
        if start_step != "after_warmup" and (
            isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0
        ):
            raise ValueError(f"GradClip: start_step must be an int >= 0 or 'after_warmup', got {start_step!r}")
        self.max_norm = float(max_norm)
        self.start_step = start_step
        self.last_norm: torch.Tensor | None = None
        self._params: list[torch.nn.Parameter] = []

    @hookimpl
    def before_fit(self, engine: Engine) -> None:
        if self.start_step != "after_warmup" and self.start_step >= engine.state.total_steps:
            raise ValueError(
                f"GradClip: start_step ({self.start_step}) is not before the run's end "
                f"({engine.state.total_steps} steps), so it would never clip"
            )
        self._params = [p for p in engine.model.parameters() if p.requires_grad]

    @hookimpl
    def before_optimizer_step(self, engine: Engine) -> None:
        st = engine.state
        start = st.warmup_steps if self.start_step == "after_warmup" else self.start_step
        if st.step >= start:
            self.last_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm=self.max_norm)
            engine.metrics.publish("grad_norm", self.last_norm)
