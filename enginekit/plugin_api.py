"""What plugins and scripts around the engine need, in one public module.

* Setting checks: :func:`check_count`, :func:`check_number` (one ``ValueError`` naming the
  owner and the setting, as the built-in plugins give).
* Files: :func:`atomic_write` (temporary file, fsync, rename, fsync of the folder) and the run
  lock :func:`lock_folder` / :func:`unlock_folder` (raises :class:`FolderBusyError`).
* :func:`plugin_settings`: a plugin's constructor settings as they are now; :func:`blame`: a
  plugin that calls another plugin's method (a checkpoint calling ``state_dict()``) names that
  plugin in the error, not itself.
* :func:`get_logger`: a logger under ``enginekit`` (rank 0 only, above a progress bar).
* :func:`lr_preview`: the learning rate of every step under some schedule plugins, without a
  model or data, for plotting a schedule before training.

The modules these come from are implementation; this one is the promise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .checks import check_count, check_number
from .engine import Engine
from .files import FolderBusyError, atomic_write, lock_folder, unlock_folder
from .hookspec import hookimpl
from .log import get_logger
from .registry import blame, plugin_settings

__all__ = [
    "FolderBusyError",
    "atomic_write",
    "blame",
    "check_count",
    "check_number",
    "get_logger",
    "lock_folder",
    "lr_preview",
    "plugin_settings",
    "unlock_folder",
]


class _Weights(nn.Module):
    """One scalar weight per parameter group: enough for an optimizer with real ``param_groups``."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(1)) for _ in range(groups))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs * sum(self.weights)


class _LRs:
    """Notes every group's learning rate as each step used it."""

    plugin_name = "lr_preview"

    def __init__(self) -> None:
        self.per_step: list[list[float]] = []

    @hookimpl(trylast=True)
    def after_step(self, engine: Engine) -> None:
        self.per_step.append([float(group["lr"]) for group in engine.optimizer.param_groups])


def lr_preview(
    plugins: Sequence[Any],
    *,
    lr: float | Sequence[float],
    steps_per_epoch: int,
    epochs: int = 1,
    max_steps: int | None = None,
) -> list[float] | list[list[float]]:
    """The learning rate each optimizer step would use with these (schedule) plugins.

    Runs the real engine, so the plugins see the same hooks, state and plan facts as in training,
    over a model of one zero weight per group (its gradients are zero: nothing trains) and
    ``steps_per_epoch`` empty batches per epoch. ``lr`` is the optimizer's learning rate, one for
    every group or one per group. Returns one float per step, or with several groups one list
    per step.
    """
    lrs = [float(lr)] if isinstance(lr, (int, float)) else [float(x) for x in lr]
    check_count("lr_preview: ", "steps_per_epoch", steps_per_epoch)
    check_count("lr_preview: ", "epochs", epochs)
    model = _Weights(len(lrs))
    optimizer = torch.optim.SGD([{"params": [w], "lr": x} for w, x in zip(model.weights, lrs)], lr=lrs[0])
    zeros = torch.zeros(steps_per_epoch, 1)
    loader = DataLoader(TensorDataset(zeros, zeros), batch_size=1)
    recorder = _LRs()
    engine = Engine(
        model,
        optimizer,
        loader,
        plugins=[*plugins, recorder],
        device="cpu",
        loss_fn=lambda outputs, targets: (outputs - targets).pow(2).mean(),
    )
    engine.fit(epochs=epochs, max_steps=max_steps)
    if len(lrs) == 1:
        return [step[0] for step in recorder.per_step]
    return recorder.per_step
