"""Opening one checkpoint to resume from: its manifest, its small state and its DCP reader."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..registry import blame
from .dcp import Reader, load, saved_shapes
from .format import FORMAT, STATE, VERSION, CheckpointError, Manifest
from .saving import stateful_plugins
from .settings import check_same_model, compare_settings, run_settings
from .storage import Folder

__all__ = ["Opened", "check_fits", "open_checkpoint", "open_newest", "restore_plugins", "resume_newest"]


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


def open_newest(engine: Any, folder: Folder, report: Callable[[str], None] | None = None) -> Opened | None:
    """Every rank opens the same newest checkpoint that verifies, falling back one at a time;
    none at all is a fresh start, some but none good an error. ``report``: where the skipped
    ones are said (``engine.print``)."""
    report = report or engine.print
    listed: tuple[list[str], str | None] = ([], None)
    if engine.state.is_main:
        try:
            listed = ([p.name for p, _ in folder.candidates(report)], None)
        except CheckpointError as exc:  # said on every rank: the others wait in the broadcast
            listed = ([], str(exc))
    names, error = engine.broadcast_from_main(listed)
    if error is not None:
        raise CheckpointError(error)
    problems = []
    for name in names or []:
        try:
            opened: Opened | None = open_checkpoint(folder, folder.path / name)
            problem = None
        except (OSError, CheckpointError) as exc:
            opened, problem = None, str(exc)
        main_ok = engine.broadcast_from_main(problem is None)
        if engine.all_true(problem is None):
            return opened
        if main_ok:  # rank 0 read it: not a bad checkpoint but a folder some rank does not see
            where = f"rank {engine.state.rank}: {problem}" if problem else "another rank could not read it"
            raise CheckpointError(
                f"rank 0 chose {name} to resume from, but {where}; every rank must see the same checkpoint "
                "folder (a shared file system)"
            )
        problems.append(problem or f"{name}: unreadable on rank 0")
        report(f"Checkpoint: skipping {problems[-1]}; trying the previous one")
    if names:
        raise CheckpointError(
            f"no valid checkpoint in {folder.path} ({len(names)} found, none verifies): " + "; ".join(problems)
        )
    return None


def check_fits(
    engine: Any,
    opened: Opened,
    stateful: dict[str, Any],
    now: dict[str, Any],
    strict_plugins: bool,
    allow_changes: bool,
) -> list[str]:
    """Refusals before anything is loaded: another model, other plugins, other settings, a
    position this run's data cannot reach, a world-size change mid-epoch. Returns the settings that
    changed (allowed by ``allow_changes``). ``now``: this run's :func:`~.settings.run_settings`."""
    name, saved, st = opened.path.name, opened.state, engine.state
    written_by, position = opened.manifest.world_size, saved["engine"]["batches_in_epoch"]
    if written_by != st.world_size and position:
        raise CheckpointError(
            f"{name} was written by {written_by} process(es) in the middle of epoch {saved['engine']['epoch'] + 1} "
            f"(micro-batch {position}) and this run has {st.world_size}: the rest of that epoch's data order "
            f"cannot be replayed on another number of processes; resume with {written_by}, or from a "
            "checkpoint at an epoch's end"
        )
    unknown, missing = sorted(set(saved["plugins"]) - set(stateful)), sorted(set(stateful) - set(saved["plugins"]))
    if unknown or missing:
        parts = [f"it holds state for plugin(s) {unknown} that are not registered"] if unknown else []
        parts += [f"it has no state for registered plugin(s) {missing}"] if missing else []
        message = f"{name}: " + " and ".join(parts)
        if strict_plugins:
            raise CheckpointError(
                message + "; register the same plugins under the same names, or pass "
                "Checkpoint(..., strict_plugins=False) to resume anyway"
            )
        engine.print(f"Checkpoint: warning: {message}; resuming anyway (strict_plugins=False)")
    model_sd = engine.model.state_dict()  # global shapes under FSDP too
    shapes = saved_shapes(opened.reader)
    saved_model = {k.removeprefix("model."): v for k, v in shapes.items() if k.startswith("model.")}
    check_same_model(name, {k: tuple(v.shape) for k, v in model_sd.items()}, saved_model)
    if written_by != st.world_size:
        now["engine.world_size"] = st.world_size
        saved["settings"]["engine.world_size"] = written_by
    changes = compare_settings(saved.get("settings") or {}, now, ignore=unknown + missing)
    if changes and not allow_changes:
        raise CheckpointError(
            f"{name} was written by a run with other settings ({len(changes)} difference(s)): " + "; ".join(changes)
            + ". Resume with the same settings, or pass Checkpoint(..., allow_changes=True) "
            "(the example: --allow-changes) to apply the new ones from here on"
        )  # fmt: skip
    for change in changes:
        engine.print(f"Checkpoint: resuming with a changed setting, applied from here on: {change}")
    per_epoch = len(engine.train_loader)
    if position > per_epoch:
        raise CheckpointError(
            f"{name} stands at micro-batch {position} of an epoch, but this run's training loader has "
            f"only {per_epoch} per epoch (other data or batch size?); resume with the same data and batch size"
        )
    return changes


def restore_plugins(stateful: dict[str, Any], saved: dict[str, Any], engine: Any, where: str) -> None:
    """Each plugin's saved state back through its ``load_state_dict``; a failure names that plugin."""
    for name, plugin in stateful.items():
        if name in saved:
            try:
                plugin.load_state_dict(saved[name])
            except Exception as exc:
                why = f"in its load_state_dict(), called by Checkpoint to resume from {where},"
                blame(exc, name, "before_fit", engine.state, why)
                raise


def resume_newest(
    engine: Any, folder: Folder, skip: object, strict_plugins: bool, allow_changes: bool, group: Any
) -> tuple[Opened, list[str]] | None:
    """Load the newest checkpoint that verifies and fits this run into its model, optimizer and
    plugins, falling back past one whose shards fail; None: there is none, a fresh start. Returns
    it and the settings that changed (``allow_changes``). The engine's own state is the caller's."""
    said: set[str] = set()

    def report_once(line: str) -> None:  # a fallback lists the older candidates again
        if line not in said:
            said.add(line)
            engine.print(line)

    while True:
        opened = open_newest(engine, folder, report_once)
        if opened is None:
            return None
        stateful = stateful_plugins(engine, skip)
        now = run_settings(engine, skip=skip)
        changes = check_fits(engine, opened, stateful, now, strict_plugins, allow_changes)
        current_groups = [dict(g) for g in engine.optimizer.param_groups]
        try:
            load(opened.reader, engine.model, engine.optimizer, opened.state["param_groups"], group)
            break
        except CheckpointError as exc:  # a shard failed its hash or would not load: the previous one then
            report_once(f"Checkpoint: skipping {exc}; trying the previous one")
            if engine.state.is_main:
                folder.set_aside(newer_than=opened.path.name, including=True)
    if engine.state.is_main:
        folder.set_aside(newer_than=opened.path.name)  # newer ones failed: pruning must never keep them
    if changes:  # allowed: this run's optimizer hyper-parameters win over the checkpoint's
        for g, current in zip(engine.optimizer.param_groups, current_groups):
            g.update({k: v for k, v in current.items() if k not in ("params", "lr")})
    restore_plugins(stateful, opened.state["plugins"], engine, opened.path.name)
    return opened, changes
