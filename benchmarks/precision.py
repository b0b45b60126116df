"""Mixed precision: bf16 autocast against fp32 through the engine: speed (interleaved runs) and how
closely the bf16 loss curve follows fp32's over the first steps from the same weights and batches.

    python benchmarks/precision.py            # 124M model, 30 steps each (~5 min on 2 cores)
    python benchmarks/precision.py --quick    # small model
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import CONFIGS, machine, real_batches, run_engine, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per precision (default 3, quick 5)")
    args = p.parse_args()
    name = "small" if args.quick else "124M"
    rounds = args.rounds or (5 if args.quick else 3)
    cfg = CONFIGS[name]
    batches = real_batches(cfg, args.steps)
    print(f"machine: {machine()}")
    run_engine(cfg, batches[:2], "bf16")
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    curves: dict[str, list[float]] = {}
    for r in range(rounds):
        for precision in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
            step_times, losses = run_engine(cfg, batches, precision)
            times[precision].append(statistics.median(step_times[1:]))
            curves[precision] = losses
    print(f"{name} model, {args.steps} steps, batch 2 x {cfg['context_length']} tokens, {rounds} round(s); median step")
    print(f"{'precision':<9} {'s/step (median, min-max)':>28} {'tokens/s':>9} {'speed-up':>9}")
    fp32 = summary(times["fp32"])[0]
    for precision in ("fp32", "bf16"):
        med, lo, hi = summary(times[precision])
        tokens = 2 * cfg["context_length"] / med
        print(f"{precision:<9} {med:>10.4f} ({lo:.4f}-{hi:.4f}) {tokens:>9.0f} {fp32 / med:>8.2f}x")
    diff = torch.tensor(curves["bf16"]) - torch.tensor(curves["fp32"])
    rel = diff.abs() / torch.tensor(curves["fp32"])
    print(
        f"loss, bf16 vs fp32 over {args.steps} steps: max |diff| {diff.abs().max():.4f} "
        f"(max relative {rel.max():.2%}), mean |diff| {diff.abs().mean():.4f}; "
        f"final fp32 {curves['fp32'][-1]:.3f}, bf16 {curves['bf16'][-1]:.3f}"
    )


if __name__ == "__main__":
    main()
