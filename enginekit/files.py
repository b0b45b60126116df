"""Crash-safe file writes: a file is either the old one or the complete new one, never a torn mix."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["FolderBusyError", "atomic_write", "fsync_dir", "lock_folder", "unlock_folder"]

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


LOCK_FILE = ".enginekit.lock"
_held: dict[str, list[int]] = {}  # realpath -> [fd, holders in this process]


class FolderBusyError(RuntimeError):
    """Another process holds the folder's lock: another run is using it."""


def lock_folder(folder: str | os.PathLike[str], what: str = "run") -> None:
    """Take the exclusive lock of ``folder`` (created if missing), or raise :class:`FolderBusyError`
    naming the holder's pid. Re-entrant within a process.

    The lock is an OS lock (``flock``) on the folder itself, through a descriptor of the folder:
    the kernel releases it when the process dies, so kill -9 never leaves a stale lock, and no
    file can be deleted out from under it (a lock on ``.enginekit.lock`` ended when someone
    removed that file "to clean up", and a second run then cleared the live run's checkpoints).
    ``.enginekit.lock`` only records the holder's pid for the message."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][1] += 1
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        try:
            holder = (folder / LOCK_FILE).read_text(errors="replace").strip()[:32] or "unknown"
        except OSError:
            holder = "unknown"
        raise FolderBusyError(
            f"{folder} is in use by another {what} (pid {holder}); wait for it to end, stop it, or use "
            "another folder. Nothing was touched"
        ) from None
    try:
        pid_fd = os.open(folder / LOCK_FILE, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            os.ftruncate(pid_fd, 0)
            os.pwrite(pid_fd, f"{os.getpid()}\n".encode(), 0)
        finally:
            os.close(pid_fd)
    except BaseException:
        os.close(fd)
        raise
    _held[key] = [fd, 1]


def unlock_folder(folder: str | os.PathLike[str]) -> None:
    """Release what :func:`lock_folder` took (the last holder in this process closes the lock)."""
    key = os.path.realpath(folder)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        os.close(entry[0])  # closing the descriptor releases the flock
