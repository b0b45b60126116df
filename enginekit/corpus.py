"""Your own text as a token-shard corpus: the format, and training on it read in place.

Preparation (:func:`prepare_corpus`, ``enginekit prepare``) lives in :mod:`enginekit.prepare`
and is re-exported here; this module holds what a prepared folder is (its manifest, shards and
tokenizer identity) and how it is read.

:class:`TokenDataset` reads windows of ``context_length + 1`` tokens in place from the shards
(``pread``, or a memory map), with the book's stride semantics. Batching them (the seeded shuffle,
ranks, workers, the O(1) resume: :class:`TokenLoader`, :func:`corpus_loaders`) lives in
:mod:`enginekit.token_loader`, re-exported here.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .files import atomic_write

if TYPE_CHECKING:
    from .prepare import prepare_corpus
    from .token_loader import IndexPermutation, TokenLoader, corpus_loaders

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


def __getattr__(name: str) -> Any:
    # prepare_corpus and the loader live in modules that import this one's format and dataset:
    # resolved on first use, so any of them may be imported first
    if name == "prepare_corpus":
        from .prepare import prepare_corpus

        return prepare_corpus
    if name in ("IndexPermutation", "TokenLoader", "corpus_loaders"):
        from . import token_loader

        return getattr(token_loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
