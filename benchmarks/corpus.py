"""The corpus pipeline: preparation throughput, loader cost per batch, memory flat in corpus size, O(1) resume.

python benchmarks/corpus.py                    # 200 MB of text, a 1 GiB token shard (~3-5 min, ~2.5 GB of /tmp)
python benchmarks/corpus.py --text-mb 20 --token-gb 0.1   # a quick look

1. Preparation: `prepare_corpus` over generated text files (random words of The Verdict, lines
   of 3-12 words) against tiktoken's own single-thread `encode_ordinary` over the same text in
   the same run; also tiktoken's threaded `encode_ordinary_batch`, the alternative not taken.
2. Loader: a 1 GiB token shard of random ids (written directly, not tokenized), a shuffled
   TokenLoader of batches 2 x 256: time per batch, the first open's sha256 check and later opens.
3. Memory: peak RSS of a fresh process that opens the corpus and reads 5,000 batches, 1 GiB
   of tokens against 10 MB.
4. Resume: a fresh loader's load_state_dict at position 10^6 and its first batch.

Timings on a shared machine move with the load of other processes: `uptime` is printed first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from enginekit.corpus import FORMAT, TokenDataset, TokenLoader, prepare_corpus, tokenizer_identity
from enginekit.data import gpt2_tokenizer, load_verdict


def generate_text(folder: Path, megabytes: float, file_mb: float = 1.0, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    words = load_verdict().split()
    rng = random.Random(seed)
    files, written, i = [], 0, 0
    target = int(megabytes * 1e6)
    while written < target:
        chunk_words = rng.choices(words, k=int(file_mb * 1e6 / 5.5))
        lines, pos = [], 0
        while pos < len(chunk_words):
            n = rng.randint(3, 12)
            lines.append(" ".join(chunk_words[pos : pos + n]))
            pos += n
        path = folder / f"part{i:05d}.txt"
        data = "\n".join(lines).encode()
        path.write_bytes(data)
        files.append(path)
        written += len(data)
        i += 1
    return files


def bench_prepare(work: Path, text_mb: float, workers: int) -> None:
    files = generate_text(work / "text", text_mb)
    total = sum(p.stat().st_size for p in files)
    enc = gpt2_tokenizer()
    start = time.perf_counter()
    tokens = 0
    for p in files:
        tokens += len(enc.encode_ordinary(p.read_bytes().decode())) + 1
    single = time.perf_counter() - start
    start = time.perf_counter()
    manifest = prepare_corpus(files, work / "prepared", workers=workers, val_fraction=0.1, progress=False)
    prep = time.perf_counter() - start
    prepared_tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    assert prepared_tokens == tokens, (prepared_tokens, tokens)
    sample = [p.read_bytes().decode() for p in files[: max(1, len(files) // 4)]]
    sample_mb = sum(len(s) for s in sample) / 1e6
    start = time.perf_counter()
    enc.encode_ordinary_batch(sample, num_threads=workers)
    threads = time.perf_counter() - start
    start = time.perf_counter()
    for s in sample:
        enc.encode_ordinary(s)
    sample_single = time.perf_counter() - start
    mb = total / 1e6
    print(f"\n1. preparation of {mb:.0f} MB of text ({len(files)} files, {tokens:,} tokens)")
    print(f"   tiktoken encode_ordinary, 1 thread : {mb / single:7.2f} MB/s {tokens / single / 1e6:6.2f} M tok/s")
    print(
        f"   prepare_corpus, {workers} processes     : {mb / prep:7.2f} MB/s {tokens / prep / 1e6:6.2f} M tok/s"
        f"   = {single / prep:.2f}x (reads, tokenizes, hashes, writes shards + manifest)"
    )
    print(
        f"   (not taken) encode_ordinary_batch, {workers} threads on {sample_mb:.0f} MB: "
        f"{sample_single / threads:.2f}x of one thread"
    )


def write_token_corpus(folder: Path, n_tokens: int, seed: int = 0) -> float:
    """A prepared-corpus folder holding one train shard of random ids and a small val shard; returns hash seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    hash_seconds = 0.0
    for split, n in (("train", n_tokens), ("val", 4096)):
        name = f"{split}-000000.bin"
        digest = hashlib.sha256()
        with (folder / name).open("wb") as f:
            left = n
            while left:
                block = rng.integers(0, 50257, size=min(left, 1 << 25), dtype=np.uint16)
                buf = block.tobytes()
                t = time.perf_counter()
                digest.update(buf)
                hash_seconds += time.perf_counter() - t
                f.write(buf)
                left -= len(block)
        splits[split] = {
            "tokens": n,
            "documents": 1,
            "shards": [{"file": name, "tokens": n, "sha256": digest.hexdigest()}],
        }
    manifest = {
        "format": FORMAT,
        "tokenizer": tokenizer_identity(),
        "dtype": "uint16",
        "settings": {},
        "sources": [],
        "splits": splits,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return hash_seconds


def child(folder: str, batches: int) -> None:
    """Open the corpus, read ``batches`` shuffled batches of 2 x 256; print peak RSS in KiB."""
    loader = TokenLoader(TokenDataset(folder, "train", 256), 2, seed=1)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_rss(folder: Path, batches: int) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), str(batches)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def bench_loader(work: Path, token_gb: float) -> None:
    big, small = work / "big", work / "small"
    n_big = int(token_gb * (1 << 30)) // 2
    write_token_corpus(big, n_big)
    write_token_corpus(small, 5_000_000)  # 10 MB
    size_gb = (big / "train-000000.bin").stat().st_size / (1 << 30)
    t = time.perf_counter()
    TokenDataset(big, "train", 256)  # first open: hashes the shard, remembers it
    first_open = time.perf_counter() - t
    t = time.perf_counter()
    ds = TokenDataset(big, "train", 256)
    later_open = time.perf_counter() - t
    TokenDataset(small, "train", 256)
    loader = TokenLoader(ds, 2, seed=1)
    it = iter(loader)
    for _ in range(200):  # warm up
        next(it)
    n = 20_000
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    per_batch = (time.perf_counter() - t) / n
    print(f"\n2. loader over a {size_gb:.2f} GiB token file ({n_big:,} tokens, {len(loader):,} batches of 2 x 256)")
    print(f"   per batch (shuffled, int64 inputs + targets): {per_batch * 1e6:6.1f} us   (target <= 50 us)")
    print(f"   open, first time (sha256 of the shard)      : {first_open:6.2f} s")
    print(f"   open, later (size + mtime as recorded)      : {later_open * 1e3:6.2f} ms")

    rss_big, rss_small = peak_rss(big, 5000), peak_rss(small, 5000)
    print("\n3. peak RSS of a process reading 5,000 batches")
    print(f"   10 MB of tokens: {rss_small / 1024:7.1f} MiB   {size_gb:.2f} GiB of tokens: {rss_big / 1024:7.1f} MiB")
    print(f"   growth: {(rss_big - rss_small) / 1024:+.1f} MiB   (target <= 50 MB)")

    position = 10**6
    if len(loader) <= position:
        print(f"\n4. resume: skipped, {len(loader):,} batches per epoch < 10^6 (use --token-gb 1)")
        return
    state = {**loader.state_dict(), "position": position}
    t = time.perf_counter()
    fresh = TokenLoader(TokenDataset(big, "train", 256), 2, seed=1)
    fresh.load_state_dict(state)
    x, _ = next(iter(fresh))
    resume = time.perf_counter() - t
    expected = ds.batch(loader.windows_of_batch(0, position))[0]
    assert (x == expected).all()
    print(
        f"\n4. resume at position 10^6: new loader, load_state_dict, first batch: {resume * 1e3:.2f} ms (target < 1 s)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-mb", type=float, default=200.0, help="generated text to prepare")
    p.add_argument("--token-gb", type=float, default=1.0, help="GiB of tokens for the loader measures")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"cpus available: {len(os.sched_getaffinity(0))}, workers: {args.workers}")
    work = args.dir or Path(tempfile.mkdtemp(prefix="enginekit-corpus-"))
    try:
        bench_prepare(work, args.text_mb, args.workers)
        bench_loader(work, args.token_gb)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\nuptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
