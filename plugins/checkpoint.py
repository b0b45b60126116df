"""Crash-safe checkpoints and exact resume: the hooks, on enginekit.checkpointing's DCP backend."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Generator
from pathlib import Path
from typing import Any

from enginekit import Engine, TrainingAborted
from enginekit.checkpointing import CheckpointError, CheckpointWriteError, Folder
from enginekit.checkpointing import dcp as backend
from enginekit.checkpointing.loading import resume_newest
from enginekit.checkpointing.saving import Save, nbytes, prepare, settle, write_error
from enginekit.hookspec import hookimpl
from enginekit.plugin_api import FolderBusyError, check_count, lock_folder, unlock_folder

__all__ = ["Checkpoint", "CheckpointError", "CheckpointWriteError"]


class Checkpoint:
    """Save everything a bit-exact resume needs; resume from the newest checkpoint that verifies.

    A checkpoint is the folder ``dir/ckpt-<steps done, 8 digits>/``: model and optimizer through
    ``torch.distributed.checkpoint`` (each rank its shards), the rest in ``state.pt``, and last
    ``manifest.json``, every file's sha256: the commit marker. docs/checkpointing.md has the
    layout, the refusals, resharding and the data order.

    Args:
        dir: folder for checkpoints (created); ``fit`` holds an OS lock on it, one run per folder.
        every_steps: also save after every N-th optimizer step (None: only at epoch ends).
        every_epoch: save at the end of each epoch.
        keep_last: checkpoints kept (>= 1); older ones go only once a newer one is committed.
        resume: restore the newest checkpoint that verifies at the end of ``before_fit``, after every
            other plugin's (none: a fresh start; some but none good: an error).
        strict_plugins: saved state without a registered plugin, or the reverse, is an error (False: a warning).
        overwrite: with ``resume=False`` a folder holding another run's checkpoints is an error (True: deleted).
        async_write: write through DCP's ``async_save`` while training goes on, one save in flight; a
            failure raises at the next save point or the end of fit. A fit's last save is written at once.
        allow_changes: resuming with other settings (engine, plan, optimizer, plugins, number of processes)
            is an error listing each (True: the new ones apply).

    Saves happen in ``on_save_point``: after every ``after_step``/``after_epoch`` implementation, and
    on SIGINT/SIGTERM once the step is done.
    """

    def __init__(
        self,
        dir: str | os.PathLike[str],
        every_steps: int | None = None,
        every_epoch: bool = True,
        keep_last: int = 3,
        resume: bool = False,
        *,
        strict_plugins: bool = True,
        overwrite: bool = False,
        allow_changes: bool = False,
        async_write: bool = True,
    ) -> None:
        if every_steps is not None and (
            isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 1
        ):
            raise ValueError(f"Checkpoint: every_steps must be an int >= 1 or None, got {every_steps!r}")
        check_count("Checkpoint: ", "keep_last", keep_last)
        if not os.fspath(dir):  # Path("") is the current folder: the classic unset variable
            raise ValueError("Checkpoint: dir is empty (an unset variable?); pass the folder for checkpoints")
        if Path(dir).exists() and not Path(dir).is_dir():
            raise ValueError(
                f"Checkpoint: dir {os.fspath(dir)!r} is a file, not a folder; pass a folder for checkpoints"
            )
        if not every_epoch and every_steps is None:
            warnings.warn(
                "Checkpoint: every_epoch=False and no every_steps: it saves only on SIGINT/SIGTERM; pass every_steps=N "
                "or every_epoch=True to save during training",
                stacklevel=2,
            )
        self.dir, self.every_steps, self.every_epoch, self.keep_last = Path(dir), every_steps, every_epoch, keep_last
        self.resume, self.strict_plugins, self.overwrite = resume, strict_plugins, overwrite
        self.allow_changes, self.async_write = allow_changes, async_write
        self.last_saved: int | None = None
        self.resumed_from: Path | None = None
        self.resumed_step: int | None = None  # the step resumed at (equal to the plan's end: nothing ran)
        self.folder = Folder(self.dir)
        self._locked = False
        self._save: Save | None = None  # the one save in flight
        self._group: Any = None  # a gloo group of its own for the saves' collectives (torchrun)
        self._host = backend.HostCopy()
        self._abandon = threading.Event()  # set on a second signal: the write in flight stops
        self._abandoned: str | None = None
        self._needs = 0  # bytes of the save in flight, for "no space left" before any checkpoint is on disk

    # ------------------------------------------------------------------ hooks

    @hookimpl(wrapper=True)
    def before_fit(self, engine: Engine) -> Generator[None, Any, Any]:
        self._abandon.clear()
        self._abandoned = None
        busy = None
        if engine.state.is_main:  # one run per folder, before anything in it is touched
            try:
                lock_folder(self.dir, "run's Checkpoint")
                self._locked = True
            except FolderBusyError as exc:
                busy = str(exc)
        if not engine.all_true(busy is None):
            raise CheckpointError(busy or f"{self.dir} is in use by another run (rank 0 could not lock it)")
        self._join_group(engine)
        result = yield  # every other plugin sets up first; restored state then wins over it
        foreign = not self.resume and self.last_saved is None  # checkpoints there are then another run's
        problem = self.folder.start_run(foreign, self.overwrite) if engine.state.is_main else None
        if not engine.all_true(problem is None):
            raise CheckpointError(problem or f"{self.dir}: rank 0 found checkpoints of another run")
        if self.resume:
            self._resume(engine)
        return result

    @hookimpl
    def after_fit(self, engine: Engine) -> None:
        try:
            self.wait(engine)  # the run is not over before its last checkpoint is on disk
        finally:
            self._close()

    @hookimpl
    def on_exception(self, engine: Engine, error: BaseException) -> None:
        aborted = isinstance(error, TrainingAborted)
        if aborted:
            self._abandon.set()  # a second signal: the write in flight stops at its next write
        try:
            self.wait()  # finish the write in flight: it holds the newest good state
        except CheckpointWriteError as exc:
            if not aborted:
                engine.print(f"Checkpoint: {exc}")
        finally:
            if aborted and engine.state.is_main:
                self.folder.clear_leftovers()  # the abandoned save, and an atomic write cut before its clean-up
                abandoned = f"abandoned the save of {self._abandoned}; " if self._abandoned else ""
                signame = getattr(error, "signame", "signal")
                engine.print(f"Checkpoint: stopped by a second {signame}; {abandoned}{self.folder.newest_line()}")
            self._close()

    @hookimpl
    def on_save_point(self, engine: Engine, reason: str) -> None:
        st = engine.state
        if reason == "signal":  # the last finished step, unless it is saved already or there is none
            if self.last_saved != st.step and st.step > 0:
                self.save(engine, background=False)  # the process is about to exit: write it now
            self.wait(engine)
            return
        if reason == "epoch":
            due = self.every_epoch
        else:
            if st.world_size == 1 and self._save is not None and self._save.done:
                self.wait(engine)  # a background save has ended: its failure surfaces at this step
            epoch_save_follows = self.every_epoch and (
                st.should_stop or st.step_in_epoch >= st.steps_per_epoch or st.step >= st.total_steps
            )
            due = self.every_steps is not None and st.step % self.every_steps == 0 and not epoch_save_follows
        if due:
            self.save(engine)

    # ------------------------------------------------------------------ saving

    def checkpoints(self) -> list[Path]:
        """Checkpoint folders in ``dir``, newest first (nothing verified)."""
        return self.folder.checkpoints()

    def verify(self, path: Path) -> str | None:
        """Why ``path`` must not be loaded (every file hashed), or None."""
        try:
            self.folder.check(Path(path), hash=True)
        except CheckpointError as exc:
            return str(exc)
        return None

    def save(self, engine: Engine, background: bool | None = None) -> Path:
        """Write a checkpoint of the state now (a save point); every rank must call it. In the
        background the state is staged first; :meth:`wait` blocks until it is committed."""
        st = engine.state
        if background is None:  # the run's last save is waited for at the end of fit anyway
            background = self.async_write and not (st.should_stop or st.step >= st.total_steps)
        self.wait(engine)  # one save in flight; a failure of the previous one surfaces here
        path, manifest, tensors, small = prepare(engine, self.folder, skip=self)
        self._join_group(engine)  # a save after fit (the group went with after_fit)
        self._needs = nbytes(tensors) + len(small or b"")
        self._save = Save(self.folder, path, tensors, small, manifest, self._group, self.keep_last)
        self._save.run(background, self._host, self._abandon)
        if not background:
            self.wait(engine)
        self.last_saved = manifest.step
        return path

    def wait(self, engine: Engine | None = None) -> None:
        """Block until the save in flight is committed; raise :class:`CheckpointWriteError` if it failed
        (on every rank, when ``engine`` is given: every rank must call it then)."""
        save = self._save
        error = save.wait() if save is not None else None
        self._save = None  # only once joined: a wait cut short by a second signal leaves it to the next
        if error is not None and save is not None:
            if isinstance(error, (backend.Abandoned, KeyboardInterrupt)):
                self._abandoned = save.path.name
            if isinstance(error, TrainingAborted):
                raise error  # the process ends now; on_exception says what was abandoned
            needs = max(self.folder.newest_size(), self._needs)
            error = write_error(save.path, error, needs, self.folder.newest_line())
        if engine is not None:
            settle(engine, self.folder, error)  # the other ranks must not wait for ever for rank 0
        elif error is not None:
            raise error

    def _join_group(self, engine: Engine) -> None:
        if engine.state.world_size > 1 and self._group is None:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # every rank calls it, in the same order

    def _close(self) -> None:
        self._host.release()
        if self._locked:
            unlock_folder(self.dir)
            self._locked = False
        if self._group is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group(self._group)
            self._group = None

    # ------------------------------------------------------------------ resuming

    def _resume(self, engine: Engine) -> None:
        found = resume_newest(engine, self.folder, self, self.strict_plugins, self.allow_changes, self._group)
        if found is None:
            engine.print(f"Checkpoint: no checkpoint in {self.dir}, starting from scratch")
            return
        opened, _ = found
        engine.load_state_dict(opened.engine)
        self.last_saved = opened.engine["step"]
        self.resumed_from, self.resumed_step, st = opened.path, engine.state.step, engine.state
        if st.step >= st.total_steps:  # said, not a "successful" fit of 0 steps
            engine.print(
                f"Checkpoint: {opened.path.name} is the end of this run's plan (step {st.step} of {st.total_steps}): "
                "the run is already finished, nothing left to train (ask for more epochs or steps to go on)"
            )
            return
        engine.print(f"Checkpoint: resumed from {opened.path.name} (step {st.step}, epoch {st.epoch + 1})")
