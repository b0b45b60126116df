"""Preparing a corpus: text in, token shards and a manifest out (``enginekit prepare``).

:func:`prepare_corpus` reads text files, folders, globs, ``.jsonl`` records and ``.gz`` files,
tokenizes each document with the bundled GPT-2 tokenizer followed by ``<|endoftext|>``, on
every core (a process pool: measured faster here than tiktoken's threaded batch encoding), and
writes fixed-size token shards plus one ``manifest.json``. The manifest is written last,
atomically: a folder without it vouches for nothing, and a rerun starts over. Reading a prepared
folder is :mod:`enginekit.corpus`.
"""

from __future__ import annotations

import codecs
import collections
import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import FORMAT, IN_PROGRESS, MANIFEST, SPLITS, VERIFIED, CorpusError, read_manifest, tokenizer_identity
from .files import atomic_write, lock_folder, unlock_folder

__all__ = ["DEFAULT_SHARD_TOKENS", "TEXT_SUFFIXES", "prepare_corpus", "resolve_sources"]

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".jsonl")
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB as uint16
_SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.bin$")
_PIECE_CHARS = 1 << 20  # text handed to a worker at a time: big enough to amortize the pickling
_READ_BYTES = 1 << 20


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
