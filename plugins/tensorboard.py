"""Every metric of the engine's metrics channel, as TensorBoard scalars."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from enginekit import Engine
from enginekit.hookspec import hookimpl


class TensorBoard:
    """Write each new value on ``engine.metrics`` as a scalar under ``log_dir``, at the step it
    belongs to: ``step_loss``, ``lr``, ``grad_norm``, ``train_loss``, ``val_loss`` and whatever
    other plugins publish. View with ``tensorboard --logdir <log_dir>``.

    It writes at each save point, after every plugin's work for the step, so it sees every number
    of the step whatever the registration order, and it only reads: tensors are read (one host
    sync) once per step, not per metric publication. Only rank 0 writes. Needs the
    ``tensorboard`` package: ``pip install "enginekit[tensorboard]"``.

    Args:
        log_dir: the run folder for the event files (created).
        flush_secs: how often the writer flushes to disk.
    """

    def __init__(self, log_dir: str | os.PathLike[str], flush_secs: int = 30) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                'TensorBoard: the tensorboard package is not installed; pip install "enginekit[tensorboard]"'
            ) from None
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self._writer_class = SummaryWriter
        self._writer: Any = None
        self._seen: dict[str, int] = {}

    @hookimpl
    def before_fit(self, engine: Engine) -> None:
        if engine.state.is_main and self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir), flush_secs=self.flush_secs)

    @hookimpl
    def on_save_point(self, engine: Engine, reason: str) -> None:
        if self._writer is None:
            return
        metrics = engine.metrics
        for name in metrics:
            serial = metrics.serial(name)
            if self._seen.get(name) != serial:  # new since the last save point
                self._seen[name] = serial
                self._writer.add_scalar(name, metrics[name], global_step=metrics.step_of(name))

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    @hookimpl
    def after_fit(self, engine: Engine) -> None:
        self._close()

    @hookimpl
    def on_exception(self, engine: Engine, error: BaseException) -> None:
        self._close()
