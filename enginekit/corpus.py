"""Your own text as a token-shard corpus: the format, and training on it read in place.

Preparation (:func:`prepare_corpus`, ``enginekit prepare``) lives in :mod:`enginekit.prepare`
and is re-exported here; this module holds what a prepared folder is (its manifest, shards and
tokenizer identity) and how it is read.

Loading (:class:`TokenDataset`, :class:`TokenLoader`, :func:`corpus_loaders`) reads windows of
``context_length + 1`` tokens in place from the shards (``pread``, or a memory map), with the
book's stride semantics.
The loader's shuffle is a keyed bijection of the window index (a Feistel network), so it holds
no per-window objects or arrays, shards by rank under torchrun, and resumes in O(1) from
``state_dict()`` = ``{"epoch", "position", ...}``: the engine stores it in checkpoints.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .files import atomic_write

if TYPE_CHECKING:
    from .prepare import prepare_corpus

__all__ = [
    "CorpusError",
    "IndexPermutation",
    "TokenDataset",
    "TokenLoader",
    "corpus_loaders",
    "prepare_corpus",
    "read_manifest",
    "tokenizer_identity",
]

FORMAT = "enginekit-corpus/1"
MANIFEST = "manifest.json"
IN_PROGRESS = ".prepare.json"  # written first: marks a folder this module may clean on a rerun
VERIFIED = ".verified.json"  # which shards were hashed, by size and mtime (see TokenDataset)
SPLITS = ("train", "val")


class CorpusError(ValueError):
    """Bad input to preparation or loading: the message is one line saying what and what to do."""


# ---------------------------------------------------------------------------------------------- tokenizer


def tokenizer_identity() -> dict[str, Any]:
    """What a manifest records of the tokenizer: the bundled files' sha256, the vocabulary, the end id."""
    from . import data  # imported here: enginekit.data re-exports this module's entry points

    enc = data.gpt2_tokenizer()
    return {
        "name": enc.name,
        "encoder_json_sha256": data._ENCODER_JSON_SHA256,
        "vocab_bpe_sha256": data._VOCAB_BPE_SHA256,
        "n_vocab": enc.n_vocab,
        "endoftext": enc.eot_token,
    }


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a prepared folder, checked for format and tokenizer (one-line errors otherwise)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        unfinished = (
            " (an unfinished preparation: run enginekit prepare again)" if (folder / IN_PROGRESS).exists() else ""
        )
        raise CorpusError(f"{folder} is not a prepared corpus: it has no {MANIFEST}{unfinished}")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path} is not valid JSON ({exc}); prepare the corpus again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusError(f"{path} is not an enginekit corpus manifest (format {FORMAT}); prepare the corpus again")
    if manifest.get("tokenizer") != tokenizer_identity():
        theirs = manifest.get("tokenizer", {})
        raise CorpusError(
            f"{folder} was tokenized with another tokenizer ({theirs.get('name')!r}, encoder.json sha256 "
            f"{str(theirs.get('encoder_json_sha256'))[:12]}...) than the bundled GPT-2 one; prepare it again here"
        )
    return manifest


# ---------------------------------------------------------------------------------------------- loading


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:  # read(), not the memory map: hashing must not grow the RSS by the shard
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class TokenDataset(Dataset):
    """Windows over one split of a prepared corpus, read in place; item ``i`` is ``(inputs, targets)``.

    The split's shards are one token stream; window ``i`` starts at token ``i * stride`` and
    holds ``context_length + 1`` tokens (a window may span two shards), starts
    ``range(0, tokens - context_length, stride)`` as the book's ``GPTDatasetV1``.

    ``verify`` says when shards are checked against the manifest's sha256:
    ``"once"`` (default) hashes a shard the first time it is opened and records its size and
    mtime in ``.verified.json``; later opens hash only shards whose size or mtime changed
    (hashing runs at about 1-2 GB/s, so a 10 GB corpus costs seconds once, not at every start).
    ``"always"`` hashes every open; ``"size"`` checks sizes only. Sizes are always checked.

    ``access`` says how windows are read, never the whole split into memory: ``"pread"``
    (default) one ``os.pread`` per window (about 5 us); ``"mmap"`` slices of a memory map (about
    3.5 us), whose pages stay mapped once touched: the kernel maps whole cached folios around
    each fault, so on this machine 20,000 random windows put all of a 1 GiB shard in the RSS
    (page cache, reclaimable, but counted as the process's), while pread keeps it flat
    (``benchmarks/corpus.py``).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        split: str = "train",
        context_length: int = 256,
        stride: int | None = None,
        *,
        verify: str = "once",
        access: str = "pread",
    ) -> None:
        if split not in SPLITS:
            raise CorpusError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
            raise CorpusError(f"context_length must be an int >= 1, got {context_length!r}")
        stride = context_length if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise CorpusError(f"stride must be an int >= 1, got {stride!r}")
        if verify not in ("once", "always", "size"):
            raise CorpusError(f"verify must be 'once', 'always' or 'size', got {verify!r}")
        if access not in ("pread", "mmap"):
            raise CorpusError(f"access must be 'pread' or 'mmap', got {access!r}")
        self.access = access
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.split, self.context_length, self.stride = split, context_length, stride
        self.dtype = np.dtype(self.manifest["dtype"])
        info = self.manifest["splits"][split]
        self.shards: list[dict[str, Any]] = info["shards"]
        self.tokens = int(info["tokens"])
        if self.tokens <= context_length:
            hint = (
                "prepared with --val-fraction 0"
                if split == "val" and self.tokens == 0
                else "fewer than one window needs"
            )
            raise CorpusError(
                f"corpus {self.folder}: the {split} split has {self.tokens} tokens ({hint}), and context_length "
                f"{context_length} needs {context_length + 1}; use a smaller context, more text, or a larger "
                "--val-fraction"
            )
        self._check_files(verify)
        self._sizes = [int(s["tokens"]) for s in self.shards]
        self._offsets = [0]
        for size in self._sizes[:-1]:
            self._offsets.append(self._offsets[-1] + size)
        self._n = len(range(0, self.tokens - context_length, stride))
        self._maps: list[Any] | None = None

    def _check_files(self, verify: str) -> None:
        record_path = self.folder / VERIFIED
        try:
            record = json.loads(record_path.read_text()) if verify == "once" and record_path.is_file() else {}
        except (ValueError, OSError):
            record = {}
        changed = False
        for shard in self.shards:
            path = self.folder / shard["file"]
            try:
                st = path.stat()
            except FileNotFoundError:
                raise CorpusError(f"corpus {self.folder}: shard {shard['file']} is missing; prepare it again") from None
            expected = int(shard["tokens"]) * self.dtype.itemsize
            if st.st_size != expected:
                raise CorpusError(
                    f"corpus {self.folder}: shard {shard['file']} has {st.st_size} bytes, the manifest says "
                    f"{expected} (truncated or changed); prepare the corpus again"
                )
            stamp = [st.st_size, st.st_mtime_ns, shard["sha256"]]
            if verify == "size" or (verify == "once" and record.get(shard["file"]) == stamp):
                continue
            if _sha256_file(path) != shard["sha256"]:
                raise CorpusError(
                    f"corpus {self.folder}: shard {shard['file']} does not match its sha256 in {MANIFEST} "
                    "(damaged or changed since prepare); prepare the corpus again"
                )
            record[shard["file"]] = stamp
            changed = True
        if verify == "once" and changed:
            try:  # best effort: a read-only corpus is verified again next time, never trusted unchecked
                atomic_write(record_path, lambda f: f.write(json.dumps(record).encode()))
            except OSError:
                pass

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None  # each worker opens the files itself (pickling a memory map would copy it)
        return state

    def _open(self) -> list[Any]:
        """Per process, on first use: a file descriptor per shard ("pread") or a memory map ("mmap")."""
        if self._maps is None:
            if self.access == "pread":
                self._maps = [os.open(self.folder / shard["file"], os.O_RDONLY) for shard in self.shards]
            else:
                maps = []
                for shard in self.shards:
                    path, n = self.folder / shard["file"], int(shard["tokens"])
                    mm = np.memmap(path, dtype=self.dtype, mode="r", shape=(n,))
                    raw = getattr(mm, "_mmap", None)
                    if raw is not None and hasattr(mmap, "MADV_RANDOM"):
                        raw.madvise(mmap.MADV_RANDOM)  # shuffled windows: read-ahead only wastes
                    # a plain ndarray view: slicing an np.memmap builds a memmap object each time (4x slower)
                    maps.append(np.asarray(mm))
                self._maps = maps
        return self._maps

    def _piece(self, shard: int, offset: int, length: int) -> np.ndarray:
        source = self._open()[shard]
        if self.access == "mmap":
            return source[offset : offset + length]
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(source, length * size, offset * size), dtype=self.dtype)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split's stream, across shard boundaries."""
        s = bisect.bisect_right(self._offsets, start) - 1
        offset = start - self._offsets[s]
        if offset + length <= self._sizes[s]:
            return self._piece(s, offset, length)
        parts = []
        while length > 0:
            take = min(length, self._sizes[s] - offset)
            parts.append(self._piece(s, offset, take))
            length -= take
            s, offset = s + 1, 0
        return np.concatenate(parts)

    def __del__(self) -> None:
        maps = getattr(self, "_maps", None)
        if getattr(self, "access", None) == "pread" and maps:
            for fd in maps:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __len__(self) -> int:
        return self._n

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``indices`` stacked: ``(inputs, targets)``, int64 tensors of shape (len, context_length)."""
        ctx = self.context_length
        x = np.empty((len(indices), ctx), dtype=np.int64)
        y = np.empty((len(indices), ctx), dtype=np.int64)
        for row, i in enumerate(indices):
            if not 0 <= i < self._n:
                raise IndexError(f"window {i} out of range for {self._n} windows")
            w = self.read(i * self.stride, ctx + 1)
            x[row] = w[:-1]
            y[row] = w[1:]
        return torch.from_numpy(x), torch.from_numpy(y)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if idx < 0:
            idx += self._n
        x, y = self.batch([idx])
        return x[0], y[0]


# ---------------------------------------------------------------------------------------------- shuffling

_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finalizer: a cheap, well-spread 64-bit hash."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class IndexPermutation:
    """A seeded permutation of ``range(n)`` computed one index at a time, in O(1) memory.

    A 4-round Feistel network on the smallest power of two >= n (unbalanced halves, so the
    domain is < 2n), with cycle walking: values >= n are encrypted again until they fall in
    range, which keeps it a bijection on ``range(n)``; on average fewer than 2 passes. The round
    function is multiply-shift hashing (the top bits of ``(right ^ key) * odd`` mod 2^64), one
    multiplication, so an index costs about a microsecond in Python. Memory is a few ints
    whatever ``n`` (``torch.randperm(n)`` would take 8 bytes per window: 4 GB for 500M windows
    at stride 1).
    """

    ROUNDS = 4
    _ODD = 0x9E3779B97F4A7C15

    def __init__(self, n: int, seed: int, epoch: int = 0) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._left, self._right = bits // 2, bits - bits // 2
        base = _mix64(_mix64(seed & _M64) ^ _mix64((epoch + 1) & _M64))
        # each round: (key, bits of the half it writes); the halves alternate between a and b bits
        widths = [self._left if r % 2 == 0 else self._right for r in range(self.ROUNDS)]
        self._rounds = [(_mix64(base + r), 64 - w) for r, w in enumerate(widths)]

    def _encrypt(self, x: int) -> int:
        b = self._right  # x = left << b | right: left of a bits, right of b bits
        left, right = x >> b, x & ((1 << b) - 1)
        for key, shift in self._rounds:
            left, right = right, left ^ ((((right ^ key) * self._ODD) & _M64) >> shift)
        return (left << b) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a permutation of {self.n}")
        x = self._encrypt(i)
        while x >= self.n:
            x = self._encrypt(x)
        return x


# ---------------------------------------------------------------------------------------------- the loader


class _BatchPlan:
    """Which windows batch ``b`` of epoch ``e`` holds on this rank: a pure function, shared with workers."""

    def __init__(
        self, dataset: TokenDataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool, rank: int, world: int
    ) -> None:
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.windows = len(dataset)
        self.per_rank = self.windows // world  # the tail < world is left out: no window twice in an epoch
        self.batches = self.per_rank // batch_size if drop_last else -(-self.per_rank // batch_size)
        self._perm: IndexPermutation | None = None
        self._perm_epoch = -1

    def windows_of(self, epoch: int, b: int) -> list[int]:
        first, last = b * self.batch_size, min((b + 1) * self.batch_size, self.per_rank)
        positions = [k * self.world + self.rank for k in range(first, last)]
        if not self.shuffle:
            return positions
        if self._perm is None or self._perm_epoch != epoch:
            self._perm, self._perm_epoch = IndexPermutation(self.windows, self.seed, epoch), epoch
        return [self._perm(g) for g in positions]

    def fetch(self, epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.batch(self.windows_of(epoch, b))


class _Batches(Dataset):
    """Item ``(epoch, b)`` is a whole batch: workers build batches, the main process only receives them."""

    def __init__(self, plan: _BatchPlan) -> None:
        self.plan = plan

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.plan.fetch(*key)

    def __len__(self) -> int:
        return self.plan.batches


class _Keys(Sampler):
    def __init__(self, epoch: int, start: int, stop: int) -> None:
        self.epoch, self.start, self.stop = epoch, start, stop

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, b) for b in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _env_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class TokenLoader:
    """Batches of a :class:`TokenDataset`, shuffled per epoch by a seeded :class:`IndexPermutation`.

    Epoch ``e`` on rank ``r`` of ``world_size`` takes the permuted windows at global positions
    ``r, r + world_size, ...`` (disjoint across ranks, together all windows but a tail shorter
    than ``world_size``), ``batch_size`` at a time. The order depends only on ``seed``, the epoch
    and the corpus, not on ``num_workers`` (workers build whole batches, delivered in order).

    Position: ``state_dict()`` is ``{"epoch", "position"}`` (batches the epoch's iterator has
    handed over) plus the facts a resume must share; ``load_state_dict()`` makes the next
    ``iter()`` start there, computing nothing it skips: O(1) at any position. The epoch's
    iterator is the first ``iter()`` after ``set_epoch``, ``load_state_dict`` or the end of
    the previous epoch; exhausting it moves to the next epoch. Any other ``iter()`` meanwhile
    (an evaluation of training loss on this loader, a validation loader read again) starts the
    current epoch from its first batch and moves nothing, so evaluating never shifts the
    training position and always sees the same batches. The engine calls ``set_epoch(e)``
    before each epoch.

    Rank and world size default to torch.distributed's, else the ``RANK``/``WORLD_SIZE`` that
    torchrun sets; the engine keeps such a loader as it is under torchrun.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CorpusError(f"batch_size must be an int >= 1, got {batch_size!r}")
        env_rank, env_world = _env_rank()
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise CorpusError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.drop_last, self.num_workers, self.pin_memory = drop_last, num_workers, pin_memory
        self.prefetch_factor = prefetch_factor
        self._plan = _BatchPlan(dataset, batch_size, shuffle, seed, drop_last, self.rank, self.world_size)
        if self._plan.batches == 0:
            raise CorpusError(
                f"{dataset.split} split of {dataset.folder}: {len(dataset)} window(s) of context "
                f"{dataset.context_length} over {self.world_size} process(es) give no batch of {batch_size} "
                "(drop_last); use a smaller batch size, a smaller stride, or more text"
            )
        self.epoch, self.position = 0, 0
        self._resume_at: int | None = None
        self._epoch_iter: int | None = None  # id of the epoch's iterator; None: the next iter() is it
        self._iters = 0

    def __len__(self) -> int:
        return self._plan.batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position, self._resume_at, self._epoch_iter = epoch, 0, None, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "windows": self._plan.windows,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("windows", "batch_size", "world_size", "rank", "seed", "shuffle"):
            if state.get(key) != mine[key]:
                raise CorpusError(
                    f"loader state is for {key}={state.get(key)!r}, this loader has {key}={mine[key]!r}; "
                    "resume with the same corpus, context, stride, batch size, seed and process count"
                )
        if not 0 <= state["position"] <= len(self):
            raise CorpusError(f"loader position {state['position']} is outside this loader's {len(self)} batches")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._resume_at, self._epoch_iter = self.position, None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._iters += 1
        if self._epoch_iter is not None:  # the epoch is being read: an independent pass from its start
            return self._batches(self.epoch, 0, None)
        # resumed at the very end of an epoch: nothing is left of it, the next iter() is the next epoch
        start, self._resume_at = self._resume_at or 0, None
        self.position, self._epoch_iter = start, self._iters
        return self._batches(self.epoch, start, self._iters)

    def _batches(self, epoch: int, start: int, owner: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # an independent pass (an evaluation reading a few batches) is read here: starting workers
        # for it would cost more than the batches
        if self.num_workers == 0 or owner is None:
            source: Iterator[Any] = (self._plan.fetch(epoch, b) for b in range(start, len(self)))
        else:
            source = iter(
                torch.utils.data.DataLoader(
                    _Batches(self._plan),
                    batch_size=None,
                    sampler=_Keys(epoch, start, len(self)),
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory,
                    prefetch_factor=self.prefetch_factor,
                    # its own generator: a DataLoader with workers draws their base seed from the global
                    # RNG otherwise, and dropout downstream would differ from a run with num_workers=0
                    generator=torch.Generator().manual_seed(self.seed),
                )
            )
        for batch in source:
            if self.pin_memory and (self.num_workers == 0 or owner is None):
                batch = (batch[0].pin_memory(), batch[1].pin_memory())
            # counted when handed over, not when fetched: prefetched batches are not consumed yet
            if owner is not None and owner == self._epoch_iter:
                self.position += 1
            yield batch
        if owner is not None and owner == self._epoch_iter:
            self.epoch, self.position, self._epoch_iter = epoch + 1, 0, None

    def windows_of_batch(self, epoch: int, b: int) -> list[int]:
        """The window indices of batch ``b`` of ``epoch`` on this rank (for tests and inspection)."""
        return self._plan.windows_of(epoch, b)


def corpus_loaders(
    folder: str | os.PathLike[str],
    batch_size: int = 2,
    context_length: int = 256,
    *,
    stride: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    verify: str = "once",
    access: str = "pread",
) -> tuple[TokenLoader, TokenLoader]:
    """Train and validation loaders over a prepared corpus, as :func:`~enginekit.data.verdict_loaders` is for the story.

    Stride defaults to the context length (no overlap, as appendix D). The training loader
    shuffles (seeded), drops the last partial batch, shards by rank under torchrun and uses
    ``num_workers``; the validation loader neither shuffles nor drops, every rank reads all of
    it, in the main process (an evaluation reads a few batches: workers would cost more).
    """
    train = TokenLoader(
        TokenDataset(folder, "train", context_length, stride, verify=verify, access=access),
        batch_size,
        seed=seed,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    val = TokenLoader(
        TokenDataset(folder, "val", context_length, stride, verify=verify, access=access),
        batch_size,
        shuffle=False,
        drop_last=False,
        rank=0,
        world_size=1,
        pin_memory=pin_memory,
    )
    return train, val



def __getattr__(name: str) -> Any:
    # prepare_corpus lives in enginekit.prepare, which imports this module's format and errors:
    # resolved on first use, so either module may be imported first
    if name == "prepare_corpus":
        from .prepare import prepare_corpus

        return prepare_corpus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
