"""The engine's whole per-step cost, end to end: a bare loop over a ``Linear(2, 2)`` against the
same steps through ``Engine`` with no plugin and with 7 no-op plugins implementing the three
step hooks. The model is so small that the difference is the engine: hook dispatch, the metrics
channel, batch handling, the non-finite check (one host read), bookkeeping.

    python benchmarks/step_overhead.py                      # 200 blocks of 25 steps per variant
    python benchmarks/step_overhead.py --blocks 600
    python benchmarks/step_overhead.py --against ../old     # also an older checkout, side by side

How it measures, and why. This VM's speed drifts by tens of percent from one second to the
next (other guests take its cores), far more than the microseconds measured here, so timing
each variant as a separate run compares drifts. Instead the variants run side by side in
threads that take turns: one runs a block of 25 steps while the others wait, then hands over,
in a rotating order; whatever slows the machine hits all of them alike. Every variant draws its
batches through a timing loader that notes the clock at each fetch: one step is the time
between two fetches, everything the loop does per step included (fit's one-off set-up is not a
step). A block's first two steps (caches cold after a hand-over) are left out.

The run is cut into 10 segments of consecutive cycles; in each, a variant's steps are pooled and
summarised by their 10th percentile (the steps the VM's noise did not hit) and their median. The
engine's cost is its figure minus the bare loop's in the same segment, reported as the median over
segments with the range. ``--against DIR`` loads the ``enginekit`` package of another checkout
under another name and runs its engine as two more variants, so a change is measured against the
code before it in the same turns, not in runs minutes apart.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from _common import machine
from engine_overhead import NoOp
from torch.utils.data import DataLoader, TensorDataset

from enginekit import Engine


class Turns:
    """Who runs now: a schedule of variant indices, one entry per block."""

    def __init__(self, schedule: list[int], n: int) -> None:
        self.schedule = schedule
        self.position = 0
        self.go = [threading.Semaphore(0) for _ in range(n)]

    def start(self) -> None:
        self.go[self.schedule[0]].release()

    def wait(self, me: int) -> None:
        self.go[me].acquire()

    def hand_over(self) -> None:
        self.position += 1
        if self.position < len(self.schedule):
            self.go[self.schedule[self.position]].release()


class TimedLoader:
    """A DataLoader that notes the clock at every batch it hands out and, after each block but
    the last, hands the CPU to the next variant; ``steps`` holds each block's step times."""

    def __init__(self, blocks: int, block: int, turns: Turns, me: int) -> None:
        g = torch.Generator().manual_seed(me)
        x = torch.randn(blocks * block, 2, generator=g)
        self.loader = DataLoader(TensorDataset(x, x.flip(1)), batch_size=1)
        self.blocks, self.block, self.turns, self.me = blocks, block, turns, me
        self.steps: list[list[float]] = []  # per block, its steps' times

    def __len__(self) -> int:
        return self.blocks * self.block

    def _close_block(self, stamps: list[float]) -> None:
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        self.steps.append(gaps[2:])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stamps: list[float] = []
        for i, batch in enumerate(self.loader):
            stamps.append(time.perf_counter())
            if i % self.block == 0 and i > 0:  # batch i starts the next block: the previous one is whole
                self._close_block(stamps)
                self.turns.hand_over()
                self.turns.wait(self.me)
                stamps = [time.perf_counter()]
            yield batch
        # the last block's last step ends when the loop ends, not at a fetch: it goes uncounted
        self._close_block(stamps)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def bare(data: TimedLoader) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for inputs, targets in data:
        loss = mse(model(inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def through_engine(engine_class: type, n_plugins: int) -> Callable[[TimedLoader], None]:
    def run(data: TimedLoader) -> None:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        plugins = [(f"noop{i}", NoOp()) for i in range(n_plugins)]
        engine_class(model, opt, data, plugins=plugins, device="cpu", loss_fn=mse).fit()

    return run


def measure(variants: list[Callable[[TimedLoader], None]], blocks: int, block: int) -> list[list[list[float]]]:
    """Each variant's step times (seconds) per block, the variants taking turns block by block."""
    n = len(variants)
    schedule = [
        order for cycle in range(blocks) for order in (list(range(n))[cycle % n :] + list(range(n))[: cycle % n])
    ]
    turns = Turns(schedule, n)
    loaders = [TimedLoader(blocks, block, turns, me) for me in range(n)]

    def worker(me: int) -> None:
        turns.wait(me)
        variants[me](loaders[me])
        turns.hand_over()  # after the whole run, so no teardown overlaps another variant's block

    threads = [threading.Thread(target=worker, args=(me,)) for me in range(n)]
    for t in threads:
        t.start()
    turns.start()
    for t in threads:
        t.join()
    return [loader.steps for loader in loaders]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load_other(checkout: str) -> type:
    """The ``Engine`` of the ``enginekit`` package in another checkout, imported as ``enginekit_against``."""
    package = Path(checkout).resolve() / "enginekit"
    spec = importlib.util.spec_from_file_location(
        "enginekit_against", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    if spec is None or spec.loader is None or not package.is_dir():
        raise SystemExit(f"--against {checkout}: no enginekit package at {package}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["enginekit_against"] = module
    spec.loader.exec_module(module)
    return module.Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=200, help="blocks per variant (default 200)")
    p.add_argument("--block", type=int, default=25, help="steps per block (default 25)")
    p.add_argument("--segments", type=int, default=10, help="consecutive parts of the run compared separately")
    p.add_argument("--against", metavar="DIR", help="also run the engine of the checkout in DIR, side by side")
    args = p.parse_args()
    names = ["bare loop", "engine, no plugin", "engine, 7 plugins"]
    variants = [bare, through_engine(Engine, 0), through_engine(Engine, 7)]
    if args.against:
        other = load_other(args.against)
        names += [f"{args.against}, no plugin", f"{args.against}, 7 plugins"]
        variants += [through_engine(other, 0), through_engine(other, 7)]
    measure(variants, 4, args.block)  # warm up allocator, dispatcher and caches
    blocks = measure(variants, args.blocks, args.block)
    per = max(1, args.blocks // args.segments)
    # per segment (a run of consecutive cycles), each variant's steps pooled
    segments = [
        [[t for b in mine[i : i + per] for t in b] for mine in blocks] for i in range(0, args.blocks - per + 1, per)
    ]

    def per_segment(v: int, q: float) -> list[float]:
        return [quantile(seg[v], q) * 1e6 for seg in segments]

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):>7.1f} [{min(values):>6.1f}-{max(values):>6.1f}]"

    print(f"machine: {machine()}")
    print(f"{args.blocks} blocks x {args.block} steps per variant, taking turns; Linear(2, 2), batch 1, SGD")
    print(
        f"microseconds per step. p10 and median: the steps' 10th percentile and median in each of "
        f"{len(segments)} segments; added: the variant's minus the bare loop's, median over segments [min-max]"
    )
    width = max(len(name) for name in names) + 2
    print(f"{'variant':<{width}} {'p10':>7} {'median':>7}   {'added at p10':>22}   {'added at median':>22}")
    for v, name in enumerate(names):
        p10, median = (statistics.median(per_segment(v, q)) for q in (0.1, 0.5))
        row = f"{name:<{width}} {p10:>7.1f} {median:>7.1f}"
        if v:
            for q in (0.1, 0.5):
                row += "   " + cell([a - b for a, b in zip(per_segment(v, q), per_segment(0, q))])
        print(row)
    if args.against:
        print(f"this checkout minus {args.against}, same segments (negative: this one is cheaper)")
        for mine, theirs, label in ((1, 3, "no plugin"), (2, 4, "7 plugins")):
            row = f"{label:<{width}}"
            for q in (0.1, 0.5):
                row += "   " + cell([a - b for a, b in zip(per_segment(mine, q), per_segment(theirs, q))])
            print(row)


if __name__ == "__main__":
    main()
