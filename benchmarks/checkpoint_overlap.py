"""What one checkpoint save costs training, measured inside one process in back-to-back blocks.

The main job's fit time drifts by 10% or more between identical runs on this VM, more than the
cost being measured. Here the 124M model trains at the main job's shape (batch 2 x 256 tokens,
AdamW, fp32) in blocks of ``--block`` steps. Each round has one plain block and one block per
mode with a save at its start, in an order that rotates from round to round. A save block also
waits for its write at its end, so a write that is still running is charged to it. The cost of a
save is its block's time minus the plain block's in the same round:

    python benchmarks/checkpoint_overlap.py                       # background saves, 8 rounds of 6 steps
    python benchmarks/checkpoint_overlap.py --modes async,sync --rounds 8

Modes: ``async`` (the default Checkpoint: staged into host buffers, written by DCP's
``async_save``), ``sync`` (``save(engine, background=False)``: written as training waits). Two
warm-up blocks come first, a plain one and one with the first save (reported on its own: its
host buffers are allocated then, as in the main job's first save). After the rounds, one save is
written in the foreground with training stopped, as the job's last save is at the end of its fit.
Each mode's cost per save is given as a median and as a mean, each with a 95% interval; the main
job's estimate is 14 background saves plus that last save, over its fit time (--fit-s), for the
mean and for the top of its interval.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import CONFIGS, machine, mean_interval, median_interval

from enginekit import Engine, hookimpl
from enginekit.gpt import GPTModel
from enginekit.plugins import Checkpoint

ROOT = Path(__file__).resolve().parents[1]
MODES = ("async", "sync")


class Blocks:
    """Starts each block (with a save, for a save block) and stamps each block boundary."""

    def __init__(self, checkpoint: Checkpoint, block: int, kinds: list[str]) -> None:
        self.checkpoint, self.block, self.kinds = checkpoint, block, kinds
        self.stamps: list[float] = []
        self.foreground: dict[str, list[float]] = {}  # how long save() kept training waiting
        self._saving = False

    @hookimpl
    def on_save_point(self, engine: Engine, reason: str) -> None:
        step = engine.state.step
        if reason != "step" or step % self.block:
            return
        if self._saving:  # a save block ends: its unfinished write is charged to it
            self.checkpoint.wait(engine)
            self._saving = False
        self.stamps.append(time.perf_counter())
        index = step // self.block  # the block that starts now
        if len(self.stamps) > 1:  # progress: a run of many rounds takes an hour or more
            ended = self.kinds[index - 1] if index - 1 < len(self.kinds) else "plain"
            print(f"  block {index - 1} ({ended}): {self.stamps[-1] - self.stamps[-2]:.2f} s", flush=True)
        kind = self.kinds[index] if index < len(self.kinds) else "plain"
        if kind != "plain":
            self._saving = True
            start = time.perf_counter()
            self.checkpoint.save(engine, background=kind != "sync")
            key = "warm-up" if index == 2 else kind
            self.foreground.setdefault(key, []).append(time.perf_counter() - start)


def run(modes: list[str], block: int, rounds: int, folder: Path) -> tuple[dict[str, list[float]], float, float, Blocks]:
    """Cost per save of each mode, one per round, the cost of the warm-up save, the time of a save
    in the foreground after the fit (as the job's last one), and the blocks."""
    torch.manual_seed(0)
    cfg = CONFIGS["124M"]
    model = GPTModel({**cfg, "context_length": 256})
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    order = ["plain", *modes]
    # block 0 is not timed (the first stamp is its end); then a plain and a save block to warm up
    kinds = ["plain", "plain", modes[0]]
    for r in range(rounds):
        kinds += order[r % len(order) :] + order[: r % len(order)]
    steps = block * (len(kinds) + 1)  # the last block's end is stamped when the block after it starts
    tokens = torch.randint(0, cfg["vocab_size"], (2 * steps, 257))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)
    checkpoint = Checkpoint(folder, every_epoch=False, keep_last=1)
    blocks = Blocks(checkpoint, block, kinds)
    engine = Engine(model, optimizer, loader, plugins=[checkpoint, blocks], device="cpu")
    engine.fit(max_steps=steps)
    start = time.perf_counter()
    checkpoint.save(engine, background=False)
    last = time.perf_counter() - start
    times = [0.0] + [b - a for a, b in zip(blocks.stamps, blocks.stamps[1:])]  # times[i]: block i
    costs: dict[str, list[float]] = {mode: [] for mode in modes}
    for r in range(rounds):
        start = 3 + r * len(order)
        got = dict(zip(kinds[start : start + len(order)], times[start : start + len(order)]))
        for mode in modes:
            costs[mode].append(got[mode] - got["plain"])
    return costs, times[2] - times[1], last, blocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="async", help=f"comma-separated, from: {', '.join(MODES)}")
    p.add_argument("--block", type=int, default=6, help="steps per block")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--fit-s", type=float, default=507.0, help="the main job's fit time without checkpoints")
    args = p.parse_args()
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as folder:
        costs, first, last, blocks = run(modes, args.block, args.rounds, Path(folder))
    print(
        f"first save ({modes[0]}): {first:+.2f} s against the plain warm-up block; "
        f"save() returned after {blocks.foreground['warm-up'][0]:.2f} s"
    )
    print(f"last save (in the foreground, training stopped): {last:.2f} s")
    for mode, values in costs.items():
        med, med_lo, med_hi = median_interval(values)
        mean, mean_lo, mean_hi = mean_interval(values)
        print(
            f"{mode:16s} cost per save over {len(values)} rounds of {args.block} steps: "
            f"median {med:+.2f} s (95% interval {med_lo:+.2f}..{med_hi:+.2f}), "
            f"mean {mean:+.2f} s (95% interval {mean_lo:+.2f}..{mean_hi:+.2f}), "
            f"range {min(values):+.2f}..{max(values):+.2f}; "
            f"save() returned after {statistics.median(blocks.foreground[mode]):.2f} s (median)\n"
            f"{'':16s} rounds: {', '.join(f'{c:+.2f}' for c in values)}\n"
            f"{'':16s} main job (14 such saves + the last, fit {args.fit_s:.0f} s): "
            f"{(14 * mean + last) / args.fit_s:+.1%} with the mean, {(14 * mean_hi + last) / args.fit_s:+.1%} "
            f"at the top of its interval",
            flush=True,
        )


if __name__ == "__main__":
    main()
