"""Which part of a background checkpoint write slows training: its sha256, its disk writes, or both.

The 124M model trains at the main job's shape (batch 2 x 256 tokens, AdamW, fp32) in blocks of
``--block`` steps, by hand (no engine, no Checkpoint). Each round has four blocks in an order
that rotates from round to round: a plain one, and three that start a thread at idle priority
(``SCHED_IDLE``, as the checkpoint writer) doing one part of a save over the host copy of the
state (1.95 GB, the tensors of 256 KB and more):

- ``sha``: sha256 of every tensor;
- ``write``: every tensor's aligned bytes written with ``O_DIRECT`` (no hash), then fsync;
- ``both``: the sha256, then the writes.

A block waits for its thread at its end, so work the thread has not done by then is charged to
it. The cost of a part is its block's time minus the plain block's in the same round. Also
printed: the thread's wall and CPU time (how long idle priority stretched it under training).

    python benchmarks/checkpoint_parts.py                 # 8 rounds of 6-step blocks
    python benchmarks/checkpoint_parts.py --block 9 --rounds 4
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import CONFIGS, machine

from enginekit.gpt import GPTModel

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("sha", "write", "both")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", type=int, default=6, help="steps per block")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    if not hasattr(os, "SCHED_IDLE") or not hasattr(os, "O_DIRECT"):
        p.error("needs Linux: SCHED_IDLE and O_DIRECT")
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as folder:
        try:
            os.close(os.open(Path(folder) / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        except OSError as exc:
            p.error(f"benchmarks/ is on a filesystem without O_DIRECT ({exc.strerror}); run it from a disk that has it")
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    cfg = CONFIGS["124M"]
    model = GPTModel({**cfg, "context_length": 256})
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 257))

    def step() -> None:
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # AdamW's moments exist from here on
    tensors = [*model.state_dict().values()]
    tensors += [t for s in optimizer.state_dict()["state"].values() for t in s.values()]
    views = [_page_aligned_copy(t) for t in tensors if t.nbytes >= 256 << 10]  # as a background save's host copy
    print(f"{sum(len(v) for v in views) / 1e9:.2f} GB in {len(views)} tensors")

    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as folder:
        target = Path(folder) / "parts"

        def sha() -> None:
            digest = hashlib.sha256()
            for v in views:
                digest.update(v)

        def write() -> None:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
            try:
                for v in views:
                    os.write(fd, v[: len(v) - len(v) % 4096])
                os.fsync(fd)
            finally:
                os.close(fd)

        work: dict[str, Callable[[], None]] = {"sha": sha, "write": write, "both": lambda: (sha(), write())}
        kinds = ["plain", *PARTS]
        blocks: dict[str, list[float]] = {kind: [] for kind in kinds}
        threads: dict[str, list[tuple[float, float]]] = {part: [] for part in PARTS}
        for r in range(args.rounds):
            for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
                start = time.perf_counter()
                thread = None
                if kind != "plain":
                    thread = threading.Thread(target=_at_idle_priority, args=(work[kind], threads[kind]))
                    thread.start()
                for _ in range(args.block):
                    step()
                if thread is not None:
                    thread.join()
                blocks[kind].append(time.perf_counter() - start)
            print(f"round {r + 1}: " + ", ".join(f"{k} {blocks[k][-1]:.2f} s" for k in kinds), flush=True)
    print()
    for part in PARTS:
        costs = [a - b for a, b in zip(blocks[part], blocks["plain"])]
        walls = [w for w, _ in threads[part]]
        cpus = [c for _, c in threads[part]]
        print(
            f"{part:5s} cost per block: median {statistics.median(costs):+.2f} s "
            f"[{min(costs):+.2f}..{max(costs):+.2f}]; its thread: wall {statistics.median(walls):.2f} s "
            f"[{min(walls):.2f}..{max(walls):.2f}], CPU {statistics.median(cpus):.2f} s"
        )
    print(f"plain block: median {statistics.median(blocks['plain']):.2f} s")


def _page_aligned_copy(tensor: torch.Tensor) -> memoryview:
    memory = mmap.mmap(-1, tensor.nbytes)
    torch.frombuffer(memory, dtype=torch.uint8).copy_(tensor.detach().reshape(-1).view(torch.uint8))
    return memoryview(memory)


def _at_idle_priority(fn: Callable[[], None], out: list[tuple[float, float]]) -> None:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    start, cpu = time.perf_counter(), time.thread_time()
    fn()
    out.append((time.perf_counter() - start, time.thread_time() - cpu))


if __name__ == "__main__":
    main()
