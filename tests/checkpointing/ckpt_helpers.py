"""A committed checkpoint of a tiny run, for the package's unit tests."""

from __future__ import annotations

from pathlib import Path

import torch

from enginekit.plugins import Checkpoint
from enginekit.testing import make_engine


def tiny_run(folder: Path, steps: int = 4, every: int = 2, **kwargs) -> tuple[Checkpoint, object]:
    """Train ``steps`` steps of the stand-in model with a checkpoint every ``every``; (plugin, engine)."""
    torch.manual_seed(0)
    ckpt = Checkpoint(folder, every_steps=every, every_epoch=False, async_write=False, **kwargs)
    engine = make_engine([ckpt], steps_per_epoch=steps)
    engine.fit(epochs=1)
    return ckpt, engine
