"""Mixed precision: bf16 autocast against fp32 through the engine: speed (interleaved runs) and how
closely the bf16 loss curve follows fp32's over the first steps from the same weights and batches.

    python benchmarks/precision.py            # 124M model, 30 steps each (~5 min on 2 cores)
    python benchmarks/precision.py --quick    # small model
    python benchmarks/precision.py --windows --steps 12 --rounds 2
        # engine and hand loop side by side, fp32 and bf16, early steps (1-3) and later ones apart
    python benchmarks/precision.py --matmul   # why: the host's fp32 and bf16 matmul rates at the
                                              # 124M step's shapes (seconds, no model)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import CONFIGS, machine, real_batches, run_engine, run_plain, summary


def windows(cfg: dict, batches: list, rounds: int) -> None:
    """Step times by window: steps 1-3 (after one warm-up step, as a short measurement sees them)
    and steps 4 on, for the engine and a hand loop, fp32 and bf16, in rotating interleaved rounds."""
    runs = {
        ("engine", "fp32"): lambda: run_engine(cfg, batches, "fp32")[0],
        ("engine", "bf16"): lambda: run_engine(cfg, batches, "bf16")[0],
        ("hand", "fp32"): lambda: run_plain(cfg, batches, "fp32")[0],
        ("hand", "bf16"): lambda: run_plain(cfg, batches, "bf16")[0],
    }
    keys = list(runs)
    early: dict = {k: [] for k in keys}
    late: dict = {k: [] for k in keys}
    for r in range(rounds):
        for key in keys[r % 4 :] + keys[: r % 4]:
            times = runs[key]()
            early[key].append(statistics.median(times[1:4]))
            late[key].append(statistics.median(times[4:]))
            print(
                f"round {r + 1}: {key[0]:<6} {key[1]}  steps 1-3 {early[key][-1]:.3f} s  steps 4+ {late[key][-1]:.3f} s"
            )
    print(f"\nmedian s/step over {rounds} rounds (min-max); speed-up = fp32 / bf16 of the same loop")
    for loop in ("engine", "hand"):
        for label, table in (("steps 1-3", early), ("steps 4+ ", late)):
            f32, b16 = summary(table[(loop, "fp32")]), summary(table[(loop, "bf16")])
            ups = [a / b for a, b in zip(table[(loop, "fp32")], table[(loop, "bf16")])]
            print(
                f"{loop:<6} {label}: fp32 {f32[0]:.3f} ({f32[1]:.3f}-{f32[2]:.3f})  bf16 {b16[0]:.3f} "
                f"({b16[1]:.3f}-{b16[2]:.3f})  speed-up {statistics.median(ups):.2f}x ({min(ups):.2f}-{max(ups):.2f})"
            )
    for precision in ("fp32", "bf16"):
        ratios = [e / h for e, h in zip(late[("engine", precision)], late[("hand", precision)])]
        spread = f"({min(ratios):.3f}-{max(ratios):.3f})"
        print(f"engine / hand loop, {precision}, steps 4+: {statistics.median(ratios):.3f} {spread}")


def _gflops(x: torch.Tensor, w: torch.Tensor, autocast: bool = False, reps: int = 20) -> float:
    """``F.linear(x, w)``'s rate in GFLOP/s, best of 3 timings of ``reps`` calls."""

    def call() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return F.linear(x, w)

    call()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            call()
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * x.shape[0] * x.shape[1] * w.shape[0] / best / 1e9


def matmul_rates(tokens: int = 512) -> None:
    """GFLOP/s of the 124M step's matmul shapes in fp32, bf16 and under bf16 autocast.

    The step's speed-up can only be what the host's bf16 matmuls give: where they are slower than
    its fp32 ones, no trainer makes bf16 faster. ``ONEDNN_VERBOSE=1`` shows which kernel runs."""
    shapes = {"attention 768->768": (768, 768), "ff up 768->3072": (768, 3072)}
    shapes.update({"ff down 3072->768": (3072, 768), "output 768->50257": (768, 50257)})
    print(f"{tokens} tokens (batch 2 x 256); best of 3; GFLOP/s")
    print(f"{'shape':<20} {'fp32':>7} {'bf16':>7} {'autocast':>9} {'bf16 / fp32':>12}")
    for name, (k, n) in shapes.items():
        x, w = torch.randn(tokens, k), torch.randn(n, k)
        reps = 3 if n > 10_000 else 20
        fp32 = _gflops(x, w, reps=reps)
        bf16 = _gflops(x.bfloat16(), w.bfloat16(), reps=reps)
        mixed = _gflops(x, w, autocast=True, reps=reps)
        print(f"{name:<20} {fp32:>7.1f} {bf16:>7.1f} {mixed:>9.1f} {bf16 / fp32:>11.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per precision (default 3, quick 5)")
    p.add_argument("--windows", action="store_true", help="engine and hand loop, early and later steps apart")
    p.add_argument("--matmul", action="store_true", help="only the host's fp32/bf16 matmul rates")
    args = p.parse_args()
    if args.matmul:
        print(f"machine: {machine()}")
        matmul_rates()
        return
    name = "small" if args.quick else "124M"
    rounds = args.rounds or (5 if args.quick else 3)
    cfg = CONFIGS[name]
    batches = real_batches(cfg, args.steps)
    print(f"machine: {machine()}")
    if args.windows:
        windows(cfg, batches, rounds)
        return
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
