"""Engine overhead: the engine with LRWarmup, CosineDecay and GradClip against the same work as a
hand-written loop, same model, same batches, runs interleaved; plus hook-dispatch cost.

    python benchmarks/engine_overhead.py            # small and 124M models (~6 min on 2 cores)
    python benchmarks/engine_overhead.py --quick    # tiny and small models (~1 min)
"""

from __future__ import annotations

import argparse
import time

from _common import CONFIGS, machine, real_batches, run_engine, run_plain, summary

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
    """Microseconds per optimizer step spent emitting the three step hooks to ``n_plugins`` plugins."""
    engine = make_engine([(f"noop{i}", NoOp()) for i in range(n_plugins)])
    emit = engine._emit
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            emit("before_step", batch=None)
            emit("after_backward")
            emit("after_step", loss=None)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny and small models only")
    p.add_argument("--rounds", type=int, default=None, help="interleaved engine/plain rounds per model")
    args = p.parse_args()
    plan = [("tiny", 200, 7), ("small", 60, 7)] if args.quick else [("small", 60, 7), ("124M", 6, 5)]
    print(f"machine: {machine()}")
    header = f"{'model':<6} {'steps':>5} {'rounds':>6} {'engine s/step':>14} {'plain s/step':>13}"
    print(f"{header} {'ratio (min-max)':>22} {'tokens/s':>9}")
    for name, steps, rounds in plan:
        cfg = CONFIGS[name]
        rounds = args.rounds or rounds
        batches = real_batches(cfg, steps)
        run_engine(cfg, batches[:3])  # warm up allocator and kernels once
        run_plain(cfg, batches[:3])
        engine_t, plain_t, ratios = [], [], []
        for r in range(rounds):
            order = (run_engine, run_plain) if r % 2 == 0 else (run_plain, run_engine)
            times = {fn: fn(cfg, batches)[0] / steps for fn in order}
            engine_t.append(times[run_engine])
            plain_t.append(times[run_plain])
            ratios.append(times[run_engine] / times[run_plain])
        (e, _, _), (pl, _, _), (ratio, lo, hi) = summary(engine_t), summary(plain_t), summary(ratios)
        tokens = 2 * cfg["context_length"] / e
        print(
            f"{name:<6} {steps:>5} {rounds:>6} {e:>14.5f} {pl:>13.5f} {ratio:>8.4f} ({lo:.4f}-{hi:.4f}) {tokens:>9.0f}"
        )
    print()
    base = dispatch_cost(0)
    seven = dispatch_cost(7)
    print("hook dispatch per optimizer step (3 step hooks, best of 5 x 20,000):")
    print(f"  no plugins: {base:.1f} us   7 plugins implementing every step hook: {seven:.1f} us")


if __name__ == "__main__":
    main()
