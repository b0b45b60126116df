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
from torch.distributed.tensor import DTensor

from ..files import atomic_write, lock_folder, unlock_folder
from ..registry import blame
from . import dcp
from .format import (
    FORMAT,
    STATE,
    VERSION,
    CheckpointError,
    CheckpointWriteError,
    Manifest,
    checkpoint_name,
    unsafe_value,
    write_manifest,
)
from .settings import run_settings
from .storage import Folder, remove

__all__ = [
    "Save",
    "first_nonfinite",
    "nbytes",
    "plugin_states",
    "prepare",
    "serialize",
    "settle",
    "stateful_plugins",
    "write_error",
]


def stateful_plugins(engine: Any, skip: object) -> dict[str, Any]:
    """The registered plugins with a ``state_dict``/``load_state_dict`` pair, by registration name;
    ``skip`` (the Checkpoint plugin itself) is left out."""
    return {
        name: p
        for name, p in engine.plugins.items()
        if p is not skip and callable(getattr(p, "state_dict", None)) and callable(getattr(p, "load_state_dict", None))
    }


def prepare(engine: Any, folder: Folder, skip: object) -> tuple[Path, Manifest, dict[str, Any], bytes | None]:
    """What a save at this point writes, fixed now: its folder, its manifest (no files yet), the
    model and optimizer tensors, and on rank 0 the serialized small state. Every rank calls it;
    a refusal or a failure on any rank raises on all of them, before DCP's collectives (which the
    other ranks would otherwise wait in for ever)."""
    st = engine.state
    engine.check_finite()  # with sync_every > 1: no state trained on a non-finite loss is written
    state = engine.state_dict()
    path = folder.path / checkpoint_name(state["step"])
    nonfinite = first_nonfinite(engine.model)
    if not engine.all_true(nonfinite is None):
        raise CheckpointWriteError(
            f"refusing to write {path.name}: the model's weights hold NaN or inf after step {state['step']} "
            f"(first: {nonfinite or 'on another rank'}), so nothing of this state is saved; "
            f"{folder.newest_line()}. The update that poisoned them came from a finite loss: check the "
            "learning rate and the data"
        )
    model_sd, optim_sd = dcp.state_dicts(engine.model, engine.optimizer)
    small, failed = None, None
    if st.is_main:
        try:
            small = serialize({
                "format": FORMAT, "version": VERSION, "engine": state,
                "plugins": plugin_states(stateful_plugins(engine, skip), engine),
                "settings": run_settings(engine, skip=skip), "param_groups": optim_sd["param_groups"],
            })  # fmt: skip
            if path.exists():  # cut short earlier, or committed already (a skipped batch moved the epoch's
                # end): replaced, never rewritten in place; its manifest goes first
                remove(path)
        except Exception as exc:
            failed = exc
    if not engine.all_true(failed is None):
        if failed is not None:
            raise failed
        raise CheckpointWriteError(f"rank 0 could not prepare {path.name}; {folder.newest_line()}")
    manifest = Manifest(state["step"], st.world_size, engine.strategy, {})
    return path, manifest, {"model": model_sd, "optimizer": optim_sd["state"]}, small


def settle(engine: Any, folder: Folder, error: BaseException | None) -> None:
    """Every rank learns whether a save failed on any rank, so none waits for ever for another;
    raises this rank's error, or one saying another rank failed. Every rank must call it."""
    ok = engine.all_true(error is None)
    if not ok and engine.state.is_main:
        folder.clear_leftovers()
    if error is not None:
        raise error
    if not ok:
        raise CheckpointWriteError(f"another rank failed to write a checkpoint; {folder.newest_line()}")


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
        except BaseException as exc:  # DCP wraps each rank's error in a BaseException of its own
            self.error = dcp.first_failure(exc)
            return
        finally:
            self.tensors = {}  # staged or written: the live state is no longer needed
        if future is None:
            self._commit(writer, None)
            return
        self._thread = threading.Thread(target=self._commit, args=(writer, future), name=f"enginekit-{self.path.name}")
        self._thread.start()

    @property
    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> BaseException | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.error

    def _commit(self, writer: dcp.Writer, future: Future[Any] | None) -> None:
        try:
            if future is not None:
                dcp.lowest_priority()
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


def plugin_states(stateful: dict[str, Any], engine: Any) -> dict[str, Any]:
    """Each stateful plugin's ``state_dict()``, checked to load with ``weights_only=True``; a plugin
    whose method fails is named in the error, not Checkpoint."""
    states = {}
    for name, plugin in stateful.items():
        try:
            state = plugin.state_dict()
        except Exception as exc:
            why = f"in its state_dict(), called by Checkpoint to save step {engine.state.step},"
            blame(exc, name, "on_save_point", engine.state, why)
            raise
        bad = unsafe_value(state, name)
        if bad is not None:
            raise CheckpointError(
                f"plugin {name!r}: state_dict() holds {bad}; checkpoints load with weights_only=True, "
                "so keep plugin state to tensors, numbers, strings, bools, None, lists, tuples and dicts"
            )
        states[name] = state
    return states


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


def first_nonfinite(model: torch.nn.Module) -> str | None:
    """Name of the first parameter holding NaN or inf on this rank (its shard under FSDP), or None.

    A sum per tensor, read back once: a sum is several times cheaper than ``isfinite().all()``;
    a non-finite sum is checked element by element, since huge finite weights can overflow it."""
    named = [(name, local_part(p.detach())) for name, p in model.named_parameters()]
    if not named:
        return None
    sums_finite = torch.isfinite(torch.stack([p.sum().float() for _, p in named])).tolist()
    for (name, p), ok in zip(named, sums_finite):
        if not ok and not bool(torch.isfinite(p).all()):
            return name
    return None


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def nbytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts), this rank's shards under FSDP."""
    if isinstance(obj, torch.Tensor):
        local = local_part(obj)
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    return 0
