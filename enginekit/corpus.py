"""Your own text as a token-shard corpus: prepare it once, then train on it memory-mapped.

Preparation (:func:`prepare_corpus`, ``enginekit prepare``) reads text files, folders, globs,
``.jsonl`` records and ``.gz`` files, tokenizes each document with the bundled GPT-2 tokenizer
followed by ``<|endoftext|>``, on every core, and writes fixed-size token shards plus one
``manifest.json``. The manifest is written last, atomically: a folder without it vouches for
nothing, and a rerun starts over.

Loading (:class:`TokenDataset`, :class:`TokenLoader`, :func:`corpus_loaders`) reads windows of
``context_length + 1`` tokens in place from the shards (``pread``, or a memory map), with the
book's stride semantics.
The loader's shuffle is a keyed bijection of the window index (a Feistel network), so it holds
no per-window objects or arrays, shards by rank under torchrun, and resumes in O(1) from
``state_dict()`` = ``{"epoch", "position", ...}``: the engine stores it in checkpoints.
"""

from __future__ import annotations

import bisect
import codecs
import collections
import glob
import gzip
import hashlib
import io
import json
import mmap
import multiprocessing
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .files import atomic_write, lock_folder, unlock_folder

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
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".jsonl")
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB as uint16
_SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.bin$")
_PIECE_CHARS = 1 << 20  # text handed to a worker at a time: big enough to amortize the pickling
_READ_BYTES = 1 << 20


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


def _dtype_for(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)


def _encode_pieces(pieces: list[str], ends_document: list[bool]) -> np.ndarray:
    """Token ids of text pieces in order, ``<|endoftext|>`` after each piece that ends a document.

    ``encode_ordinary``: a literal "<|endoftext|>" inside a document is text, not a separator.
    """
    from .data import gpt2_tokenizer

    enc = gpt2_tokenizer()
    dtype = _dtype_for(enc.n_vocab)
    end = np.array([enc.eot_token], dtype=dtype)
    parts: list[np.ndarray] = []
    for piece, ends in zip(pieces, ends_document):
        if hasattr(enc, "encode_to_numpy"):
            # encode_ordinary's ids straight into an array: no list of Python ints (about 20% faster)
            parts.append(enc.encode_to_numpy(piece, disallowed_special=()).astype(dtype, copy=False))
        else:
            parts.append(np.asarray(enc.encode_ordinary(piece), dtype=dtype))
        if ends:
            parts.append(end)
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _safe_split(text: str, at: int) -> int:
    """An index near ``at`` where cutting ``text`` leaves GPT-2's tokens unchanged, or -1.

    The pre-tokenizer never joins a newline with the non-space that follows it, nor a
    non-space with the newline after it, so cutting between a newline preceded and followed by
    non-space characters gives the same tokens as the whole text (a test checks it).
    """
    i = text.rfind("\n", 0, at)
    while i > 0:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", 0, i)
    return -1


# ---------------------------------------------------------------------------------------------- sources


def _is_text_file(path: Path) -> bool:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return name.endswith(TEXT_SUFFIXES)


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".jsonl") or name.endswith(".jsonl.gz")


def resolve_sources(sources: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files named by ``sources``: files as given, folders walked (text suffixes, sorted), globs expanded."""
    files: list[Path] = []
    for source in sources:
        text = str(source)
        path = Path(text)
        if glob.has_magic(text) and not path.exists():
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise CorpusError(
                    f"source {text!r} matches no file; check the pattern (quote it so the shell keeps it)"
                )
            files.extend(matches)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and _is_text_file(p)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise CorpusError(
                    f"folder {text} holds no text files ({', '.join(TEXT_SUFFIXES)}, also .gz); "
                    "name other files directly to use them"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusError(f"source {text} does not exist; pass files, folders or quoted globs")
    if not files:
        raise CorpusError("no sources given: pass at least one file, folder or glob")
    return files


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return path.open("rb")


def _decode_error(path: Path, offset: int, exc: UnicodeDecodeError, gz: bool) -> CorpusError:
    where = "byte offset" + (" (uncompressed)" if gz else "")
    return CorpusError(
        f"{path}: not UTF-8 at {where} {offset} (byte 0x{exc.object[exc.start]:02x}); "
        "convert the file to UTF-8, or pass --errors replace (errors='replace') to go on with U+FFFD"
    )


def _text_documents(path: Path, errors: str) -> Iterator[tuple[str, bool]]:
    """One document (the whole file) as pieces of about ``_PIECE_CHARS``, cut where tokens do not change."""
    gz = path.name.lower().endswith(".gz")
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    consumed = 0
    carry = ""
    with _open_binary(path) as f:
        while True:
            block = f.read(_READ_BYTES)
            try:
                carry += decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                # the decoder keeps at most 3 bytes of an unfinished character from earlier blocks
                pending = len(exc.object) - len(block)
                raise _decode_error(path, consumed - pending + exc.start, exc, gz) from None
            consumed += len(block)
            while len(carry) >= 2 * _PIECE_CHARS:
                cut = _safe_split(carry, _PIECE_CHARS)
                if cut <= 0:
                    break  # one long line: keep reading until a safe cut or the end
                yield carry[:cut], False
                carry = carry[cut:]
            if not block:
                break
    yield carry, True


def _jsonl_documents(path: Path, field_name: str, errors: str) -> Iterator[tuple[str, bool]]:
    gz = path.name.lower().endswith(".gz")
    offset = 0
    with _open_binary(path) as f:
        for number, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8", errors)
            except UnicodeDecodeError as exc:
                raise _decode_error(path, start + exc.start, exc, gz) from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{number}: not a JSON record ({exc.msg}); one JSON object per line") from None
            if not isinstance(record, dict) or field_name not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise CorpusError(
                    f"{path}:{number}: no field {field_name!r} (it has: {keys}); pass --field NAME (field=...)"
                )
            value = record[field_name]
            if not isinstance(value, str):
                raise CorpusError(f"{path}:{number}: field {field_name!r} is {type(value).__name__}, not text")
            yield value, True


# ---------------------------------------------------------------------------------------------- writing


@dataclass
class _ShardWriter:
    """One split's shards: fixed ``shard_tokens`` each (the last one shorter), written atomically."""

    folder: Path
    split: str
    shard_tokens: int
    dtype: np.dtype
    shards: list[dict[str, Any]] = field(default_factory=list)
    parts: list[np.ndarray] = field(default_factory=list)
    buffered: int = 0
    tokens: int = 0
    documents: int = 0

    def add(self, ids: np.ndarray) -> None:
        self.parts.append(ids)
        self.buffered += len(ids)
        self.tokens += len(ids)
        while self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.parts)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens :]
            self.parts, self.buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        if self.buffered:
            self._write(np.concatenate(self.parts))
        self.parts, self.buffered = [], 0

    def _write(self, ids: np.ndarray) -> None:
        name = f"{self.split}-{len(self.shards):06d}.bin"
        buf = memoryview(np.ascontiguousarray(ids, dtype=self.dtype)).cast("B")  # type: ignore[arg-type]
        atomic_write(self.folder / name, lambda f: f.write(buf))
        self.shards.append({"file": name, "tokens": len(ids), "sha256": hashlib.sha256(buf).hexdigest()})


def _settings(field_name: str, val_fraction: float, seed: int, errors: str, shard_tokens: int) -> dict[str, Any]:
    return {
        "field": field_name,
        "val_fraction": val_fraction,
        "seed": seed,
        "errors": errors,
        "shard_tokens": shard_tokens,
    }


def _describe_sources(files: list[Path]) -> list[dict[str, Any]]:
    return [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in files]


def _ours(path: Path) -> bool:
    name = path.name
    return (
        bool(_SHARD_NAME.match(name))
        or name in (IN_PROGRESS, VERIFIED, ".enginekit.lock")
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for key in new["settings"]:
        if old.get("settings", {}).get(key) != new["settings"][key]:
            return f"{key} is {old.get('settings', {}).get(key)!r} there, {new['settings'][key]!r} now"
    if old.get("tokenizer") != new["tokenizer"]:
        return "it was tokenized with another tokenizer"
    if old.get("sources") != new["sources"]:
        before = {s["path"]: s["bytes"] for s in old.get("sources", [])}
        now = {s["path"]: s["bytes"] for s in new["sources"]}
        for path in [*now, *before]:
            if before.get(path) != now.get(path):
                what = "new" if path not in before else "gone" if path not in now else "changed size"
                return f"its sources differ ({path}: {what})"
        return "its sources are listed in another order"
    return None


def prepare_corpus(
    sources: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    field: str = "text",
    val_fraction: float = 0.1,
    seed: int = 0,
    errors: str = "strict",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``sources`` into ``out`` (token shards + ``manifest.json``); returns the manifest.

    Args:
        sources: text files, folders (recursive: .txt, .text, .md, .rst, .jsonl, each also .gz),
            globs, ``.jsonl`` (one JSON object per line, the text in ``field``), gzip files.
            A text file is one document; a JSON line is one document.
        out: folder for the shards; new, empty, or holding an unfinished or identical preparation.
        val_fraction: chance that a document goes to the validation split (seeded draws in
            document order); 0 for no validation split.
        seed: seed of the split draws.
        errors: ``"strict"`` (a byte that is not UTF-8 stops with the file and offset) or
            ``"replace"`` (it becomes U+FFFD).
        shard_tokens: tokens per shard file (the last of each split is shorter).
        workers: tokenizer processes (default: the CPUs this process may use).
        progress: show a tqdm bar (MB/s, tokens/s).

    A folder holding a finished preparation of the same sources and settings is returned as is;
    one holding another corpus is refused; an unfinished one is cleared and prepared again.
    """
    if errors not in ("strict", "replace"):
        raise CorpusError(f"errors must be 'strict' or 'replace', got {errors!r}")
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise CorpusError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise CorpusError(f"shard_tokens must be an int >= 1, got {shard_tokens!r}")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise CorpusError(f"workers must be an int >= 1, got {workers!r}")
    files = resolve_sources(sources)
    out = Path(out)
    identity = tokenizer_identity()
    plan = {
        "format": FORMAT,
        "tokenizer": identity,
        "dtype": _dtype_for(identity["n_vocab"]).name,
        "settings": _settings(field, float(val_fraction), int(seed), errors, shard_tokens),
        "sources": _describe_sources(files),
    }
    if (out / MANIFEST).is_file():
        existing = read_manifest(out)
        difference = _first_difference(existing, plan)
        if difference is not None:
            raise CorpusError(
                f"--out {out} already holds another corpus ({difference}); pass a new folder, or delete that one"
            )
        return existing
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} is a file, not a folder; pass a folder")
    strangers = [p.name for p in out.iterdir() if not _ours(p)] if out.is_dir() else []
    if strangers:
        raise CorpusError(
            f"--out {out} holds files that are not a corpus ({', '.join(sorted(strangers)[:3])}); "
            "pass a new or empty folder"
        )
    created = not out.exists()
    lock_folder(out, what="prepare")
    try:
        _clear(out)  # an unfinished earlier run: nothing in it is vouched for
        atomic_write(out / IN_PROGRESS, lambda f: f.write(json.dumps(plan).encode()))
        counts = _tokenize_into(files, out, plan, val_fraction, seed, errors, field, shard_tokens, workers, progress)
        manifest = {**plan, **counts}
        atomic_write(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        (out / IN_PROGRESS).unlink()
    except CorpusError:  # bad input: leave nothing behind (a crash leaves no manifest; a rerun clears)
        _clear(out)
        unlock_folder(out)
        (out / ".enginekit.lock").unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        unlock_folder(out)
    return manifest


def _clear(out: Path) -> None:
    for p in out.iterdir():
        if p.name != ".enginekit.lock" and _ours(p):
            p.unlink()


def _documents(path: Path, field_name: str, errors: str) -> Iterator[tuple[str, bool]]:
    return _jsonl_documents(path, field_name, errors) if _is_jsonl(path) else _text_documents(path, errors)


def _tokenize_into(
    files: list[Path],
    out: Path,
    plan: dict[str, Any],
    val_fraction: float,
    seed: int,
    errors: str,
    field_name: str,
    shard_tokens: int,
    workers: int,
    progress: bool,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    dtype = np.dtype(plan["dtype"])
    writers = {s: _ShardWriter(out, s, shard_tokens, dtype) for s in SPLITS}
    draws = np.random.default_rng(seed)
    total_bytes = sum(s["bytes"] for s in plan["sources"])
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress, smoothing=0.1)
    start = time.perf_counter()
    tokens = 0

    def chunks() -> Iterator[tuple[str, list[str], list[bool], int]]:
        """(split, pieces, ends, bytes of the files finished) in document order, about _PIECE_CHARS each."""
        pieces: list[str] = []
        ends: list[bool] = []
        split, size, done_bytes = "train", 0, 0
        for path, described in zip(files, plan["sources"]):
            for text, end in _documents(path, field_name, errors):
                starts = not pieces or ends[-1]
                if starts and end and not text:
                    continue  # an empty document: no tokens, not even <|endoftext|>, no split drawn
                if starts:  # a new document: draw its split
                    doc_split = "val" if val_fraction > 0 and draws.random() < val_fraction else "train"
                    if pieces and doc_split != split:
                        yield split, pieces, ends, done_bytes
                        pieces, ends, size, done_bytes = [], [], 0, 0
                    split = doc_split
                pieces.append(text)
                ends.append(end)
                size += len(text)
                if size >= _PIECE_CHARS:
                    yield split, pieces, ends, done_bytes
                    pieces, ends, size, done_bytes = [], [], 0, 0
            done_bytes += described["bytes"]
        if pieces:
            yield split, pieces, ends, done_bytes

    def take(split: str, ids: np.ndarray, ends: list[bool], done_bytes: int) -> None:
        nonlocal tokens
        writers[split].add(ids)
        writers[split].documents += sum(ends)
        tokens += len(ids)
        bar.update(done_bytes)
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9) / 1e6:.2f} M tok/s", refresh=False)

    try:
        if workers == 1:
            for split, pieces, ends, done_bytes in chunks():
                take(split, _encode_pieces(pieces, ends), ends, done_bytes)
        else:
            # Processes, not tiktoken's threads: in interleaved rounds on this 2-core machine two
            # processes ran at 1.6x of one thread, encode_ordinary_batch's two threads at 1.3x
            # (benchmarks/corpus.py). A bounded window of tasks keeps memory flat (Pool.imap would
            # read the whole corpus ahead).
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(workers) as pool:
                window: collections.deque = collections.deque()
                for split, pieces, ends, done_bytes in chunks():
                    window.append((split, pool.apply_async(_encode_pieces, (pieces, ends)), ends, done_bytes))
                    if len(window) >= 3 * workers:
                        s, result, e, b = window.popleft()
                        take(s, result.get(), e, b)
                while window:
                    s, result, e, b = window.popleft()
                    take(s, result.get(), e, b)
        for writer in writers.values():
            writer.close()
    finally:
        bar.close()
    if tokens == 0:
        raise CorpusError(
            f"the corpus is empty: {len(files)} file(s), no text in any; check the sources (and --field for .jsonl)"
        )
    n_docs = writers["train"].documents + writers["val"].documents
    if val_fraction > 0 and writers["val"].documents == 0:
        raise CorpusError(
            f"the validation split is empty: none of the {n_docs} document(s) was drawn at val_fraction "
            f"{val_fraction} (a text file is one document); give more documents (files or .jsonl lines), "
            "a larger --val-fraction or another --seed, or --val-fraction 0"
        )
    if writers["train"].documents == 0:
        raise CorpusError(
            f"the training split is empty: all {n_docs} document(s) went to validation; use a smaller --val-fraction"
        )
    return {
        "splits": {s: {"tokens": w.tokens, "documents": w.documents, "shards": w.shards} for s, w in writers.items()},
        "seconds": round(time.perf_counter() - start, 3),
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
