"""A checkpoint folder's layout, its manifest, and the checks every file passes before it is read.

``<dir>/ckpt-<steps done, 8 digits>/`` holds:

- ``.metadata`` and ``__<rank>_<n>.distcp``: DCP's files, the model's and optimizer's tensors
  (each rank writes its own shards; a replicated tensor is written once);
- ``state.pt``: everything else, small (the engine's counters, every rank's RNG and data
  position, the plugins' states, the run's settings, the optimizer's hyper-parameters), loaded
  with ``weights_only=True``;
- ``manifest.json``: the sha256 and size of every other file, written last and atomically. It is
  the commit marker: a folder without one is a save that did not finish, never a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write

__all__ = [
    "FORMAT",
    "MANIFEST",
    "STATE",
    "VERSION",
    "CheckpointError",
    "CheckpointWriteError",
    "Manifest",
    "checkpoint_name",
    "open_regular",
    "read_manifest",
    "unsafe_value",
    "verify_files",
    "write_manifest",
]

FORMAT = "enginekit-checkpoint"
VERSION = 2  # 1 was one torch.save file per checkpoint, before the DCP backend
MANIFEST = "manifest.json"
STATE = "state.pt"
NAME = re.compile(r"^ckpt-(\d{8})$")
_FILE = re.compile(r"^(\.metadata|state\.pt|__\d+_\d+\.distcp)$")  # what a manifest may list
_MANIFEST_MAX = 1 << 20  # a manifest lists a few files per rank: a megabyte is thousands of ranks


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the run (plugins, format, model).

    The message is one line; ``details`` holds the full list when there is more to say
    (every mismatched tensor of another model, for instance).
    """

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions, interrupted, non-finite weights):
    nothing was saved for that moment, and the message says which checkpoint is the newest on disk."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` vouches for: the step, who wrote it, and every file's sha256 and size."""

    step: int
    world_size: int
    strategy: str
    files: dict[str, tuple[str, int]]  # name -> (sha256 hex, bytes)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "world_size": self.world_size,
            "strategy": self.strategy,
            "files": {name: {"sha256": sha, "bytes": size} for name, (sha, size) in sorted(self.files.items())},
        }
        return (json.dumps(body, indent=1) + "\n").encode()


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Commit a checkpoint: every file it lists is complete and synced before this is called."""
    atomic_write(folder / MANIFEST, lambda f: f.write(manifest.to_json()))


def open_regular(path: Path) -> int:
    """A descriptor of ``path``, which must be a regular file reached without a symlink.

    ``O_NOFOLLOW`` refuses a link swapped in after a check; ``O_NONBLOCK`` keeps a FIFO put there
    from blocking the open. Raises ``ValueError`` naming what it is instead."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if path.is_symlink():
            raise ValueError(f"{path.name} is a symbolic link (only regular files are read)") from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path.name} is not a regular file")
    return fd


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a checkpoint folder, checked for shape; ``CheckpointError`` saying why not."""
    where = folder.name
    try:
        fd = open_regular(folder / MANIFEST)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: no {MANIFEST} (its save did not finish)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: {MANIFEST} unreadable ({exc})") from None
    try:
        raw = os.read(fd, _MANIFEST_MAX + 1)
    finally:
        os.close(fd)
    if len(raw) > _MANIFEST_MAX:
        raise CheckpointError(f"{where}: {MANIFEST} is over {_MANIFEST_MAX} bytes, not a manifest")
    try:
        body = json.loads(raw)
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError("not an enginekit manifest")
        if body.get("version") != VERSION:
            raise CheckpointError(f"{where}: checkpoint format version {body.get('version')!r}, expected {VERSION}")
        files = {str(name): (str(entry["sha256"]), int(entry["bytes"])) for name, entry in dict(body["files"]).items()}
        manifest = Manifest(int(body["step"]), int(body["world_size"]), str(body["strategy"]), files)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: {MANIFEST} is not a valid manifest ({exc})") from None
    odd = sorted(name for name in manifest.files if not _FILE.match(name))
    if odd:  # a name like ../../x would send the reader out of the folder
        raise CheckpointError(f"{where}: {MANIFEST} lists {odd[0]!r}, not a checkpoint file")
    for required in (".metadata", STATE):
        if required not in manifest.files:
            raise CheckpointError(f"{where}: {MANIFEST} does not list {required}")
    named = NAME.match(where)
    if named is not None and manifest.step != int(named.group(1)):
        # the name orders candidates and pruning; one that lies would roll the run back
        raise CheckpointError(
            f"{where}: it holds step {manifest.step}, not step {int(named.group(1))} as its name says "
            "(renamed or copied?)"
        )
    return manifest


def verify_files(folder: Path, manifest: Manifest, hash: bool = False) -> None:
    """Every file the manifest lists is a regular file of the recorded size (and, with ``hash``,
    content); ``CheckpointError`` naming the first that is not. Without ``hash`` it reads nothing:
    the loader checks each file's hash as it reads it."""
    for name, (sha, size) in sorted(manifest.files.items()):
        path = folder / name
        try:
            info = path.lstat()
        except FileNotFoundError:
            raise CheckpointError(f"{folder.name}: {name} is missing") from None
        if not stat.S_ISREG(info.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
            raise CheckpointError(f"{folder.name}: {name} is {kind} (only regular files are read)")
        if info.st_size != size:
            raise CheckpointError(
                f"{folder.name}: {name} is {info.st_size} bytes, the manifest says {size}: truncated or corrupted"
            )
        if hash:
            fd = open_regular(path)
            try:
                actual = _sha256_fd(fd)
            finally:
                os.close(fd)
            check_hash(folder.name, name, sha, actual)


def check_hash(where: str, name: str, recorded: str, actual: str) -> None:
    if actual != recorded:
        raise CheckpointError(
            f"{where}: {name}: sha256 mismatch (recorded {recorded[:12]}..., file has {actual[:12]}...): "
            "truncated or corrupted"
        )


def _sha256_fd(fd: int) -> str:
    sha = hashlib.sha256()
    while chunk := os.read(fd, 1 << 22):
        sha.update(chunk)
    return sha.hexdigest()


_PLAIN = (torch.Tensor, bool, int, float, str, type(None))


def unsafe_value(obj: Any, where: str) -> str | None:
    """Where ``obj`` holds something the weights-only loader would refuse, or None."""
    if isinstance(obj, _PLAIN):
        return None
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = unsafe_value(key, f"{where} key") or unsafe_value(value, f"{where}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found = unsafe_value(value, f"{where}[{i}]")
            if found:
                return found
        return None
    return f"a {type(obj).__module__}.{type(obj).__qualname__} at {where}"
