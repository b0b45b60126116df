"""The engine's whole per-step cost, end to end: a bare loop over a ``Linear(2, 2)`` against the
same steps through ``Engine`` with no plugin and with 7 no-op plugins implementing the three
step hooks. The model is so small that the difference is the engine: hook dispatch, the metrics
channel, batch handling, the non-finite check (one host read), bookkeeping.

    python benchmarks/step_overhead.py                 # 15 interleaved rounds of 2,000 steps
    python benchmarks/step_overhead.py --rounds 5 --steps 500

Per round, the three variants run back to back in a rotating order; each reports its mean time
per step. The engine's cost is the per-round difference from the bare loop; the table gives the
median over rounds with the spread (min-max) and the interquartile range.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import machine
from engine_overhead import NoOp
from torch.utils.data import DataLoader, TensorDataset

from enginekit import Engine


def loader(steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps, 2, generator=g)
    return DataLoader(TensorDataset(x, x.flip(1)), batch_size=1)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def bare(steps: int) -> float:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = loader(steps)
    start = time.perf_counter()
    for inputs, targets in data:
        loss = mse(model(inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def through_engine(n_plugins: int) -> Callable[[int], float]:
    def run(steps: int) -> float:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        plugins = [(f"noop{i}", NoOp()) for i in range(n_plugins)]
        engine = Engine(model, opt, loader(steps), plugins=plugins, device="cpu", loss_fn=mse)
        start = time.perf_counter()
        engine.fit()
        return (time.perf_counter() - start) / steps

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args()
    variants = {"bare loop": bare, "engine, no plugin": through_engine(0), "engine, 7 plugins": through_engine(7)}
    for fn in variants.values():
        fn(200)  # warm up allocator, dispatcher and caches
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % 3 :] + names[: r % 3]:  # rotate who goes first
            times[name].append(variants[name](args.steps))
    print(f"machine: {machine()}")
    print(f"{args.rounds} rounds x {args.steps} steps, Linear(2, 2), batch 1, SGD; microseconds per step")
    print(f"{'variant':<20} {'median step':>12} {'added: median':>14} {'[IQR]':>16} {'range':>16}")
    for name in names:
        per_step = statistics.median(times[name]) * 1e6
        added = [(t - b) * 1e6 for t, b in zip(times[name], times["bare loop"])]
        q1, q2, q3 = statistics.quantiles(added, n=4) if len(added) > 1 else (added[0],) * 3
        extra = (
            ""
            if name == "bare loop"
            else f"{q2:>14.1f} [{q1:>6.1f}-{q3:>6.1f}] [{min(added):>6.1f}-{max(added):>6.1f}]"
        )
        print(f"{name:<20} {per_step:>12.1f} {extra}")


if __name__ == "__main__":
    main()
