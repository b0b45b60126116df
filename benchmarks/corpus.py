"""The corpus pipeline: preparation throughput, loader cost per batch, memory flat in corpus size, O(1) resume.

python benchmarks/corpus.py                    # 200 MB of text, a 1 GiB token shard (~3-5 min, ~2.5 GB of /tmp)
python benchmarks/corpus.py --text-mb 20 --token-gb 0.1   # a quick look

1. Preparation: `prepare_corpus` over generated text files (random words of The Verdict, lines
   of 3-12 words) against tiktoken's own single-thread `encode_ordinary` over the same text in
   the same run; then interleaved rounds on a tenth of it against tiktoken's threaded
   `encode_ordinary_batch` too, the alternative not taken.
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
import statistics
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


def bench_prepare(work: Path, text_mb: float, workers: int, rounds: int) -> None:
    files = generate_text(work / "text", text_mb)
    total = sum(p.stat().st_size for p in files)
    enc = gpt2_tokenizer()

    def single(paths: list[Path]) -> int:
        return sum(len(enc.encode_ordinary(p.read_bytes().decode())) + 1 for p in paths)

    start, cpu0 = time.perf_counter(), os.times()
    tokens = single(files)
    single_s, cpu1 = time.perf_counter() - start, os.times()
    manifest = prepare_corpus(files, work / "prepared", workers=workers, val_fraction=0.1, progress=False)
    prep_s, cpu2 = time.perf_counter() - single_s - start, os.times()
    single_cpu = cpu1.user + cpu1.system - cpu0.user - cpu0.system
    parent_cpu = cpu2.user + cpu2.system - cpu1.user - cpu1.system
    workers_cpu = cpu2.children_user + cpu2.children_system - cpu1.children_user - cpu1.children_system
    prepared_tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    assert prepared_tokens == tokens, (prepared_tokens, tokens)
    mb = total / 1e6
    print(f"\n1. preparation of {mb:.0f} MB of text ({len(files)} files, {tokens:,} tokens), one pass each")
    print(f"   tiktoken encode_ordinary, 1 thread : {mb / single_s:7.2f} MB/s {tokens / single_s / 1e6:6.2f} M tok/s")
    print(
        f"   prepare_corpus, {workers} processes     : {mb / prep_s:7.2f} MB/s {tokens / prep_s / 1e6:6.2f} M tok/s"
        f"   = {single_s / prep_s:.2f}x (reads, tokenizes, hashes, writes shards + manifest)"
    )
    # CPU seconds do not depend on how much of the CPU other processes take: they say what the
    # same work would give on idle cores (all of it spread over the cores, or the busiest process)
    cores = len(os.sched_getaffinity(0))
    ideal = single_cpu / max(parent_cpu, workers_cpu / workers, (parent_cpu + workers_cpu) / cores)
    print(
        f"   CPU seconds: 1 thread {single_cpu:.1f}; prepare_corpus main process {parent_cpu:.1f} + workers "
        f"{workers_cpu:.1f} = {parent_cpu + workers_cpu:.1f}; on {cores} idle cores that is {ideal:.2f}x"
    )
    # The load of other processes changes within seconds: interleaved rounds on a subset compare
    # the three ways under the same conditions (each ratio is against the single thread of its round).
    subset = files[: max(2, len(files) // 10)]
    texts = [p.read_bytes().decode() for p in subset]
    sub_mb = sum(p.stat().st_size for p in subset) / 1e6
    ratios: dict[str, list[float]] = {"prepare_corpus (processes)": [], "encode_ordinary_batch (threads)": []}
    for r in range(rounds):
        t = time.perf_counter()
        single(subset)
        base = time.perf_counter() - t
        t = time.perf_counter()
        prepare_corpus(subset, work / f"round{r}", workers=workers, val_fraction=0.0, progress=False)
        ratios["prepare_corpus (processes)"].append(base / (time.perf_counter() - t))
        t = time.perf_counter()
        enc.encode_ordinary_batch(texts, num_threads=workers)
        ratios["encode_ordinary_batch (threads)"].append(base / (time.perf_counter() - t))
        shutil.rmtree(work / f"round{r}")
    print(f"   {rounds} interleaved rounds on {sub_mb:.0f} MB, {workers} workers, against 1 thread of each round:")
    for name, values in ratios.items():
        cells = " ".join(f"{v:.2f}x" for v in values)
        print(f"     {name:<33} median {statistics.median(values):.2f}x  ({cells})")


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


def _vm_hwm_kib() -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child started from a big
    # parent would report the parent's peak
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(folder: str, batches: int, access: str) -> None:
    """Open the corpus, read ``batches`` shuffled batches of 2 x 256; print peak RSS in KiB."""
    loader = TokenLoader(TokenDataset(folder, "train", 256, access=access), 2, seed=1)
    read = 0
    while read < batches:  # a small corpus: as many epochs as it takes
        for _ in zip(range(batches - read), loader):
            read += 1
    print(_vm_hwm_kib())


def peak_rss(folder: Path, batches: int, access: str) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), str(batches), access],
        capture_output=True,
        text=True,
        check=True,
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
    print(f"\n2. loader over a {size_gb:.2f} GiB token file ({n_big:,} tokens, batches of 2 x 256)")
    for access in ("pread", "mmap"):
        loader = TokenLoader(TokenDataset(big, "train", 256, access=access), 2, seed=1)
        it = iter(loader)
        for _ in range(200):  # warm up
            next(it)
        n = 20_000
        t = time.perf_counter()
        for _ in range(n):
            next(it)
        per_batch = (time.perf_counter() - t) / n
        print(f"   per batch, access={access:<5} (shuffled, int64 inputs + targets): {per_batch * 1e6:6.1f} us (<= 50)")
    print(f"   open, first time (sha256 of the shard)      : {first_open:6.2f} s")
    print(f"   open, later (size + mtime as recorded)      : {later_open * 1e3:6.2f} ms")

    batches = 20_000
    print(f"\n3. peak RSS (VmHWM) of a fresh process reading {batches:,} shuffled batches")
    for access in ("pread", "mmap"):
        rss_big, rss_small = peak_rss(big, batches, access), peak_rss(small, batches, access)
        print(
            f"   access={access:<5} 10 MB of tokens: {rss_small / 1024:7.1f} MiB, {size_gb:.2f} GiB: "
            f"{rss_big / 1024:7.1f} MiB, growth {(rss_big - rss_small) / 1024:+7.1f} MiB  (<= 50 MB)"
        )
    loader = TokenLoader(ds, 2, seed=1)

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
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the preparation comparison")
    p.add_argument("--only", choices=["prepare", "loader"], default=None, help="run one part")
    p.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"cpus available: {len(os.sched_getaffinity(0))}, workers: {args.workers}")
    work = args.dir or Path(tempfile.mkdtemp(prefix="enginekit-corpus-"))
    try:
        if args.only != "loader":
            bench_prepare(work, args.text_mb, args.workers, args.rounds)
        if args.only != "prepare":
            bench_loader(work, args.token_gb)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\nuptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
