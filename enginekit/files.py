"""Crash-safe file writes: a file is either the old one or the complete new one, never a torn mix."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "fsync_dir"]

#: Test hook: called with the temporary path just before it replaces the target.
before_replace: Callable[[Path], None] | None = None


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the folder's entry, not only the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary file in the same folder, fsync it, rename it over ``path``,
    fsync the folder. A crash at any moment leaves ``path`` as it was or complete; the leftover
    temporary file is named ``.<name>.<pid>.tmp``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
