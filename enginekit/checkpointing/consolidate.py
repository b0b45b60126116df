"""A checkpoint to one book-compatible ``model.pt``: ``enginekit consolidate CKPT OUT``.

The book saves ``torch.save(model.state_dict(), "model.pth")`` and loads it with
``model.load_state_dict(torch.load(...))``; this writes the same: the whole model's weights
under the model's own names, gathered from every rank's shards, in one process (no torchrun).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..files import atomic_write
from .dcp import Reader, load_tensors
from .format import CheckpointError
from .storage import Folder

__all__ = ["consolidate"]


def consolidate(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Write the model weights of ``checkpoint`` (a ``ckpt-N`` folder, or a run's checkpoint folder:
    its newest good checkpoint) to ``out`` as one ``state_dict``; returns it. Every file is
    verified against the manifest as it is read."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (pass a ckpt-<step> folder or a run's checkpoint folder)")
    folder = Folder(path)
    if not (path / "manifest.json").exists() and folder.checkpoints():  # a run's folder: its newest good one
        found = folder.candidates(lambda line: print(line))
        path = found[0][0]
    manifest = Folder(path.parent).check(path)
    reader = Reader(path, manifest)
    metadata = reader.read_metadata()
    tensors: dict[str, torch.Tensor] = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata):
            tensors[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    if not tensors:
        raise CheckpointError(f"{path.name}: holds no model weights")
    load_tensors(reader, tensors)
    weights = {key.removeprefix("model."): t for key, t in tensors.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: torch.save(weights, f))
    return weights
