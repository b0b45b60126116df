"""Crash-safe checkpoints and exact resume: the hooks, on enginekit.checkpointing's DCP backend."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch

from enginekit import Engine, TrainingAborted
from enginekit.checkpointing import CheckpointError, CheckpointWriteError, Folder, check_same_model, run_settings
from enginekit.checkpointing import dcp as backend
from enginekit.checkpointing.format import FORMAT, VERSION, Manifest, checkpoint_name, unsafe_value
from enginekit.checkpointing.loading import Opened, open_checkpoint
from enginekit.checkpointing.saving import Save, serialize, write_error
from enginekit.checkpointing.settings import compare_settings
from enginekit.checkpointing.storage import remove
from enginekit.hookspec import hookimpl
from enginekit.plugin_api import FolderBusyError, blame, check_count, lock_folder, unlock_folder

__all__ = ["Checkpoint", "CheckpointError", "CheckpointWriteError"]


class Checkpoint:
    """Save everything a bit-exact resume needs; resume from the newest checkpoint that verifies.

    A checkpoint is a folder ``dir/ckpt-<steps done, 8 digits>/``: the model and optimizer through
    ``torch.distributed.checkpoint`` (each rank its shards), the rest (counters, every rank's RNG
    and data position, each stateful plugin's ``state_dict`` under its registration name, the run's
    settings) in ``state.pt``, and last ``manifest.json`` with every file's sha256, the commit
    marker. It resumes on another number of processes or strategy (DCP reshards) at an epoch's
    end; see docs/checkpointing.md for the layout, the refusals and the data order.

    Args:
        dir: folder for checkpoints (created).
        every_steps: also save after every N-th optimizer step (None: only at epoch ends).
        every_epoch: save at the end of each epoch.
        keep_last: how many checkpoints to keep (>= 1); older ones go only after a newer one is committed.
        resume: before the first step, restore the newest checkpoint that verifies (start fresh if
            there is none; fail if there are some and none verifies).
        strict_plugins: state for a plugin that is not registered, or none for one that is, is an
            error; ``False`` accepts it with a warning line.
        overwrite: with ``resume=False``, a folder that holds checkpoints is an error (another run's);
            ``True`` deletes them first.
        async_write: stage the state into host buffers at the save point and write it with DCP's
            ``async_save`` while training goes on; one save in flight (the next waits for it); a failure
            raises at the next save point or the end of fit. The last save of a fit is written at once.
        allow_changes: resuming with other settings (the engine's, the plan's, the optimizer's, any
            plugin's, the number of processes) is an error listing each; ``True`` applies the new ones.

    ``fit`` holds an OS lock on ``dir`` (one run per folder). Saves happen in ``on_save_point``, after
    every ``after_step``/``after_epoch`` implementation (and on SIGINT/SIGTERM once the step is done);
    resuming at the end of ``before_fit``, after every other plugin's ``before_fit``.
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
        self._changes: list[str] = []  # the settings a resume accepted (allow_changes)
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
        if engine.state.world_size > 1 and self._group is None:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # every rank, in the same order
        result = yield  # every other plugin sets up first; restored state then wins over it
        problem = None
        if engine.state.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.folder.clear_leftovers()  # saves a crash cut short; the checkpoints before them are intact
            existing = self.folder.checkpoints()
            if existing and not self.resume and self.last_saved is None:  # not ours: another run's
                if self.overwrite:
                    self.folder.remove_all()
                else:
                    problem = (
                        f"{self.dir} already holds {len(existing)} checkpoint(s) of another run "
                        f"(newest {existing[0].name}); resume it (resume=True, --resume), start over "
                        "(overwrite=True, --overwrite) or use another folder"
                    )
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
        engine.check_finite()  # with sync_every > 1: no state trained on a non-finite loss is written
        state = engine.state_dict()
        path = self.dir / checkpoint_name(state["step"])
        nonfinite = _first_nonfinite(engine.model)
        if not engine.all_true(nonfinite is None):
            raise CheckpointWriteError(
                f"refusing to write {path.name}: the model's weights hold NaN or inf after step {state['step']} "
                f"(first: {nonfinite or 'on another rank'}), so nothing of this state is saved; "
                f"{self.folder.newest_line()}. The update that poisoned them came from a finite loss: check the "
                "learning rate and the data"
            )
        model_sd, optim_sd = backend.state_dicts(engine.model, engine.optimizer)
        small = None
        if st.is_main:
            small = serialize({
                "format": FORMAT, "version": VERSION, "engine": state, "plugins": self._plugin_states(engine),
                "settings": run_settings(engine, skip=self), "param_groups": optim_sd["param_groups"],
            })  # fmt: skip
            if path.exists():  # this step's save cut short earlier, or committed already (a skipped batch moves
                # the epoch's end past what the step save foresaw): replaced, never rewritten in place, so a
                # crash meanwhile leaves a leftover (manifest removed first), not a torn checkpoint
                remove(path)
        manifest = Manifest(state["step"], st.world_size, engine.strategy, {})
        tensors = {"model": model_sd, "optimizer": optim_sd["state"]}
        self._needs = _nbytes(tensors) + len(small or b"")
        self._save = Save(self.folder, path, tensors, small, manifest, self._group, self.keep_last)
        self._save.run(background, self._host, self._abandon)
        if not background:
            self.wait(engine)
        self.last_saved = state["step"]
        return path

    def wait(self, engine: Engine | None = None) -> None:
        """Block until the save in flight is committed; raise :class:`CheckpointWriteError` if it failed
        (on every rank, when ``engine`` is given: every rank must call it then)."""
        save = self._save
        error = save.wait() if save is not None else None
        self._save = None  # only once joined: a wait cut short by a second signal leaves it to the next
        if error is not None and save is not None:
            if isinstance(error, (backend.Abandoned, KeyboardInterrupt)):  # TrainingAborted too
                self._abandoned = save.path.name
            if isinstance(error, TrainingAborted):
                raise error
            needs = max(_bytes_of(self.folder), self._needs)
            error = write_error(save.path, error, needs, self.folder.newest_line())
        if engine is not None:
            ok = engine.all_true(error is None)  # the other ranks must not wait forever for rank 0
            if not ok and engine.state.is_main:
                self.folder.clear_leftovers()
            if error is None and not ok:
                raise CheckpointWriteError(f"another rank failed to write a checkpoint; {self.folder.newest_line()}")
        if error is not None:
            raise error

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

    def _stateful(self, engine: Engine) -> dict[str, Any]:
        return {
            name: p
            for name, p in engine.plugins.items()
            if p is not self
            and callable(getattr(p, "state_dict", None))
            and callable(getattr(p, "load_state_dict", None))
        }

    def _plugin_states(self, engine: Engine) -> dict[str, Any]:
        states = {}
        for name, plugin in self._stateful(engine).items():
            try:
                state = plugin.state_dict()
            except Exception as exc:
                blame(
                    exc,
                    name,
                    "on_save_point",
                    engine.state,
                    f"in its state_dict(), called by Checkpoint to save step {engine.state.step},",
                )
                raise
            bad = unsafe_value(state, name)
            if bad is not None:
                raise CheckpointError(
                    f"plugin {name!r}: state_dict() holds {bad}; checkpoints load with weights_only=True, "
                    "so keep plugin state to tensors, numbers, strings, bools, None, lists, tuples and dicts"
                )
            states[name] = state
        return states

    # ------------------------------------------------------------------ resuming

    def _open_newest(self, engine: Engine) -> Opened | None:
        """Every rank opens the same newest checkpoint that verifies, falling back one at a time;
        none at all is a fresh start, some but none good an error."""
        names = None
        if engine.state.is_main:
            names = [p.name for p, _ in self.folder.candidates(engine.print)]
        names = engine.broadcast_from_main(names)
        problems = []
        for name in names or []:
            try:
                opened: Opened | None = open_checkpoint(self.folder, self.dir / name)
                problem = None
            except (OSError, CheckpointError) as exc:
                opened, problem = None, str(exc)
            if engine.all_true(problem is None):
                return opened
            problems.append(problem or f"{name}: another rank could not read it (every rank must see the same folder)")
            engine.print(f"Checkpoint: skipping {problems[-1]}; trying the previous one")
        if names:
            raise CheckpointError(
                f"no valid checkpoint in {self.dir} ({len(names)} found, none verifies): " + "; ".join(problems)
            )
        return None

    def _resume(self, engine: Engine) -> None:
        while True:
            opened = self._open_newest(engine)
            if opened is None:
                engine.print(f"Checkpoint: no checkpoint in {self.dir}, starting from scratch")
                return
            self._check_fits(engine, opened)
            current_groups = [dict(g) for g in engine.optimizer.param_groups]
            try:
                backend.load(opened.reader, engine.model, engine.optimizer, opened.state["param_groups"], self._group)
                break
            except CheckpointError as exc:  # a shard failed its hash or would not load: the previous one then
                engine.print(f"Checkpoint: skipping {exc}; trying the previous one")
                if engine.state.is_main:
                    opened.path.rename(opened.path.with_name(opened.path.name + ".corrupt"))
        path, saved = opened.path, opened.state
        if engine.state.is_main:
            self.folder.set_aside(newer_than=path.name)  # newer ones failed: pruning must never keep them
        if self._changes:  # allowed: this run's optimizer hyper-parameters win over the checkpoint's
            for group, current in zip(engine.optimizer.param_groups, current_groups):
                group.update({k: v for k, v in current.items() if k not in ("params", "lr")})
        for name, plugin in self._stateful(engine).items():
            if name in saved["plugins"]:
                try:
                    plugin.load_state_dict(saved["plugins"][name])
                except Exception as exc:
                    blame(
                        exc,
                        name,
                        "before_fit",
                        engine.state,
                        f"in its load_state_dict(), called by Checkpoint to resume from {path.name},",
                    )
                    raise
        engine.load_state_dict(saved["engine"])
        self.last_saved = saved["engine"]["step"]
        self.resumed_from, self.resumed_step = path, engine.state.step
        st = engine.state
        if st.step >= st.total_steps:  # said, not a "successful" fit of 0 steps
            engine.print(
                f"Checkpoint: {path.name} is the end of this run's plan (step {st.step} of {st.total_steps}): the run "
                "is already finished, nothing left to train (ask for more epochs or steps to go on)"
            )
            return
        engine.print(f"Checkpoint: resumed from {path.name} (step {st.step}, epoch {st.epoch + 1})")

    def _check_fits(self, engine: Engine, opened: Opened) -> None:
        """Refusals before anything is loaded: another model, other plugins, other settings, a
        position this run's data cannot reach, a world-size change mid-epoch."""
        name, saved, st = opened.path.name, opened.state, engine.state
        written_by, position = opened.manifest.world_size, saved["engine"]["batches_in_epoch"]
        if written_by != st.world_size and position:
            raise CheckpointError(
                f"{name} was written by {written_by} process(es) in the middle of epoch {saved['engine']['epoch'] + 1} "
                f"(micro-batch {position}) and this run has {st.world_size}: the rest of that epoch's data order "
                f"cannot be replayed on another number of processes; resume with {written_by}, or from a "
                "checkpoint at an epoch's end"
            )
        stateful = self._stateful(engine)
        unknown, missing = sorted(set(saved["plugins"]) - set(stateful)), sorted(set(stateful) - set(saved["plugins"]))
        if unknown or missing:
            parts = [f"it holds state for plugin(s) {unknown} that are not registered"] if unknown else []
            parts += [f"it has no state for registered plugin(s) {missing}"] if missing else []
            message = f"{name}: " + " and ".join(parts)
            if self.strict_plugins:
                raise CheckpointError(
                    message + "; register the same plugins under the same names, or pass "
                    "Checkpoint(..., strict_plugins=False) to resume anyway"
                )
            engine.print(f"Checkpoint: warning: {message}; resuming anyway (strict_plugins=False)")
        model_sd = engine.model.state_dict()  # global shapes under FSDP too
        shapes = backend.saved_shapes(opened.reader)
        saved_model = {k.removeprefix("model."): v for k, v in shapes.items() if k.startswith("model.")}
        check_same_model(name, {k: tuple(v.shape) for k, v in model_sd.items()}, saved_model)
        now = run_settings(engine, skip=self)
        if written_by != st.world_size:
            now["engine.world_size"] = st.world_size
            saved["settings"]["engine.world_size"] = written_by
        changes = compare_settings(saved.get("settings") or {}, now, ignore=unknown + missing)
        if changes and not self.allow_changes:
            raise CheckpointError(
                f"{name} was written by a run with other settings ({len(changes)} difference(s)): " + "; ".join(changes)
                + ". Resume with the same settings, or pass Checkpoint(..., allow_changes=True) "
                "(the example: --allow-changes) to apply the new ones from here on"
            )  # fmt: skip
        for change in changes:
            engine.print(f"Checkpoint: resuming with a changed setting, applied from here on: {change}")
        self._changes = changes
        per_epoch = len(engine.train_loader)  # type: ignore[arg-type]
        if position > per_epoch:
            raise CheckpointError(
                f"{name} stands at micro-batch {position} of an epoch, but this run's training loader has "
                f"only {per_epoch} per epoch (other data or batch size?); resume with the same data and batch size"
            )


def _bytes_of(folder: Folder) -> int:
    """About what the next checkpoint takes on disk: the newest committed one's size, if any."""
    for path in folder.committed():
        try:
            return sum(p.stat().st_size for p in path.iterdir())
        except OSError:
            continue
    return 0


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts), this rank's shards under FSDP."""
    if isinstance(obj, torch.Tensor):
        local = _local(obj)
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    return 0


def _first_nonfinite(model: torch.nn.Module) -> str | None:
    """Name of the first parameter holding NaN or inf on this rank (its shard under FSDP), or None.

    A sum per tensor, read back once: a sum is several times cheaper than ``isfinite().all()``;
    a non-finite sum is checked element by element, since huge finite weights can overflow it."""
    named = [(name, _local(p.detach())) for name, p in model.named_parameters()]
    if not named:
        return None
    sums_finite = torch.isfinite(torch.stack([p.sum().float() for _, p in named])).tolist()
    for (name, p), ok in zip(named, sums_finite):
        if not ok and not bool(torch.isfinite(p).all()):
            return name
    return None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # type: ignore[operator]
