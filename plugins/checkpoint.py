"""Crash-safe checkpoints and exact resume."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
import shutil
import stat
import sys
import threading
import warnings
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.utils.serialization import config as serialization_config

from enginekit import Engine, TrainingAborted
from enginekit.hookspec import hookimpl
from enginekit.plugin_api import (
    FolderBusyError,
    atomic_write,
    blame,
    check_count,
    get_logger,
    lock_folder,
    plugin_settings,
    unlock_folder,
)

_log = get_logger(__name__)

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


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions, interrupted, non-finite weights):
    nothing was saved for that moment, and the message says which checkpoint is the newest on disk."""


class _Abandoned(OSError):
    """A background write stopped because a second signal asked the process to end now."""


class _HashingWriter:
    """File wrapper that hashes what torch.save writes, so the file is not read back, and writes
    it to disk past the page cache where the filesystem allows (``O_DIRECT``).

    Through the page cache, each save cost the kernel a copy of 2 GB into fresh pages, their
    writeback and their release, all on the cores that train. Direct writes need none of that:
    the 124M state took 1.66 s of CPU instead of 3.39 s, system time 0.10 s instead of 1.88 s
    (``benchmarks/checkpoint_write.py``, medians of 4 rotating rounds), most of the rest being
    sha256. Big records in page-aligned memory (a background save's host copy) go out from there;
    the rest passes through one aligned 16 MB block. Where direct I/O is refused (macOS,
    some filesystems, a device that wants another alignment), the file goes through the page
    cache, synced in 256 MB slices and dropped from the cache as it goes, so the kernel's own
    full-priority writeback never piles 2 GB of dirty pages up behind training (main job, one
    round each: synchronous saves cost +15.0% sliced, +23.4% unsliced).

    Call :meth:`finish` after the last write (a direct file is written in whole blocks: its tail
    goes out padded, then the file is cut to its true length) and :meth:`close` in any case.
    """

    SLICE = 256 << 20
    BLOCK = 16 << 20
    FROM_SOURCE_MIN = 256 << 10  # records this big are written from their own memory
    HASH_BESIDE_MIN = 256 << 10  # records this big are hashed by a second thread while written
    ALIGN = 4096  # of memory, file offsets and lengths for O_DIRECT on common block devices

    def __init__(self, f: BinaryIO, abandon: threading.Event | None = None) -> None:
        self.f = f
        self.abandon = abandon
        self.fd = f.fileno()
        self.sha = hashlib.sha256()
        self.written = self.synced = 0
        self.failure: OSError | None = None
        self._mmap = mmap.mmap(-1, self.BLOCK)  # page-aligned, as direct I/O needs
        self._block: memoryview | None = memoryview(self._mmap) if _set_direct(self.fd, True) else None
        self._fill = 0

    def write(self, data: bytes | memoryview) -> int:
        try:
            if self.abandon is not None and self.abandon.is_set():
                raise _Abandoned("abandoned after a second signal")
            return self._write(data)
        except OSError as exc:
            # torch.save reports a failed write as "unexpected pos ..."; keep the real cause
            self.failure = exc
            raise

    @property
    def direct(self) -> bool:
        return self._block is not None

    def _write(self, data: bytes | memoryview) -> int:
        """Hash and write ``data``; a big record's hash runs beside its write (both release the GIL).

        One after the other, a 124M save took 1.4 s of sha256 then 1.6 s of disk; beside each
        other, the saves a fit waits for (its last one, any synchronous one) take the longer of
        the two. The hash of ``data`` is finished before this returns, so the hashes stay in file
        order and torch may reuse the buffer."""
        if len(data) < self.HASH_BESIDE_MIN:
            self.sha.update(data)
            return self._write_unhashed(data)
        # a thread of its own (started by this one, so at its idle priority), not an executor:
        # executors refuse work once the interpreter starts shutting down, and a write in flight
        # then must still finish
        hashing = threading.Thread(target=self.sha.update, args=(data,), name="enginekit-sha256")
        try:
            hashing.start()
        except RuntimeError:  # no new threads at this point of shutdown
            self.sha.update(data)
            return self._write_unhashed(data)
        try:
            return self._write_unhashed(data)
        finally:
            hashing.join()

    def _write_unhashed(self, data: bytes | memoryview) -> int:
        if self._block is None:
            return self._write_buffered(data)
        view = memoryview(data).cast("B")
        n, pos = len(view), 0
        if n >= self.FROM_SOURCE_MIN and self.written % self.ALIGN == 0:
            pos = self._write_from_source(view[: n - n % self.ALIGN])
        while pos < n:
            if self._block is None:  # direct writes were refused just now
                self._write_buffered(view[pos:])
                break
            k = min(n - pos, self.BLOCK - self._fill)
            self._block[self._fill : self._fill + k] = view[pos : pos + k]
            self._fill += k
            self.written += k
            pos += k
            if self._fill == self.BLOCK:
                self._write_block(self.BLOCK)
        return n

    def flush(self) -> None:
        """Nothing to do mid-file: a direct file's partial block is written by :meth:`finish`."""
        if self._block is None:
            self.f.flush()

    def finish(self) -> None:
        if self._block is None or self._fill == 0:
            self.flush()
            return
        padded = -(-self._fill // self.ALIGN) * self.ALIGN
        self._block[self._fill : padded] = bytes(padded - self._fill)
        self._write_block(padded)
        self.f.flush()  # a tail refused direct went to the file object's buffer
        os.ftruncate(self.fd, self.written)

    def close(self) -> None:
        """Free the block now rather than with the writer (an error's traceback can keep it)."""
        self._block = None
        try:
            self._mmap.close()
        except BufferError:  # a slice of it is still referenced somewhere: the GC frees it later
            pass

    def _write_block(self, n: int) -> None:
        assert self._block is not None
        block = self._block[:n]
        try:
            done = _os_write(self.fd, block)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise  # ENOSPC and the like: the save fails with the cause in plain words
            done = 0  # the device wants another alignment than this block's
        if done < n:  # refused, or a short write: the rest goes through the page cache
            _set_direct(self.fd, False)
            self._block = None
            self.f.write(block[done:])  # already counted in written
        self._fill = 0

    def _write_from_source(self, part: memoryview) -> int:
        """Write a record's aligned bulk straight from its own memory; how much of it was written.

        The bounce copy into the block held the GIL for 0.3 s per save of the 124M state, time in
        which training's Python could not run; ``os.write`` releases it. Records start aligned
        (``storage_alignment``), and the host copy's buffers are page-aligned. Memory the device
        will not take directly (a live tensor of a foreground save) goes through the block."""
        if self._fill:
            self._write_block(self._fill)  # the headers before this record; aligned, as the record is
            if self._block is None:
                return 0
        try:
            done = _os_write(self.fd, part)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return 0
        self.written += done
        if done < len(part):  # a short write: the rest goes through the page cache
            _set_direct(self.fd, False)
            self._block = None
        return done

    def _write_buffered(self, data: bytes | memoryview) -> int:
        n = self.f.write(data)
        self.written += n
        if self.written - self.synced >= self.SLICE:
            self.f.flush()
            _fdatasync(self.fd)
            if hasattr(os, "posix_fadvise"):  # Linux: these pages are on disk, free them now
                os.posix_fadvise(self.fd, self.synced, self.written - self.synced, os.POSIX_FADV_DONTNEED)
            self.synced = self.written
        return n


_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has only fsync
_os_write = os.write  # the tests replace this one, not os.write itself


def _set_direct(fd: int, on: bool) -> bool:
    """Switch ``O_DIRECT`` on or off for an open file; False where the OS or filesystem refuses."""
    if not hasattr(os, "O_DIRECT"):
        return False
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if on else (flags & ~os.O_DIRECT))
    except OSError:
        return False
    return True


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as f:
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
        async_write: copy the state at the save point (one extra copy of weights, optimizer
            state and the rest, in host buffers kept between saves) and write, hash, fsync and
            rename it in a background thread at the lowest priority while training goes on. At
            most one write is in flight (the next save waits for it); a failed background write
            raises at the next step (or, under torchrun, the next save) or at the end of fit; the
            end of fit and a signal wait for it. The last save of a fit is written at once, with
            no copy. ``False`` writes during the save point, as training waits.
        allow_changes: resuming with other settings than the checkpoint's run (the engine's, the
            plan facts, the optimizer's hyper-parameters, any plugin's constructor settings) is an
            error listing every difference; ``True`` applies the new ones from the resumed step on
            and prints each once.

    One run per folder: ``fit`` holds an OS lock on ``dir`` itself (``.enginekit.lock`` only records
    the holder's pid; deleting it releases nothing), so a second run pointed at it refuses at once
    before touching anything; the kernel drops the lock when the process dies. Only regular files
    are candidates (never a symlink), each taken for the step recorded inside it, not for its name;
    a ``.sha256`` is read only when it is a small regular file. A save that fails (disk full,
    permissions, non-finite weights) raises :class:`CheckpointWriteError` saying why in plain words and
    which checkpoint is the newest on disk; a second SIGINT/SIGTERM during a save abandons it (its
    temporary file removed) and ends fit with :class:`~enginekit.TrainingAborted`, a line naming
    the abandoned save and the newest checkpoint.

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
        self.dir = Path(dir)
        self.every_steps = every_steps
        self.every_epoch = every_epoch
        self.keep_last = keep_last
        self.resume = resume
        self.strict_plugins = strict_plugins
        self.overwrite = overwrite
        self.allow_changes = allow_changes
        self.async_write = async_write
        self.last_saved: int | None = None
        self.resumed_from: Path | None = None
        self.resumed_step: int | None = None  # the step resumed at (equal to the plan's end: nothing ran)
        self._locked = False
        self._writer: threading.Thread | None = None
        self._background_error: BaseException | None = None
        self._host_copy = _HostCopy()
        self._abandon = threading.Event()  # set on a second signal: a write in flight stops
        self._abandoned: str | None = None  # the checkpoint whose write a second signal cut off

    # ------------------------------------------------------------------ hooks

    @hookimpl(wrapper=True)
    def before_fit(self, engine: Engine) -> Generator[None, Any, Any]:
        if engine.strategy == "fsdp" and engine.state.world_size > 1:  # DTensor shards: rank 0 alone cannot save them
            raise CheckpointError(
                "strategy='fsdp' cannot be checkpointed yet (sharded state needs the DCP backend, next); "
                "run without Checkpoint (--no-checkpoint)"
            )
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
        result = yield  # every other plugin sets up first; restored state then wins over it
        problem = None
        if engine.state.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.dir.glob(".ckpt-*.tmp"):
                leftover.unlink()  # an interrupted write; the checkpoint it would have replaced is intact
            existing = self.checkpoints()
            if existing and not self.resume and self.last_saved is None:  # not ours: another run's
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
    def after_fit(self, engine: Engine) -> None:
        try:
            self.wait(engine)  # the run is not over before its last checkpoint is on disk
        finally:
            self._host_copy.release()
            self._unlock()

    @hookimpl
    def on_exception(self, engine: Engine, error: BaseException) -> None:
        aborted = isinstance(error, TrainingAborted)
        if aborted:
            self._abandon.set()  # a second signal: the write in flight stops at its next block
        try:
            self.wait()  # finish the write in flight: it holds the newest good state
        except CheckpointWriteError as exc:
            if not aborted:
                engine.print(f"Checkpoint: {exc}")
        finally:
            self._host_copy.release()
            if aborted and engine.state.is_main:
                # the signal may have cut an atomic write between its rename and its clean-up
                for leftover in self.dir.glob(f".ckpt-*.{os.getpid()}.tmp"):
                    leftover.unlink(missing_ok=True)
                abandoned = f"abandoned the save of {self._abandoned}; " if self._abandoned else ""
                signame = error.signame if isinstance(error, TrainingAborted) else "signal"
                engine.print(
                    f"Checkpoint: stopped by a second {signame}; {abandoned}{self._newest_line(hash=False)}"
                )
            self._unlock()

    def _unlock(self) -> None:
        if self._locked:
            unlock_folder(self.dir)
            self._locked = False

    @hookimpl
    def on_save_point(self, engine: Engine, reason: str) -> None:
        st = engine.state
        if reason == "epoch":
            due = self.every_epoch
        elif reason == "signal":  # the last finished step, unless it is saved already or there is none
            if self.last_saved != st.step and st.step > 0:
                self.save(engine, background=False)  # the process is about to exit: write it now
            self.wait(engine)
            return
        else:
            if st.world_size == 1 and self._writer is not None and not self._writer.is_alive():
                self.wait(engine)  # a background write has ended: its failure surfaces at this step
            if not self._host_copy.reserved and self._background_save_ahead(st):
                self._host_copy.reserve(self._bulk(engine))
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

    def save(self, engine: Engine, background: bool | None = None) -> Path:
        """Write a checkpoint of the state now (a save point); every rank must call it.

        In the background (``async_write``, unless ``background=False`` or no step follows in
        this fit) the state is copied first and this returns once the copy is taken; :meth:`wait`
        blocks until it is on disk.
        """
        if background is None:
            # the run's last save is waited for at the end of fit anyway: written now, it needs no copy
            background = self.async_write and not _fit_ends(engine.state)
        self.wait(engine)  # at most one write in flight; a failure of the previous one surfaces here
        engine.check_finite()  # with sync_every > 1: no state trained on a non-finite loss is written
        state = engine.state_dict()
        path = self.dir / f"ckpt-{state['step']:08d}.pt"
        nonfinite = _first_nonfinite(_unwrap(engine.model))
        if nonfinite is not None:
            raise CheckpointWriteError(
                f"refusing to write {path.name}: the model's weights hold NaN or inf after step {state['step']} "
                f"(first: {nonfinite}), so nothing of this state is saved; {self._newest_line()}. The update "
                "that poisoned them came from a finite loss: check the learning rate and the data"
            )
        error: BaseException | None = None
        if engine.state.is_main:
            payload = self._payload(engine, state, copy=background)
            needs = _estimated_size(self) or _tensor_bytes(engine)
            if background:
                self._writer = threading.Thread(
                    target=self._write_in_background, args=(path, payload, needs), name=f"enginekit-{path.name}"
                )
                self._writer.start()
            else:
                error = self._write_now(path, payload, needs)
        if not background:
            self._agree(engine, error, path)
        self.last_saved = state["step"]
        return path

    def wait(self, engine: Engine | None = None) -> None:
        """Block until a background write is on disk; raise :class:`CheckpointWriteError` if it failed
        (on every rank, when ``engine`` is given: every rank must call it then)."""
        if self._writer is not None:
            self._writer.join()  # cleared after: a second signal during the join leaves it to wait for
            self._writer = None
        error, self._background_error = self._background_error, None
        if engine is not None:
            self._agree(engine, error, None)
        elif error is not None:
            raise error

    def _agree(self, engine: Engine, error: BaseException | None, path: Path | None) -> None:
        ok = engine.all_true(error is None)  # the other ranks must not wait forever for rank 0
        if error is not None:
            raise error
        if not ok:
            what = path.name if path is not None else "a checkpoint"
            raise CheckpointWriteError(f"rank 0 failed to write {what}; {self._newest_line()}")

    def _write_now(self, path: Path, payload: dict[str, Any], needs: int) -> BaseException | None:
        try:
            lock_folder(self.dir, "run's Checkpoint")  # re-entrant; re-taken for a save after after_fit
            try:
                self._write_payload(path, payload)
            finally:
                unlock_folder(self.dir)
        except FolderBusyError as exc:
            return CheckpointWriteError(f"could not write {path.name}: {exc}")
        except BaseException as exc:
            if isinstance(exc, (TrainingAborted, _Abandoned)):
                self._abandoned = path.name
                if isinstance(exc, TrainingAborted):
                    raise  # the process ends now; on_exception says what was abandoned
            return self._write_error(path, exc, needs)
        return None

    def _write_in_background(self, path: Path, payload: dict[str, Any], needs: int) -> None:
        _lowest_priority()
        self._background_error = self._write_now(path, payload, needs)

    def _newest_line(self, hash: bool = True) -> str:
        """Which checkpoint is the newest good one; ``hash=False``: the newest complete one, unhashed
        (a process asked twice to end does not read gigabytes first)."""

        def good(p: Path) -> bool:
            if _not_a_checkpoint_file(p) is not None:
                return False
            return self.verify(p) is None if hash else p.with_name(p.name + ".sha256").is_file()

        newest = next((p for p in self.checkpoints() if good(p)), None)
        return f"the newest checkpoint on disk is {newest.name}" if newest else "no checkpoint is on disk yet"

    def _write_error(self, path: Path, exc: BaseException, needs: int) -> BaseException:
        """Plain words for a failed write, whatever torch's own message was."""
        if isinstance(exc, (KeyboardInterrupt, _Abandoned)):
            cause = "interrupted by a second signal"
        else:
            free = shutil.disk_usage(self.dir).free
            if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or free < needs:
                cause = f"no space left on device (needs ~{needs / 2**20:,.1f} MB, {free / 2**20:,.1f} MB free)"
            elif isinstance(exc, OSError):
                cause = f"{exc.strerror or exc} ({type(exc).__name__})"
            else:
                first = str(exc).splitlines()[0] if str(exc) else ""
                cause = f"{type(exc).__name__}: {first}"
        error = CheckpointWriteError(f"could not write {path.name}: {cause}; {self._newest_line()}")
        error.__cause__ = exc
        return error

    def _background_save_ahead(self, st: Any) -> bool:
        """A background save is due later in this fit, on this rank (the one that writes)."""
        if not (self.async_write and st.is_main):
            return False
        steps_left = st.total_steps - st.step
        return (self.every_steps is not None and self.every_steps < steps_left) or (
            self.every_epoch and st.steps_per_epoch - st.step_in_epoch < steps_left
        )

    @staticmethod
    def _bulk(engine: Engine) -> dict[str, Any]:
        """The state's big tensors, first in every payload."""
        return {"model": _unwrap(engine.model).state_dict(), "optimizer": engine.optimizer.state_dict()}

    def _payload(self, engine: Engine, state: dict[str, Any], copy: bool) -> dict[str, Any]:
        payload = {
            "format": FORMAT,
            "version": VERSION,
            **self._bulk(engine),
            "engine": state,
            "plugins": self._plugin_states(engine),
            "settings": run_settings(engine, skip=self),
        }
        # state_dict()s hand out the live tensors: a background write needs its own copy
        return self._host_copy.copy(payload) if copy else payload

    def _write_payload(self, path: Path, payload: dict[str, Any]) -> None:
        digest: list[str] = []

        def write(f: BinaryIO) -> None:
            writer = _HashingWriter(f, self._abandon)
            # no per-record CRC32: the sha256 of the whole file already guards it, and computing
            # both doubled the CPU time of a save (torch.load does not need the CRCs)
            try:
                # records at page boundaries, so that their bytes can go to the file directly
                align = _HashingWriter.ALIGN if writer.direct else 64
                # torch >= 2.12 keeps config patches per thread; on 2.10-2.11 this one is seen by
                # the whole process, so a torch.save elsewhere during a background write also
                # skips its CRCs and pads to pages (its file still loads)
                patch = serialization_config.patch  # type: ignore[attr-defined]  # installed at run time by torch's config module
                with patch({"save.compute_crc32": False, "save.storage_alignment": align}):
                    torch.save(payload, writer)  # type: ignore[arg-type]
                writer.finish()
            except RuntimeError:
                if writer.failure is None:
                    raise
                raise writer.failure from None
            finally:
                writer.close()
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
            try:
                state = plugin.state_dict()
            except Exception as exc:
                _blame(name, "state_dict", engine, exc, f"to save step {engine.state.step}")
                raise
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
        try:
            info = sha_path.lstat()  # not stat(): a link is never followed, to a FIFO or /dev/zero least of all
        except FileNotFoundError:
            return "no .sha256 file beside it (its write did not finish)"
        except OSError as exc:
            return f"its .sha256 file is unreadable ({exc.strerror or exc})"
        if stat.S_ISLNK(info.st_mode):
            return "its .sha256 file is not a regular file (a symbolic link: only regular files are trusted)"
        if not stat.S_ISREG(info.st_mode):
            return "its .sha256 file is not a regular file"
        if info.st_size > _SHA_FILE_MAX:
            return f"its .sha256 file is {info.st_size} bytes, too big for one hash line"
        try:
            recorded = _read_regular(sha_path, _SHA_FILE_MAX).decode("ascii").split()[0]
        except (OSError, ValueError, IndexError):
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
        problem = _not_a_checkpoint_file(path) or self.verify(path)
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
        named = _NAME.match(path.name)
        engine_state = payload.get("engine")
        held = engine_state.get("step") if isinstance(engine_state, dict) else None
        if named is not None and held != int(named.group(1)):
            # the name orders candidates and pruning; one that lies would roll the run back
            raise CheckpointError(
                f"{path.name}: it holds step {held}, not step {int(named.group(1))} as its name says "
                "(renamed or copied?)"
            )
        return payload

    def load_latest(self, engine: Engine | None = None) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies and loads, reporting each skipped one in one line."""
        candidates = self.checkpoints()
        problems = []
        for path in candidates:
            odd = _not_a_checkpoint_file(path)
            if odd is not None:
                problems.append(f"{path.name}: {odd}")
                message = f"Checkpoint: skipping {path.name}: {odd}; trying the previous one"
                engine.print(message) if engine is not None else _log.info(message)
                continue
            try:
                # RNG states must stay CPU tensors; load_state_dict moves model and optimizer tensors
                return path, self.load(path, map_location="cpu")
            except CheckpointError as exc:
                problems.append(str(exc))
                message = f"Checkpoint: skipping {exc}; trying the previous one"
                engine.print(message) if engine is not None else _log.info(message)
        if candidates:
            raise CheckpointError(
                f"no valid checkpoint in {self.dir} ({len(candidates)} found, none verifies): " + "; ".join(problems)
            )
        return None

    def _check_settings(
        self, engine: Engine, path: Path, saved: dict[str, Any] | None, accepted: list[str]
    ) -> list[str]:
        """Every setting that differs from the checkpoint's run: refused, or listed once when allowed.
        Plugins whose presence ``strict_plugins=False`` already accepted are not compared."""
        if saved is None:
            return []
        now = run_settings(engine, skip=self)
        saved = {k: v for k, v in saved.items() if k.split(".", 1)[0] not in accepted}
        now = {k: v for k, v in now.items() if k.split(".", 1)[0] not in accepted}
        changes = [
            f"{key}: {saved.get(key, '(not set)')!r} in the checkpoint, {now.get(key, '(not set)')!r} now"
            for key in sorted(set(saved) | set(now))
            if saved.get(key) != now.get(key)
        ]
        if changes and not self.allow_changes:
            raise CheckpointError(
                f"{path.name} was written by a run with other settings ({len(changes)} difference(s)): "
                + "; ".join(changes)
                + ". Resume with the same settings, or pass Checkpoint(..., allow_changes=True) "
                "(the example: --allow-changes) to apply the new ones from here on"
            )
        for change in changes:
            engine.print(f"Checkpoint: resuming with a changed setting, applied from here on: {change}")
        return changes

    def _choose(self, engine: Engine) -> tuple[Path, dict[str, Any]] | None:
        """Rank 0 chooses the checkpoint (name and sha256); every rank loads that very file and checks
        its hash, and a rank that cannot is an error on every rank."""
        found = self.load_latest(engine) if engine.state.is_main else None
        choice = None if found is None else (found[0].name, sha256_file(found[0]))
        choice = engine.broadcast_from_main(choice)
        if choice is None:
            return None
        problem = None
        if not engine.state.is_main:
            path = self.dir / choice[0]
            try:
                actual = sha256_file(path)
                if actual != choice[1]:
                    problem = (
                        f"its copy of {path.name} differs from rank 0's "
                        f"(sha256 {actual[:12]}... vs {choice[1][:12]}...)"
                    )
                else:
                    found = (path, self.load(path, map_location="cpu"))
            except (OSError, CheckpointError) as exc:
                problem = f"cannot load {path}: {exc}"
        if not engine.all_true(problem is None):
            where = f"rank {engine.state.rank}: {problem}" if problem else "another rank could not load it"
            raise CheckpointError(
                f"rank 0 chose {choice[0]} to resume from, but {where}; every rank must see the same checkpoint "
                "folder (a shared file system)"
            )
        return found

    def _resume(self, engine: Engine) -> None:
        found = self._choose(engine)
        if found is None:
            engine.print(f"Checkpoint: no checkpoint in {self.dir}, starting from scratch")
            return
        path, payload = found
        if engine.state.is_main:
            # Newer files failed verification: set them aside so pruning never keeps them over good ones
            # (every rank has loaded the chosen one by now).
            for bad in self.checkpoints():
                if bad.name > path.name:
                    bad.rename(bad.with_name(bad.name + ".corrupt"))
                    bad.with_name(bad.name + ".sha256").unlink(missing_ok=True)
        written_by = payload["engine"]["world_size"]
        if written_by != engine.state.world_size:
            raise CheckpointError(
                f"{path.name} was written by {written_by} process(es) but this run has {engine.state.world_size}; "
                "resume with the same number of processes"
            )
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
        changes = self._check_settings(engine, path, payload.get("settings"), accepted=unknown + missing)
        position, per_epoch = payload["engine"]["batches_in_epoch"], len(engine.train_loader)  # type: ignore[arg-type]
        if position > per_epoch:
            raise CheckpointError(
                f"{path.name} stands at micro-batch {position} of an epoch, but this run's training loader has "
                f"only {per_epoch} per epoch (other data or batch size?); resume with the same data and batch size"
            )
        current_groups = [dict(g) for g in engine.optimizer.param_groups]
        _unwrap(engine.model).load_state_dict(payload["model"])
        engine.optimizer.load_state_dict(payload["optimizer"])
        if changes:  # allowed: this run's optimizer hyper-parameters win over the checkpoint's
            for group, current in zip(engine.optimizer.param_groups, current_groups):
                group.update({k: v for k, v in current.items() if k not in ("params", "lr")})
        for name, plugin in stateful.items():
            if name in saved:
                try:
                    plugin.load_state_dict(saved[name])
                except Exception as exc:
                    _blame(name, "load_state_dict", engine, exc, f"to resume from {path.name}")
                    raise
        engine.load_state_dict(payload["engine"])
        self.last_saved = payload["engine"]["step"]
        self.resumed_from, self.resumed_step = path, engine.state.step
        st = engine.state
        if st.step >= st.total_steps:  # said, not a "successful" fit of 0 steps
            engine.print(
                f"Checkpoint: {path.name} is the end of this run's plan (step {st.step} of {st.total_steps}): the run "
                "is already finished, nothing left to train (ask for more epochs or steps to go on)"
            )
            return
        engine.print(f"Checkpoint: resumed from {path.name} (step {st.step}, epoch {st.epoch + 1})")


_IMPLEMENTATION_KEYS = {"params", "lr", "foreach", "fused", "capturable", "differentiable"}


def _blame(name: str, method: str, engine: Engine, exc: Exception, why: str) -> None:
    """A plugin's own method failed while Checkpoint called it: the error names that plugin, not Checkpoint."""
    hook = "before_fit" if method == "load_state_dict" else "on_save_point"
    blame(exc, name, hook, engine.state, f"in its {method}(), called by Checkpoint {why},")


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, (bool, int, float, str, type(None)))


def run_settings(engine: Engine, skip: object = None) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint, as plain values:
    the engine's settings and plan facts, the optimizer's hyper-parameters (not its scheduled lr),
    and every plugin's constructor settings (read from attributes of the same name; paths and
    objects are left out: a copied run folder is not a change)."""
    st = engine.state
    settings: dict[str, Any] = {
        "engine.precision": engine.precision,
        "engine.grad_accum_steps": engine.grad_accum_steps,
        "engine.train batches per epoch": len(engine.train_loader),  # type: ignore[arg-type]
        "engine.train batch size": getattr(engine.train_loader, "batch_size", None),
        "plan.warmup_steps": st.warmup_steps,
        "plan.peak_lrs": list(st.peak_lrs),
        "plan.lr_decay": st.lr_decay,
    }
    if st.lr_decay is not None:  # a decay plans against the run's length; without one a run may grow
        settings["plan.total_steps"] = st.total_steps
    for i, group in enumerate(engine.optimizer.param_groups):
        for key, value in group.items():
            if key not in _IMPLEMENTATION_KEYS and _plain(value):
                settings[f"optimizer.group{i}.{key}"] = list(value) if isinstance(value, tuple) else value
    for name, plugin in engine.plugins.items():
        if plugin is skip:
            continue
        for param, value in plugin_settings(plugin).items():
            if _plain(value):
                settings[f"{name}.{param}"] = list(value) if isinstance(value, tuple) else value
    return settings


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


_SHA_FILE_MAX = 4096  # a sha256sum line is 64 hex digits, two spaces and the name


def _read_regular(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of ``path``, which must be a regular file reached without a symlink.

    ``O_NONBLOCK`` keeps a FIFO put there after the check from blocking the open; ``O_NOFOLLOW``
    refuses a link swapped in after it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _not_a_checkpoint_file(path: Path) -> str | None:
    """Why ``path`` is not even a candidate (a symlink, a device, a folder, an empty file), or None."""
    try:
        info = path.lstat()  # a symlink is never followed: only regular files are candidates
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISLNK(info.st_mode):
        return "not a regular file (a symbolic link: only regular files are candidates)"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size < 22:  # smaller than the end record of any zip archive
        return f"{info.st_size} bytes, too small to be a checkpoint"
    return None


def _lowest_priority() -> None:
    """Let training's threads win every core the writer competes for (Linux scheduling is per thread).

    Measured on 2 cores (124M): at normal priority the step after a background save took 9-13 s
    instead of 3.3 s, as torch's OpenMP threads kept waiting at their barriers for the one the
    writer had displaced. ``SCHED_IDLE`` runs the writer only on a core nothing else wants; where
    it is refused, nice 19 comes closest."""
    if sys.platform.startswith("linux"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
            return
        except OSError:
            pass
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass  # a priority is an optimisation; the write itself must go on


def _fit_ends(state: Any) -> bool:
    """At a save point: no step follows in this fit."""
    return bool(state.should_stop or state.step >= state.total_steps)


class _HostCopy:
    """Copies a payload's tensors into host buffers kept from one save to the next.

    A fresh 2 GB copy per save costs seconds here, most of it the kernel handing out and zeroing
    new pages; copying into the same buffers again costs a memcpy (0.2 s for the 124M state).
    The buffers are reused only after the previous write has finished (``save`` waits for it
    first) and are freed at the end of fit. :meth:`reserve` allocates them ahead of the first
    save, in a thread at idle priority, and has their pages handed out: that first save then
    keeps training waiting no longer than the others (``save()`` returned after 0.30 s in
    ``benchmarks/checkpoint_overlap.py --block 3``, against 4.27 s when it allocated them).

    CUDA tensors are copied into ordinary (pageable) buffers too, so the copy is done when
    ``copy`` returns. Pinned buffers with non-blocking copies were tried on an H200: the main
    job's peak RSS grew by 3.2 GiB (4.54 against 1.34 GiB) for a 1.95 GB state, since torch's
    pinned allocator rounds each block up to a power of two and keeps it cached after use.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._next = 0
        self._reserving: threading.Thread | None = None
        self.reserved = False

    def reserve(self, obj: Any) -> None:
        """Start allocating, in the background, the buffers a copy of ``obj`` (or of a payload
        that begins with tensors like ``obj``'s) will take."""
        layout: list[tuple[torch.Size, torch.dtype]] = []
        _map_tensors(obj, lambda t: layout.append((t.shape, t.dtype)))

        def allocate() -> None:
            _lowest_priority()
            try:
                buffers = [_host_buffer(shape, dtype) for shape, dtype in layout]
                for buffer in buffers:
                    _touch(buffer)
            except (MemoryError, RuntimeError, OSError, ValueError):
                return  # only a head start: the first save then allocates its buffers itself
            self._buffers = buffers

        self.reserved = True
        self._reserving = threading.Thread(target=allocate, name="enginekit-host-buffers", daemon=True)
        self._reserving.start()

    def copy(self, obj: Any) -> Any:
        self._wait()
        self.reserved = True  # these buffers serve from now on: no reservation beside them
        self._next = 0
        return _map_tensors(obj, lambda t: self._copy_tensor(t.detach()))

    def release(self) -> None:
        self._wait()
        self._buffers = []
        self.reserved = False

    def _wait(self) -> None:
        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None

    def _copy_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        i, self._next = self._next, self._next + 1
        if i < len(self._buffers) and self._buffers[i].shape == tensor.shape and self._buffers[i].dtype == tensor.dtype:
            buffer = self._buffers[i]
        else:  # first save, or the state's layout changed (a plugin's state grew): a new buffer
            buffer = _host_buffer(tensor.shape, tensor.dtype)
            if i < len(self._buffers):
                self._buffers[i] = buffer
            else:
                self._buffers.append(buffer)
        return buffer.copy_(tensor)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to each tensor in it, depth first, in insertion order."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _host_buffer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; a big one page-aligned (in its own anonymous mmap, which the
    tensor keeps alive), so that a direct write can take its bytes without a bounce copy."""
    count = shape.numel()
    if count * dtype.itemsize < _HashingWriter.FROM_SOURCE_MIN:
        return torch.empty(shape, dtype=dtype)
    memory = mmap.mmap(-1, count * dtype.itemsize)
    return torch.frombuffer(memory, dtype=dtype, count=count).view(shape)


def _touch(buffer: torch.Tensor, piece: int = 16 << 20) -> None:
    """Have the kernel hand out ``buffer``'s pages now, so the first copy into it does not.

    ``ctypes.memset`` releases the GIL, and 16 MB pieces keep each hold of the process's memory
    map short: an idle-priority thread must not keep training's own allocations waiting (a single
    ``MAP_POPULATE`` of a 150 MB tensor would hold it for the whole tensor)."""
    import ctypes

    start, size = buffer.data_ptr(), buffer.nbytes
    for offset in range(0, size, piece):
        ctypes.memset(start + offset, 0, min(piece, size - offset))


def _first_nonfinite(model: torch.nn.Module) -> str | None:
    """Name of the first parameter holding NaN or inf, or None.

    A sum per tensor, read back once: a tensor with a NaN or inf never has a finite sum, and a
    sum is several times cheaper than ``isfinite().all()``, which builds a mask as big as the
    weights. A non-finite sum is then checked element by element, since huge finite weights
    can overflow a sum too."""
    named = [(name, param.detach()) for name, param in model.named_parameters()]
    if not named:
        return None
    sums_finite = torch.isfinite(torch.stack([p.sum().float() for _, p in named])).tolist()
    for (name, p), ok in zip(named, sums_finite):
        if not ok and not bool(torch.isfinite(p).all()):
            return name
    return None


def _tensor_bytes(engine: Engine) -> int:
    """The bytes of the model's and the optimizer's tensors: about what a first checkpoint takes."""
    tensors = list(_unwrap(engine.model).state_dict().values())
    tensors += [v for state in engine.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _estimated_size(ckpt: Checkpoint) -> int | None:
    """What the next checkpoint will take on disk: the size of the newest one, if any."""
    for path in ckpt.checkpoints():
        try:
            return path.stat().st_size
        except OSError:
            continue
    return None


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
