"""A tqdm progress bar over all optimizer steps."""

from __future__ import annotations

import time
from typing import Any

from tqdm.auto import tqdm

from enginekit import Engine
from enginekit.hookspec import hookimpl
from enginekit.plugin_api import check_count


class ProgressBar:
    """One bar over the run's optimizer steps, showing loss, learning rate and tokens/s.

    ``tqdm.auto``: a widget in Jupyter, text in a terminal.

    The numbers come from the metrics channel (``step_loss`` and ``lr`` on ``engine.metrics``)
    and refresh every ``refresh_every`` steps: reading the loss synchronises with the device,
    so it is not done per step. Lines printed through ``engine.print`` (all built-in
    plugins do) appear above the bar without breaking it. Only rank 0 draws it.
    """

    def __init__(self, refresh_every: int = 10, **tqdm_kwargs: Any) -> None:
        check_count("ProgressBar: ", "refresh_every", refresh_every)
        self.refresh_every = refresh_every
        self.tqdm_kwargs = tqdm_kwargs
        self.bar: tqdm | None = None
        self._last_time = 0.0
        self._last_tokens = 0

    @hookimpl
    def before_fit(self, engine: Engine) -> None:
        kwargs = {"desc": "train", "unit": "step", "dynamic_ncols": True, **self.tqdm_kwargs}
        kwargs["disable"] = kwargs.get("disable", False) or not engine.state.is_main
        self.bar = tqdm(total=engine.state.total_steps, **kwargs)
        self._last_time = time.perf_counter()
        self._last_tokens = -1  # set at the first step, which may be a resumed one

    @hookimpl
    def after_step(self, engine: Engine, loss: Any) -> None:
        st = engine.state
        bar = self.bar
        if bar is None:
            return
        bar.update(st.step + 1 - bar.n)
        if self._last_tokens < 0:
            self._last_tokens = st.tokens_seen
        if (st.step + 1) % self.refresh_every == 0 or st.step + 1 == st.total_steps:
            now = time.perf_counter()
            rate = (st.tokens_seen - self._last_tokens) / max(now - self._last_time, 1e-9)
            self._last_time, self._last_tokens = now, st.tokens_seen
            metrics = engine.metrics
            bar.set_postfix_str(
                f"loss={metrics['step_loss']:.3f} lr={metrics['lr']:.2e} tok/s={rate:,.0f}", refresh=True
            )

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @hookimpl
    def after_fit(self, engine: Engine) -> None:
        self._close()

    @hookimpl
    def on_exception(self, engine: Engine, error: BaseException) -> None:
        self._close()
