"""The one checkpoint backend: ``torch.distributed.checkpoint`` (DCP), with enginekit's promises.

DCP writes each rank's shards of the model and optimizer (``FileSystemWriter``, one file per
rank) and reshards them on load, so a checkpoint of 2 FSDP ranks loads in one process and the
other way round. What enginekit adds:

- each file is hashed while DCP writes it (no read-back) and while it is read (once: the bytes
  that are hashed are the bytes that are loaded, from one mapping of the file);
- nothing is unpickled freely: DCP's ``.metadata`` goes through an unpickler that builds only
  DCP's own metadata classes, tensors load with ``weights_only=True``, and a pickled object
  among the tensors (DCP's ``BYTE_IO`` items) is refused, since enginekit never writes one;
- a background save is ``async_save`` with the state staged into host buffers kept between
  saves; the collectives of a save run on a gloo group of their own, so a save in flight never
  interleaves with training's collectives.
"""

from __future__ import annotations

import errno
import hashlib
import io
import mmap
import os
import pickle
import sys
import threading
import warnings
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor
from torch.futures import Future as TorchFuture

from .format import CheckpointError, Manifest, check_hash, open_regular

# DCP says so on every save and load of one process, which is what no_dist asks for
warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized", UserWarning)

__all__ = [
    "Abandoned",
    "HostCopy",
    "Reader",
    "Writer",
    "first_failure",
    "load",
    "load_tensors",
    "metadata_classes",
    "save",
    "saved_shapes",
    "state_dicts",
]


class Abandoned(OSError):
    """A write stopped because a second signal asked the process to end now."""


def state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and optimizer's state keyed by parameter name (DTensor shards under FSDP).

    Keyed by name rather than by the optimizer's parameter index, so they load into another
    strategy or world size. On an optimizer that has not stepped, DCP fills in a zero state first
    (the load overwrites it)."""
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=False))


# ---------------------------------------------------------------------------------- writing


class _HashingStream(io.RawIOBase):
    """A file being written, hashed as it goes, past the page cache where the filesystem allows.

    DCP writes through the page cache: each save of the 124M state then cost the kernel a copy
    of 2 GB into fresh pages, their writeback and their release on the cores that train (1.37 s
    of system time per save against 0.14 s written direct, ``benchmarks/checkpoint_backend.py``).
    So the bytes go through one page-aligned block with ``O_DIRECT``; the padded tail is cut off
    at :meth:`close`. Where direct I/O is refused (macOS, tmpfs, a device that wants another
    alignment) the file is written through the page cache. A big write's sha256 runs in a second
    thread beside it (both release the GIL); ``abandon`` set stops the file at the next write.
    """

    BLOCK = 16 << 20
    ALIGN = 4096  # of memory, file offsets and lengths for O_DIRECT on common block devices
    HASH_BESIDE = 1 << 20

    def __init__(self, f: IO[bytes], abandon: threading.Event | None) -> None:
        self.f, self.abandon = f, abandon
        self.fd = f.fileno()
        self.sha = hashlib.sha256()
        self.size = 0
        self._mmap: mmap.mmap | None = None
        self._fill = 0
        if _set_direct(self.fd, True):
            self._mmap = mmap.mmap(-1, self.BLOCK)  # page-aligned, as direct I/O needs

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.abandon is not None and self.abandon.is_set():
            raise Abandoned("abandoned after a second signal")
        view = memoryview(data).cast("B")
        if len(view) < self.HASH_BESIDE:
            self.sha.update(view)
            self._write(view)
        else:
            hashing = threading.Thread(target=self.sha.update, args=(view,), name="enginekit-sha256")
            hashing.start()
            try:
                self._write(view)
            finally:
                hashing.join()
        self.size += len(view)
        return len(view)

    def _write(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            if self._mmap is None:
                self.f.write(view[pos:])
                return
            k = min(len(view) - pos, self.BLOCK - self._fill)
            self._mmap[self._fill : self._fill + k] = view[pos : pos + k]
            self._fill += k
            pos += k
            if self._fill == self.BLOCK:
                self._write_block(self.BLOCK)

    def _write_block(self, n: int) -> None:
        assert self._mmap is not None
        block = memoryview(self._mmap)[:n]
        try:
            done = _os_write(self.fd, block)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise  # ENOSPC and the like: the save fails with the cause in plain words
            done = 0  # the device wants another alignment than this block's
        if done < n:  # refused, or a short write: the rest goes through the page cache
            _set_direct(self.fd, False)
            self.f.write(block[done:])
            self._release()
        block.release()
        self._fill = 0

    def _release(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view of it still lives (an error's traceback): the GC frees it
                pass
            self._mmap = None

    def tell(self) -> int:
        return self.size

    def fileno(self) -> int:
        return self.fd

    def flush(self) -> None:
        # mid-file a direct file keeps its partial block: only whole blocks may go out
        if self._mmap is None and not self.f.closed:
            self.f.flush()

    def close(self) -> None:
        if not self.f.closed:
            try:
                if self._mmap is not None and self._fill:
                    padded = -(-self._fill // self.ALIGN) * self.ALIGN
                    self._mmap[self._fill : padded] = bytes(padded - self._fill)
                    self._write_block(padded)
                    self.f.flush()
                    os.ftruncate(self.fd, self.size)
                self.f.flush()
                os.fsync(self.fd)  # DCP's own fsync came before this tail
            finally:
                self._release()
                self.f.close()
        super().close()


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


class _HashingFileSystem(FileSystem):
    """DCP's local file system, recording the sha256 and size of every file written through it."""

    def __init__(self, abandon: threading.Event | None) -> None:
        self.abandon = abandon
        self.written: dict[str, tuple[str, int]] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with Path(path).open(mode) as f:
            stream = _HashingStream(f, self.abandon)
            try:
                yield cast(io.IOBase, stream)
            finally:
                stream.close()  # DCP closes its data files but not .metadata: its tail goes out here
        self.written[Path(path).name] = (stream.sha.hexdigest(), stream.size)

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        super().rename(path, new_path)
        old = Path(path).name
        if old in self.written:
            self.written[Path(new_path).name] = self.written.pop(old)


class HostCopy:
    """Copies of a state's tensors in host buffers kept from one save to the next.

    A fresh 2 GB copy per save costs seconds here, most of it the kernel handing out and zeroing
    new pages; copying into the same buffers again is a memcpy. A buffer is reused only after
    the previous write has finished (one save in flight)."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._next = 0

    def copy(self, obj: Any) -> Any:
        self._next = 0
        return _map_tensors(obj, self._copy_tensor)

    def release(self) -> None:
        self._buffers = []

    def _copy_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, DTensor):  # its shard is what this rank writes
            return DTensor.from_local(
                self._copy_tensor(tensor.to_local()),
                tensor.device_mesh,
                tensor.placements,
                run_check=False,
                shape=tensor.shape,
                stride=tensor.stride(),
            )
        i, self._next = self._next, self._next + 1
        source = tensor.detach()
        if i < len(self._buffers) and self._buffers[i].shape == source.shape and self._buffers[i].dtype == source.dtype:
            buffer = self._buffers[i]
        else:  # first save, or the layout changed
            buffer = torch.empty(source.shape, dtype=source.dtype)
            if i < len(self._buffers):
                self._buffers[i] = buffer
            else:
                self._buffers.append(buffer)
        return buffer.copy_(source)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class Writer(dcp.FileSystemWriter):
    """DCP's file writer, hashing what it writes; staging (for ``async_save``) copies into ``host``."""

    def __init__(
        self,
        folder: Path,
        host: HostCopy | None = None,
        abandon: threading.Event | None = None,
        background: bool = False,
    ) -> None:
        super().__init__(folder, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=True)
        self.fs = _HashingFileSystem(abandon)
        self.host = host
        self.background = background

    @property
    def written(self) -> dict[str, tuple[str, int]]:
        return cast(_HashingFileSystem, self.fs).written

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return (self.host or HostCopy()).copy(state_dict)

    def write_data(self, plan: Any, planner: Any) -> TorchFuture[list[WriteResult]]:
        if self.background:
            lowest_priority()  # DCP's own thread: training's threads must win every core it wants
        with without_crc32():  # in the thread that writes: torch keeps these settings per thread
            return super().write_data(plan, planner)


def lowest_priority() -> None:
    """Run the calling thread (and the hashing threads it starts) only on cores nothing else wants.

    Linux schedules threads, not processes: at normal priority the writer displaced one of torch's
    OpenMP threads on 2 cores and the whole step waited at its barrier (the step after a
    background save took 9-13 s instead of 3.3 s). ``SCHED_IDLE`` where allowed, else nice 19."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
    except OSError:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass  # a priority is an optimisation; the write itself goes on


def without_crc32() -> Any:
    """``torch.save`` without its per-record CRC32: the sha256 of every file already guards it,
    and computing both cost a save of the 124M state 0.7 s of CPU (``torch.load`` needs no CRC).
    ``torch.utils.serialization.config`` is torch's documented switch; a torch without it fails
    ``tests/checkpointing/test_dcp.py`` naming its version."""
    from torch.utils.serialization import config

    return config.patch({"save.compute_crc32": False})  # type: ignore[attr-defined]  # added by torch's config module


def save(
    folder: Path,
    tensors: dict[str, Any],
    group: dist.ProcessGroup | None,
    *,
    background: bool,
    host: HostCopy | None = None,
    abandon: threading.Event | None = None,
) -> tuple[Writer, Future[Any] | None]:
    """Write ``tensors`` to ``folder`` through DCP; every rank calls it. In the background the state
    is copied into ``host`` first and the returned future completes when the files are synced."""
    writer = Writer(folder, host, abandon, background)
    no_dist = group is None
    if background:
        future = dcp.async_save(tensors, storage_writer=writer, process_group=group, no_dist=no_dist)
        return writer, cast(Future, future)
    dcp.save(tensors, storage_writer=writer, process_group=group, no_dist=no_dist)
    return writer, None


def first_failure(exc: BaseException) -> BaseException:
    """The rank's own error inside DCP's ``CheckpointException`` (which wraps every rank's)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            return inner[0]
    return exc


# ---------------------------------------------------------------------------------- reading


class _MappedFile(io.RawIOBase):
    """A read-only view of a mapped file for DCP's reader (seek, tell, readinto)."""

    def __init__(self, mapped: mmap.mmap | bytes) -> None:
        self.view = memoryview(mapped)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: len(self.view)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        n = max(0, min(len(out), len(self.view) - self.pos))
        out[:n] = self.view[self.pos : self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        self.view.release()
        super().close()


class _VerifyingFileSystem(FileSystem):
    """Opens only the files a manifest lists, as regular files of the recorded size, and hands DCP
    their bytes only once their sha256 matches: the mapping that was hashed is the one read."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder, self.manifest = folder, manifest

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        if "r" not in mode or "+" in mode:
            raise CheckpointError(f"{self.folder.name}: the checkpoint reader opens files to read only")
        with self.mapped(Path(path).name) as stream:
            yield cast(io.IOBase, stream)

    @contextmanager
    def mapped(self, name: str) -> Iterator[_MappedFile]:
        where = self.folder.name
        if name not in self.manifest.files:
            raise CheckpointError(f"{where}: DCP asked for {name}, which the manifest does not list")
        recorded, size = self.manifest.files[name]
        try:
            fd = open_regular(self.folder / name)
        except FileNotFoundError:
            raise CheckpointError(f"{where}: {name} is missing") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{where}: {name}: {exc}") from None
        try:
            actual_size = os.fstat(fd).st_size
            if actual_size != size:
                raise CheckpointError(
                    f"{where}: {name} is {actual_size} bytes, the manifest says {size}: truncated or corrupted"
                )
            mapped: mmap.mmap | bytes = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else b""
        finally:
            os.close(fd)
        try:
            check_hash(where, name, recorded, hashlib.sha256(mapped).hexdigest())
            stream = _MappedFile(mapped)
            try:
                yield stream
            finally:
                stream.close()
        finally:
            if isinstance(mapped, mmap.mmap):
                mapped.close()


def metadata_classes() -> dict[tuple[str, str], Any]:
    """What DCP's ``.metadata`` pickle may build: DCP's metadata classes and the torch values in
    them. The one place that names torch's private classes of the checkpoint format; a torch that
    renames them fails ``tests/checkpointing/test_dcp.py`` naming its version."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata
    from torch.serialization import _get_layout

    allowed: dict[tuple[str, str], Any] = {
        (metadata.__name__, name): getattr(metadata, name)
        for name in dir(metadata)
        if isinstance(getattr(metadata, name), type) or name == "_MEM_FORMAT_ENCODING"
    }
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch.serialization", "_get_layout")] = _get_layout
    allowed[("torch", "Size")] = torch.Size
    for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f: io.RawIOBase, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(f)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_metadata_safely(f: io.RawIOBase) -> Metadata:
    metadata = _MetadataUnpickler(f, metadata_classes()).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"a {type(metadata).__name__}, not DCP metadata")
    return metadata


class Reader(dcp.FileSystemReader):
    """DCP's file reader over :class:`_VerifyingFileSystem`, with the safe metadata unpickler."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        super().__init__(folder)
        self.fs = _VerifyingFileSystem(folder, manifest)
        self.folder = folder
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:  # read once, though both the checks and DCP ask for it
            with cast(_VerifyingFileSystem, self.fs).mapped(".metadata") as f:
                try:
                    metadata = read_metadata_safely(f)
                except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
                    raise CheckpointError(f"{self.folder.name}: .metadata refused by the safe reader: {exc}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            cast(StorageMeta, metadata.storage_meta).load_id = self.load_id
            self._metadata = metadata
        return self._metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CheckpointError(
            f"the checkpoint holds a pickled object at {read_item.dest_index.fqn}; enginekit never writes one, "
            "and loading it would run arbitrary code"
        )


def saved_shapes(reader: Reader) -> dict[str, tuple[int, ...]]:
    """The global shape of every tensor in the checkpoint, by its key (``model.<name>`` ...)."""
    return {
        key: tuple(md.size)
        for key, md in reader.read_metadata().state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }


def load_tensors(reader: Reader, tensors: dict[str, Any], group: dist.ProcessGroup | None = None) -> None:
    """Fill ``tensors`` (nested dicts, DTensors resharded) from the checkpoint in place; every rank
    calls it. Errors of any rank are one :class:`CheckpointError` on every rank."""
    try:
        dcp.load(tensors, storage_reader=reader, planner=_SafeLoadPlanner(), process_group=group, no_dist=group is None)
    except BaseException as exc:  # DCP wraps every rank's error in a BaseException of its own
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        cause = first_failure(exc)
        if isinstance(cause, CheckpointError):
            raise cause from None
        first = (str(cause).splitlines() or [""])[0]
        raise CheckpointError(f"{reader.folder.name}: DCP could not load it: {type(cause).__name__}: {first}") from exc


def load(
    reader: Reader,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    param_groups: list[dict[str, Any]],
    group: dist.ProcessGroup | None,
) -> None:
    """Load the model and optimizer tensors in place (resharded to this run's layout); every rank
    calls it. ``param_groups``: the optimizer's hyper-parameters, keyed by parameter name."""
    model_sd, optim_sd = state_dicts(model, optimizer)
    tensors = {"model": model_sd, "optimizer": optim_sd["state"]}
    load_tensors(reader, tensors, group)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=tensors["model"],
        optim_state_dict={"state": tensors["optimizer"], "param_groups": param_groups},
    )
