"""Opening one checkpoint to resume from: its manifest, its small state and its DCP reader."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .dcp import Reader
from .format import FORMAT, STATE, VERSION, CheckpointError, Manifest
from .storage import Folder

__all__ = ["Opened", "open_checkpoint"]


@dataclass
class Opened:
    path: Path
    manifest: Manifest
    reader: Reader
    state: dict[str, Any]  # state.pt: engine, plugins, settings, param_groups, strategy

    @property
    def engine(self) -> dict[str, Any]:
        return self.state["engine"]


def open_checkpoint(folder: Folder, path: Path) -> Opened:
    """Check ``path`` cheaply (manifest, every file present at its size), then read ``state.pt``
    and DCP's ``.metadata``, each verified against its hash as it is read, and safely loaded.
    The tensor files are verified when :func:`~.dcp.load` reads them."""
    manifest = folder.check(path)
    reader = Reader(path, manifest)
    with reader.fs.mapped(STATE) as f:  # type: ignore[attr-defined]
        try:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise CheckpointError(
                f"{path.name}: {STATE} refused by the safe loader: {type(exc).__name__}: {first}"
            ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"{path.name}: {STATE} is not an enginekit checkpoint state of version {VERSION}")
    engine = state.get("engine")
    if not isinstance(engine, dict) or engine.get("step") != manifest.step:
        raise CheckpointError(f"{path.name}: {STATE} holds another step than its manifest (mixed up files?)")
    reader.read_metadata()
    return Opened(path, manifest, reader, state)
