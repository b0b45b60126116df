"""The checkpoints of one folder: listing, choosing the newest good one, pruning, clearing leftovers."""

from __future__ import annotations

import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from .format import MANIFEST, NAME, CheckpointError, Manifest, read_manifest, verify_files

__all__ = ["Folder"]


class Folder:
    """A run's checkpoint folder. Only rank 0 changes it (under the run's folder lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def checkpoints(self) -> list[Path]:
        """Checkpoint folders, newest first, committed or not (nothing is read)."""
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.iterdir() if NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def committed(self) -> list[Path]:
        """Checkpoint folders with a manifest (not verified), newest first."""
        return [p for p in self.checkpoints() if _is_dir(p) and (p / MANIFEST).is_file()]

    def clear_leftovers(self) -> list[str]:
        """Remove saves that did not finish (no manifest) and temporary files; their names."""
        removed = []
        for p in self.checkpoints():
            if _is_dir(p) and not (p / MANIFEST).exists():
                shutil.rmtree(p)
                removed.append(p.name)
        for leftover in self.path.glob(".ckpt-*.tmp"):
            leftover.unlink()
        return removed

    def check(self, path: Path, hash: bool = False) -> Manifest:
        """The manifest of ``path`` once it and the files it lists pass the cheap checks (or, with
        ``hash``, their sha256 too); ``CheckpointError`` saying why not."""
        problem = _not_a_checkpoint_folder(path)
        if problem is not None:
            raise CheckpointError(f"{path.name}: {problem}")
        manifest = read_manifest(path)
        verify_files(path, manifest, hash=hash)
        return manifest

    def candidates(self, report: Callable[[str], None]) -> list[tuple[Path, Manifest]]:
        """Every checkpoint that passes the cheap checks, newest first; each other one is reported
        in one line. Raises when there are checkpoints and none passes."""
        found, problems = [], []
        all_ = self.checkpoints()
        for path in all_:
            try:
                found.append((path, self.check(path)))
            except CheckpointError as exc:
                problems.append(str(exc))
                report(f"Checkpoint: skipping {exc}; trying the previous one")
        if all_ and not found:
            raise CheckpointError(
                f"no valid checkpoint in {self.path} ({len(all_)} found, none verifies): " + "; ".join(problems)
            )
        return found

    def newest_line(self) -> str:
        """Which checkpoint is the newest committed one, for error messages (nothing is hashed)."""
        for path in self.committed():
            try:
                self.check(path)
            except CheckpointError:
                continue
            return f"the newest checkpoint on disk is {path.name}"
        return "no checkpoint is on disk yet"

    def newest_size(self) -> int:
        """About what the next checkpoint takes on disk: the newest committed one's size (0: none)."""
        for path in self.committed():
            try:
                return sum(p.stat().st_size for p in path.iterdir())
            except OSError:
                continue
        return 0

    def set_aside(self, newer_than: str, including: bool = False) -> None:
        """Checkpoints newer than the one resumed from failed (``including``: that one too): renamed
        ``.corrupt`` so that pruning never keeps them over good ones, and kept for a look."""
        for bad in self.checkpoints():
            if bad.name > newer_than or (including and bad.name == newer_than):
                target = bad.with_name(bad.name + ".corrupt")
                if target.exists():
                    remove(target)
                bad.rename(target)

    def prune(self, newest: Path, keep_last: int) -> None:
        """Keep the ``keep_last`` newest committed checkpoints up to ``newest``, never that one."""
        kept = [p for p in self.committed() if p.name <= newest.name]
        for old in kept[keep_last:]:
            remove(old)

    def remove_all(self) -> None:
        for path in self.checkpoints():
            remove(path)

    def start_run(self, foreign: bool, overwrite: bool) -> str | None:
        """Ready the folder for a fit (rank 0 only): created, the leftovers of saves a crash cut short
        cleared. With ``foreign`` its checkpoints are another run's: removed with ``overwrite``, else
        the refusal is returned."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.clear_leftovers()
        existing = self.checkpoints()
        if not existing or not foreign:
            return None
        if overwrite:
            self.remove_all()
            return None
        return (
            f"{self.path} already holds {len(existing)} checkpoint(s) of another run (newest {existing[0].name}); "
            "resume it (resume=True, --resume), start over (overwrite=True, --overwrite) or use another folder"
        )


def remove(checkpoint: Path) -> None:
    """Delete a checkpoint: its manifest first, so a crash midway leaves a leftover, not a checkpoint."""
    if not _is_dir(checkpoint):
        checkpoint.unlink()
        return
    (checkpoint / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(checkpoint)


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def _not_a_checkpoint_folder(path: Path) -> str | None:
    try:
        info = path.lstat()  # a symlink is never followed
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISLNK(info.st_mode):
        return "not a folder (a symbolic link: only real folders are candidates)"
    if not stat.S_ISDIR(info.st_mode):
        return "not a checkpoint folder (a file)"
    return None
