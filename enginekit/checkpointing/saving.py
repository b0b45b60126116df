"""Writing one checkpoint, in the foreground or the background, and committing it."""

from __future__ import annotations

import errno
import hashlib
import io
import shutil
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..files import atomic_write, lock_folder, unlock_folder
from . import dcp
from .format import STATE, CheckpointWriteError, Manifest, write_manifest
from .storage import Folder

__all__ = ["Save", "serialize", "write_error"]


def serialize(obj: Any) -> bytes:
    """``torch.save`` into memory: the small state is fixed at the save point, whatever follows."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Save:
    """One checkpoint being written; every rank holds one and calls :meth:`wait` in the same order.

    Rank ``r`` writes its DCP shards; then every rank's file hashes are gathered and rank 0 writes
    ``state.pt`` and, last, the manifest, and prunes. In the background the tensors are staged
    into ``host`` at once and all of that runs in a thread, DCP's part through ``async_save``.
    """

    def __init__(
        self,
        folder: Folder,
        path: Path,
        tensors: dict[str, Any],
        small: bytes | None,
        manifest: Manifest,
        group: dist.ProcessGroup | None,
        keep_last: int,
    ) -> None:
        self.folder, self.path, self.small, self.manifest = folder, path, small, manifest
        self.tensors, self.group, self.keep_last = tensors, group, keep_last
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def run(self, background: bool, host: dcp.HostCopy, abandon: threading.Event) -> None:
        try:
            writer, future = dcp.save(
                self.path, self.tensors, self.group, background=background, host=host, abandon=abandon
            )
        except BaseException as exc:
            self.error = dcp.first_failure(exc)  # DCP wraps a second signal's TrainingAborted: unwrapped, it ends fit
            return
        finally:
            self.tensors = {}  # staged or written: the live state is no longer needed
        if future is None:
            self._commit(writer, None)
            return
        self._thread = threading.Thread(target=self._commit, args=(writer, future), name=f"enginekit-{self.path.name}")
        self._thread.start()

    def wait(self) -> BaseException | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.error

    def _commit(self, writer: dcp.Writer, future: Future[Any] | None) -> None:
        try:
            if future is not None:
                future.result()
            written = [writer.written]
            if self.group is not None:
                written = [{} for _ in range(dist.get_world_size(self.group))]
                dist.all_gather_object(written, writer.written, group=self.group)
            if self.small is None:  # not rank 0
                return
            files = {name: entry for rank_files in written for name, entry in rank_files.items()}
            small = self.small
            files[STATE] = (hashlib.sha256(small).hexdigest(), len(small))
            lock_folder(self.folder.path, "run's Checkpoint")  # re-entrant; re-taken for a save after after_fit
            try:
                atomic_write(self.path / STATE, lambda f: f.write(small))
                manifest = Manifest(self.manifest.step, self.manifest.world_size, self.manifest.strategy, files)
                write_manifest(self.path, manifest)  # the commit: from here on it is a checkpoint
                self.folder.prune(self.path, self.keep_last)
            finally:
                unlock_folder(self.folder.path)
        except BaseException as exc:
            self.error = dcp.first_failure(exc)


def write_error(path: Path, exc: BaseException, needs: int, newest: str) -> CheckpointWriteError:
    """Plain words for a failed write, whatever DCP's or torch's own message was."""
    exc = dcp.first_failure(exc)
    if isinstance(exc, (KeyboardInterrupt, dcp.Abandoned)):
        cause = "interrupted by a second signal"
    else:
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = needs
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or free < needs:
            cause = f"no space left on device (needs ~{needs / 2**20:,.1f} MB, {free / 2**20:,.1f} MB free)"
        elif isinstance(exc, OSError):
            cause = f"{exc.strerror or exc} ({type(exc).__name__})"
        else:
            first = str(exc).splitlines()[0] if str(exc) else ""
            cause = f"{type(exc).__name__}: {first}"
    error = CheckpointWriteError(f"could not write {path.name}: {cause}; {newest}")
    error.__cause__ = exc
    return error
