"""What one checkpoint save costs training, measured inside one process in back-to-back blocks.

The main job's fit time drifts by 10% or more between identical runs on this VM, more than the
cost being measured. Here the 124M model trains at the main job's shape (batch 2 x 256 tokens,
AdamW, fp32) in blocks of ``--block`` steps. Blocks come in pairs, one with a save at its start
and one without, their order alternating from pair to pair. A save block also waits for its write
at its end, so a write that is still running is charged to it. The cost of a save is the save
block's time minus the plain block's in the same pair:

    python benchmarks/checkpoint_overlap.py                      # background, 8 pairs of 6 steps
    python benchmarks/checkpoint_overlap.py --modes async,sync,async-page-cache --pairs 8

Modes: ``async`` (the default Checkpoint), ``sync`` (``async_write=False``), ``async-page-cache``
(background, with the writer forced through the page cache, as where O_DIRECT is refused).
The main job's cost follows as 15 saves x the median cost per save over its fit time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import CONFIGS, machine

from enginekit import Engine, hookimpl
from enginekit.gpt import GPTModel
from enginekit.plugins import Checkpoint
from enginekit.plugins import checkpoint as ckpt_module

ROOT = Path(__file__).resolve().parents[1]


class Blocks:
    """Saves at the start of every save block and stamps each block boundary."""

    def __init__(self, checkpoint: Checkpoint, block: int, pairs: int) -> None:
        self.checkpoint, self.block = checkpoint, block
        # pair p: (save, plain) when p is even, (plain, save) when odd; block 0 is a warm-up
        orders = [("save", "plain") if p % 2 == 0 else ("plain", "save") for p in range(pairs)]
        self.kinds = ["warm-up"] + [kind for order in orders for kind in order]
        self.stamps: list[float] = []

    @hookimpl
    def on_save_point(self, engine: Engine, reason: str) -> None:
        step = engine.state.step
        if reason != "step" or step % self.block:
            return
        index = step // self.block  # the block that starts now
        if index >= 1 and self.kinds[index - 1] == "save":
            self.checkpoint.wait()  # an unfinished write is charged to the save block
        self.stamps.append(time.perf_counter())
        if index < len(self.kinds) and self.kinds[index] == "save":
            self.checkpoint.save(engine)


def run(mode: str, block: int, pairs: int, folder: Path) -> list[float]:
    torch.manual_seed(0)
    cfg = CONFIGS["124M"]
    model = GPTModel({**cfg, "context_length": 256})
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    steps = block * (1 + 2 * pairs)
    tokens = torch.randint(0, cfg["vocab_size"], (2 * steps, 257))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)
    checkpoint = Checkpoint(folder / mode, every_epoch=False, keep_last=1, async_write=mode != "sync")
    blocks = Blocks(checkpoint, block, pairs)
    real = ckpt_module._set_direct
    if mode == "async-page-cache":
        ckpt_module._set_direct = lambda fd, on: False
    try:
        Engine(model, optimizer, loader, plugins=[checkpoint, blocks], device="cpu").fit(max_steps=steps)
    finally:
        ckpt_module._set_direct = real
    # stamps at the ends of blocks 0, 1, ...: times[i] is block i + 1, so pair p is times[2p], times[2p + 1]
    times = [b - a for a, b in zip(blocks.stamps, blocks.stamps[1:])]
    costs = []
    for p in range(pairs):
        first, second = times[2 * p : 2 * p + 2]
        save, plain = (first, second) if p % 2 == 0 else (second, first)
        costs.append(save - plain)
    return costs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="async", help="comma-separated: async, sync, async-page-cache")
    p.add_argument("--block", type=int, default=6, help="steps per block")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--fit-s", type=float, default=507.0, help="the main job's fit time without checkpoints")
    args = p.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as folder:
        for mode in args.modes.split(","):
            costs = run(mode, args.block, args.pairs, Path(folder))
            med = statistics.median(costs)
            print(
                f"{mode:16s} cost per save: median {med:5.2f} s [{min(costs):.2f}..{max(costs):.2f}] over "
                f"{len(costs)} pairs of {args.block} steps ({', '.join(f'{c:.2f}' for c in costs)}); "
                f"main job (15 saves, fit {args.fit_s:.0f} s): {15 * med / args.fit_s:+.1%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
