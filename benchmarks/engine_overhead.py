"""Engine overhead: the engine with LRWarmup, CosineDecay and GradClip against the same work as a
hand-written loop, same model, same batches, runs interleaved; plus hook-dispatch cost.

    python benchmarks/engine_overhead.py            # small and 124M models (~8 min on 2 cores)
    python benchmarks/engine_overhead.py --quick    # small and tiny models (~2 min)
    python benchmarks/engine_overhead.py --dispatch-only   # the per-step hook and metrics cost only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from _common import CONFIGS, machine, real_batches, run_engine, run_plain

from enginekit import hookimpl
from enginekit.testing import make_engine


class NoOp:
    @hookimpl
    def before_step(self, engine, batch):
        pass

    @hookimpl
    def after_backward(self, engine):
        pass

    @hookimpl
    def after_step(self, engine, loss):
        pass


def dispatch_cost(n_plugins: int, calls: int = 20000) -> float:
    """Microseconds per optimizer step the engine spends on plugins: the four hooks it emits every
    step (before_step, after_backward, after_step, on_save_point) to ``n_plugins`` plugins
    implementing the first three, plus its two publications on the metrics channel."""
    engine = make_engine([(f"noop{i}", NoOp()) for i in range(n_plugins)])
    emit, metrics = engine._emit, engine.metrics
    loss = torch.tensor(1.0)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for i in range(calls):
            metrics.step = i
            emit("before_step", batch=None)
            metrics._put("lr", 1e-3, i)  # exactly what the engine does
            metrics._put("step_loss", loss, i)
            emit("after_backward")
            emit("after_step", loss=loss)
            emit("on_save_point", reason="step")
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def print_dispatch() -> None:
    base = dispatch_cost(0)
    seven = dispatch_cost(7)
    print("hooks and metrics per optimizer step (4 hooks + 2 publications, best of 5 x 20,000):")
    print(f"  no plugins: {base:.1f} us   7 plugins implementing every step hook: {seven:.1f} us")


def child(mode: str, name: str, steps: int) -> None:
    """One block in this fresh process: prints its step times as JSON."""
    cfg = CONFIGS[name]
    batches = real_batches(cfg, steps)
    print(json.dumps((run_engine if mode == "engine" else run_plain)(cfg, batches)[0]))


def block_in_fresh_process(mode: str, name: str, steps: int) -> list[float]:
    cmd = [sys.executable, __file__, "--child", mode, name, str(steps)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split("\n")[-2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny and small models only")
    p.add_argument("--rounds", type=int, default=None, help="interleaved engine/plain rounds per model")
    p.add_argument("--models", nargs="+", choices=sorted(CONFIGS), help="run only these models")
    p.add_argument("--dispatch-only", action="store_true", help="only the per-step hook and metrics cost")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    if args.dispatch_only:
        print(f"machine: {machine()}")
        print_dispatch()
        return
    plan = [("small", 100, 20), ("tiny", 50, 20)] if args.quick else [("small", 100, 20), ("124M", 7, 6)]
    plan = [row for row in plan if not args.models or row[0] in args.models]
    print(f"machine: {machine()}")
    print("rounds alternate engine and plain loop; per round, each loop's median step time (start to start)")
    print("124M blocks run in fresh processes: in one long process the heap left by the previous block")
    print("skewed the 124M comparison by about 10%")
    header = f"{'model':<6} {'steps':>5} {'rounds':>6} {'engine s/step':>14} {'plain s/step':>13}"
    print(f"{header} {'ratio: median [IQR]':>26} {'pooled':>7} {'tokens/s':>9}")
    for name, steps, rounds in plan:
        cfg = CONFIGS[name]
        rounds = args.rounds or rounds
        fresh = name == "124M"
        batches = real_batches(cfg, steps)
        if not fresh:
            run_engine(cfg, batches[:3])  # warm up allocator and kernels once
            run_plain(cfg, batches[:3])
        pooled: dict = {run_engine: [], run_plain: []}
        ratios = []
        for r in range(rounds):
            order = (run_engine, run_plain) if r % 2 == 0 else (run_plain, run_engine)
            medians = {}
            for fn in order:
                if fresh:
                    step_times = block_in_fresh_process("engine" if fn is run_engine else "plain", name, steps)[1:]
                else:
                    step_times = fn(cfg, batches)[0][1:]  # step 0 is cold
                pooled[fn].extend(step_times)
                medians[fn] = statistics.median(step_times)
            ratios.append(medians[run_engine] / medians[run_plain])
        e, pl = statistics.median(pooled[run_engine]), statistics.median(pooled[run_plain])
        q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        tokens = 2 * cfg["context_length"] / e
        print(
            f"{name:<6} {steps:>5} {rounds:>6} {e:>14.5f} {pl:>13.5f} "
            f"{q2:>10.4f} [{q1:.4f}-{q3:.4f}] {e / pl:>7.4f} {tokens:>9.0f}"
        )
    print()
    print_dispatch()


if __name__ == "__main__":
    main()
