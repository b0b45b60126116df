"""Crash-safe checkpoints and exact resume."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Generator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from enginekit.engine import Engine
from enginekit.files import atomic_write
from enginekit.hookspec import hookimpl

FORMAT = "enginekit-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the run (plugins, format, model).

    The message is one line; ``details`` holds the full list when there is more to say
    (every mismatched tensor of another model, for instance).
    """

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


class _HashingWriter:
    """File wrapper that hashes what torch.save writes, so the file is not read back."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, data: Any) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


class Checkpoint:
    """Save everything a bit-exact resume needs; resume from the newest checkpoint that verifies.

    A checkpoint ``dir/ckpt-<steps done, 8 digits>.pt`` holds the model, the optimizer, the
    engine's counters, data position, GradScaler and RNG states, and the state of every
    registered plugin that has ``state_dict``/``load_state_dict``, under its registration name.
    Beside it, ``ckpt-<N>.pt.sha256`` records its hash in ``sha256sum`` format.

    Args:
        dir: folder for checkpoints (created).
        every_steps: also save after every N-th optimizer step (None: only at epoch ends).
        every_epoch: save at the end of each epoch.
        keep_last: how many checkpoints to keep (>= 1); older ones are deleted only after a
            newer one is safely written.
        resume: before the first step, restore the newest valid checkpoint in ``dir`` (start
            fresh if there is none; fail if there are some and none verifies).
        strict_plugins: a checkpoint that holds state for a plugin that is not registered, or
            lacks state for one that is, is an error; ``False`` accepts it with a warning line.
        overwrite: with ``resume=False``, a folder that already holds checkpoints is an error
            (they belong to another run); ``True`` deletes them first.

    Saves happen in ``on_save_point``, which the engine emits after every implementation of
    ``after_step`` / ``after_epoch`` has returned, so a checkpoint holds every other plugin's
    work for that step or epoch (evaluations draw random numbers too) whatever ``tryfirst`` or
    ``trylast`` they use; and on SIGINT/SIGTERM, once the last step's work is done. A step save
    is skipped when the epoch's save follows at once (the epoch's last step, with
    ``every_epoch``): that one describes the moment after ``after_epoch``. Nothing is saved
    after a non-finite loss or any other error. Resuming happens at the end of ``before_fit``,
    after every other plugin's ``before_fit`` (the code after ``yield`` of a wrapper).
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
    ) -> None:
        if every_steps is not None and (
            isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 1
        ):
            raise ValueError(f"Checkpoint: every_steps must be an int >= 1 or None, got {every_steps!r}")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"Checkpoint: keep_last must be an int >= 1, got {keep_last!r}")
        self.dir = Path(dir)
        self.every_steps = every_steps
        self.every_epoch = every_epoch
        self.keep_last = keep_last
        self.resume = resume
        self.strict_plugins = strict_plugins
        self.overwrite = overwrite
        self.last_saved: int | None = None
        self.resumed_from: Path | None = None

    # ------------------------------------------------------------------ hooks

    @hookimpl(wrapper=True)
    def before_fit(self, engine: Engine) -> Generator[None, Any, Any]:
        result = yield  # every other plugin sets up first; restored state then wins over it
        problem = None
        if engine.state.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.dir.glob(".ckpt-*.tmp"):
                leftover.unlink()  # an interrupted write; the checkpoint it would have replaced is intact
            existing = self.checkpoints()
            if existing and not self.resume:
                if self.overwrite:
                    for old in existing:
                        _remove(old)
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
    def on_save_point(self, engine: Engine, reason: str) -> None:
        st = engine.state
        if reason == "epoch":
            due = self.every_epoch
        elif reason == "signal":
            due = self.last_saved != st.step  # nothing changed since a save of this step
        else:
            epoch_save_follows = self.every_epoch and (
                st.should_stop or st.step_in_epoch >= st.steps_per_epoch or st.step >= st.total_steps
            )
            due = self.every_steps is not None and st.step % self.every_steps == 0 and not epoch_save_follows
        if due:
            self.save(engine)

    # ------------------------------------------------------------------ saving

    def checkpoints(self) -> list[Path]:
        """Checkpoint files in ``dir``, newest first (hashes not checked)."""
        found = [p for p in self.dir.glob("ckpt-*.pt") if _NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def save(self, engine: Engine) -> Path:
        """Write a checkpoint of the state now (a save point); every rank must call it."""
        state = engine.state_dict()
        path = self.dir / f"ckpt-{state['step']:08d}.pt"
        error: BaseException | None = None
        if engine.state.is_main:
            try:
                self._write(engine, path, state)
            except BaseException as exc:  # the other ranks must not wait forever for rank 0
                error = exc
        ok = engine.all_true(error is None)
        if error is not None:
            raise error
        if not ok:
            raise CheckpointError(f"rank 0 failed to write {path.name}")
        self.last_saved = state["step"]
        return path

    def _write(self, engine: Engine, path: Path, state: dict[str, Any]) -> None:
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "model": _unwrap(engine.model).state_dict(),
            "optimizer": engine.optimizer.state_dict(),
            "engine": state,
            "plugins": self._plugin_states(engine),
        }
        digest: list[str] = []

        def write(f: BinaryIO) -> None:
            writer = _HashingWriter(f)
            torch.save(payload, writer)  # type: ignore[arg-type]
            digest.append(writer.sha.hexdigest())

        # The checkpoint is written before its hash: a crash between them leaves a file
        # that fails verification and is skipped, never a hash that vouches for a stale file.
        atomic_write(path, write)
        sha_line = f"{digest[0]}  {path.name}\n".encode()
        atomic_write(path.with_name(path.name + ".sha256"), lambda f: f.write(sha_line))
        self._prune(path)

    def _plugin_states(self, engine: Engine) -> dict[str, Any]:
        states = {}
        for name, plugin in self._stateful(engine).items():
            state = plugin.state_dict()
            bad = _unsafe_value(state, name)
            if bad is not None:
                raise CheckpointError(
                    f"plugin {name!r}: state_dict() holds {bad}; checkpoints load with weights_only=True, "
                    "so keep plugin state to tensors, numbers, strings, bools, None, lists, tuples and dicts"
                )
            states[name] = state
        return states

    def _prune(self, newest: Path) -> None:
        """Keep the ``keep_last`` newest checkpoints up to the one just written, never that one."""
        kept = [p for p in self.checkpoints() if p.name <= newest.name]
        for old in kept[self.keep_last :]:
            _remove(old)

    def _stateful(self, engine: Engine) -> dict[str, Any]:
        return {
            name: p
            for name, p in engine.plugins.items()
            if p is not self
            and callable(getattr(p, "state_dict", None))
            and callable(getattr(p, "load_state_dict", None))
        }

    # ------------------------------------------------------------------ loading

    def verify(self, path: Path) -> str | None:
        """Why ``path`` must not be loaded, or None when its recorded sha256 matches."""
        sha_path = path.with_name(path.name + ".sha256")
        if not sha_path.exists():
            return "no .sha256 file beside it (its write did not finish)"
        try:
            recorded = sha_path.read_text().split()[0]
        except (OSError, IndexError):
            return "its .sha256 file is unreadable"
        try:
            actual = sha256_file(path)
        except OSError as exc:
            return f"unreadable: {type(exc).__name__}: {exc.strerror or exc}"
        if actual != recorded:
            return f"sha256 mismatch (recorded {recorded[:12]}..., file has {actual[:12]}...): truncated or corrupted"
        return None

    def load(self, path: Path, map_location: Any = "cpu") -> dict[str, Any]:
        """Verify and load one checkpoint with ``weights_only=True`` (never unsafe unpickling)."""
        problem = self.verify(path)
        if problem is not None:
            raise CheckpointError(f"{path.name}: {problem}")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path.name}: refused by the safe loader: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{path.name}: not an enginekit checkpoint")
        if payload.get("version") != VERSION:
            raise CheckpointError(
                f"{path.name}: checkpoint format version {payload.get('version')}, expected {VERSION}"
            )
        return payload

    def load_latest(self, engine: Engine | None = None) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies and loads, reporting each skipped one in one line."""
        candidates = self.checkpoints()
        problems = []
        for path in candidates:
            try:
                # RNG states must stay CPU tensors; load_state_dict moves model and optimizer tensors
                return path, self.load(path, map_location="cpu")
            except CheckpointError as exc:
                problems.append(str(exc))
                message = f"Checkpoint: skipping {exc}; trying the previous one"
                engine.print(message) if engine is not None else print(message)
        if candidates:
            raise CheckpointError(
                f"no valid checkpoint in {self.dir} ({len(candidates)} found, none verifies): " + "; ".join(problems)
            )
        return None

    def _resume(self, engine: Engine) -> None:
        found = self.load_latest(engine)
        if found is None:
            engine.print(f"Checkpoint: no checkpoint in {self.dir}, starting from scratch")
            return
        path, payload = found
        if engine.state.is_main:
            # Newer files failed verification: set them aside so pruning never keeps them over good ones.
            for bad in self.checkpoints():
                if bad.name > path.name:
                    bad.rename(bad.with_name(bad.name + ".corrupt"))
                    bad.with_name(bad.name + ".sha256").unlink(missing_ok=True)
        stateful = self._stateful(engine)
        saved = payload["plugins"]
        unknown = sorted(set(saved) - set(stateful))
        missing = sorted(set(stateful) - set(saved))
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"it holds state for plugin(s) {unknown} that are not registered")
            if missing:
                parts.append(f"it has no state for registered plugin(s) {missing}")
            message = f"{path.name}: " + " and ".join(parts)
            if self.strict_plugins:
                raise CheckpointError(
                    message + "; register the same plugins under the same names, or pass "
                    "Checkpoint(..., strict_plugins=False) to resume anyway"
                )
            engine.print(f"Checkpoint: warning: {message}; resuming anyway (strict_plugins=False)")
        _check_same_model(path, _unwrap(engine.model).state_dict(), payload["model"])
        _unwrap(engine.model).load_state_dict(payload["model"])
        engine.optimizer.load_state_dict(payload["optimizer"])
        for name, plugin in stateful.items():
            if name in saved:
                plugin.load_state_dict(saved[name])
        engine.load_state_dict(payload["engine"])
        self.last_saved = payload["engine"]["step"]
        self.resumed_from = path
        engine.print(f"Checkpoint: resumed from {path.name} (step {engine.state.step}, epoch {engine.state.epoch + 1})")


def _check_same_model(path: Path, own: dict[str, Any], saved: dict[str, Any]) -> None:
    """Another model's checkpoint is one line naming the first difference, not torch's page of them."""
    details = [f"missing from the checkpoint: {k}" for k in own if k not in saved]
    details += [f"not in this model: {k}" for k in saved if k not in own]
    details += [
        f"{k}: {tuple(saved[k].shape)} in the checkpoint, {tuple(own[k].shape)} here"
        for k in own
        if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)
    ]
    if details:
        raise CheckpointError(
            f"{path.name} holds another model ({len(details)} difference(s), first: {details[0]}); resume with "
            "the model settings it was trained with, or start a new run in another folder "
            "(CheckpointError.details lists every difference)",
            details,
        )


def _remove(checkpoint: Path) -> None:
    checkpoint.unlink()
    checkpoint.with_name(checkpoint.name + ".sha256").unlink(missing_ok=True)


_PLAIN = (torch.Tensor, bool, int, float, str, type(None))


def _unsafe_value(obj: Any, where: str) -> str | None:
    """Where ``obj`` holds something the weights-only loader would refuse, or None."""
    if isinstance(obj, _PLAIN):
        return None
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _unsafe_value(key, f"{where} key") or _unsafe_value(value, f"{where}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found = _unsafe_value(value, f"{where}[{i}]")
            if found:
                return found
        return None
    return f"a {type(obj).__module__}.{type(obj).__qualname__} at {where}"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module itself under ``torch.compile``, so state-dict keys carry no ``_orig_mod.`` prefix."""
    return getattr(model, "_orig_mod", model)
