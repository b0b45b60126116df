"""CPU and wall time of writing one checkpoint of the 124M model and its AdamW state (1.95 GB),
in rotating rounds on an otherwise idle process, four ways:

- ``direct``: past the page cache (``O_DIRECT``, the default where the filesystem allows), each
  big record straight from the host copy's page-aligned memory, its sha256 computed by a second
  thread while it is written;
- ``one thread``: the same, the sha256 of each record computed before it is written;
- ``bounce``: one thread, every byte copied through the writer's aligned block first;
- ``page cache``: through it, synced in slices (where ``O_DIRECT`` is refused).

    python benchmarks/checkpoint_write.py              # 4 rounds, in benchmarks/
    python benchmarks/checkpoint_write.py --rounds 6 --dir /some/disk

Each write is what a background save does after its host copy: serialise, sha256, write, fsync,
rename, hash file. CPU is the process's (user and system; nothing else runs in it meanwhile): the
writing thread's and its hashing thread's, which is what a background write takes from training;
on 2 cores every second of it competes with the training threads. Wall time is what a save that
training waits for (a fit's last one, a synchronous one) costs.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import CONFIGS, machine

from enginekit.gpt import GPTModel
from enginekit.plugins import Checkpoint
from enginekit.plugins import checkpoint as ckpt_module

ROOT = Path(__file__).resolve().parents[1]


def payload() -> dict:
    torch.manual_seed(0)
    model = GPTModel(CONFIGS["124M"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # AdamW's moments exist from the first step on
    # what a background save writes: the host copy, not the live tensors
    return ckpt_module._HostCopy().copy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})


MODES = ("direct", "one thread", "bounce", "page cache")


def write_once(folder: Path, state: dict, mode: str, n: int) -> tuple[float, float, float]:
    """Wall, user and system seconds of one checkpoint write."""
    writer = ckpt_module._HashingWriter
    real = ckpt_module._set_direct, writer.FROM_SOURCE_MIN, writer.HASH_BESIDE_MIN
    if mode == "page cache":
        ckpt_module._set_direct = lambda fd, on: False
    if mode in ("one thread", "bounce"):
        writer.HASH_BESIDE_MIN = 1 << 62
    if mode == "bounce":
        writer.FROM_SOURCE_MIN = 1 << 62
    try:
        checkpoint = Checkpoint(folder, keep_last=1)
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        checkpoint._write_payload(folder / f"ckpt-{n:08d}.pt", state)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        ckpt_module._set_direct, writer.FROM_SOURCE_MIN, writer.HASH_BESIDE_MIN = real
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--dir", type=Path, default=ROOT / "benchmarks", help="where the checkpoints go (a real disk)")
    args = p.parse_args()
    state = payload()
    size = sum(t.numel() * t.element_size() for t in state["model"].values())
    size += sum(t.numel() * t.element_size() for s in state["optimizer"]["state"].values() for t in s.values())
    with tempfile.TemporaryFile(dir=args.dir) as probe:
        direct_here = ckpt_module._set_direct(probe.fileno(), True)
    print(f"machine: {machine()}; state {size / 1e9:.2f} GB; O_DIRECT in {args.dir}: {direct_here}")
    if not direct_here:
        print("(all modes below go through the page cache here)")
    results: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        n = 0
        for r in range(args.rounds):
            for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:  # each mode first in turn
                n += 1
                wall, user, system = write_once(Path(folder), state, mode, n)
                results[mode].append((wall, user, system))
                print(
                    f"round {r + 1}: {mode:10s} wall {wall:5.2f} s  CPU {user + system:5.2f} s "
                    f"(user {user:4.2f}, system {system:4.2f})",
                    flush=True,
                )
    print()
    for mode, rows in results.items():
        cpu = [u + s for _, u, s in rows]
        print(
            f"{mode:10s} median wall {statistics.median(w for w, _, _ in rows):5.2f} s  "
            f"CPU {statistics.median(cpu):5.2f} s [{min(cpu):.2f}..{max(cpu):.2f}]  "
            f"system {statistics.median(s for _, _, s in rows):4.2f} s"
        )


if __name__ == "__main__":
    main()
