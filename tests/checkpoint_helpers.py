"""Reading a checkpoint folder in tests: its small state and its tensors, every file verified."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from enginekit.checkpointing import Folder
from enginekit.checkpointing.dcp import load_tensors
from enginekit.checkpointing.loading import open_checkpoint

FILES = {".metadata", "__0_0.distcp", "state.pt", "manifest.json"}  # one process's checkpoint


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``state.pt``'s content (engine, plugins, settings, param_groups) with ``model`` (weights by
    name) and ``optimizer`` (``optimizer.<param>.<key>`` -> tensor) read through DCP."""
    path = Path(path)
    opened = open_checkpoint(Folder(path.parent), path)
    tensors = {
        key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for key, md in opened.reader.read_metadata().state_dict_metadata.items()
        if hasattr(md, "size")
    }
    load_tensors(opened.reader, tensors)
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    optimizer = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return {**opened.state, "model": model, "optimizer": optimizer}


def rewrite_manifest(folder: Path, **files: bytes | None) -> None:
    """Put ``files`` (name -> content; None removes it) into a checkpoint and record them in its
    manifest, as someone who knows the format would: the hashes match, only the content lies."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, content in files.items():
        if content is None:
            manifest["files"].pop(name, None)
            continue
        (folder / name).write_bytes(content)
        manifest["files"][name] = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
