"""The main job's step, eager against ``compile`` against the fast preset, in alternating rounds.

Each mode keeps one engine alive for the whole run (so a compile happens once, in its warm-up),
and the rounds give each mode a block of steps in turn, rotating which goes first. The figure is
the median step time of each block after its first step, the speed-up per round is eager's
block against the mode's block of the same round, reported as the median of the rounds with
their spread. The same weights, batches and schedule for every mode, so the loss curves are
compared too (their first ``--curve`` steps, against eager's).

    python benchmarks/speed.py                                 # 124M, batch 2 x 256 (the main job)
    python benchmarks/speed.py --modes eager,compile --rounds 4 --block 5
    python benchmarks/speed.py --model tiny --warmup 3 --block 4   # a smoke run in a minute

Modes: ``eager`` (the book's path), ``compile`` (eager + torch.compile), ``fused`` (fused AdamW
+ padded head + bf16, no compile) and ``fast`` (``fused`` + compile): the parts apart, so the
speed-up can be traced to one. The share of the CPU's matmul peak is model FLOPs per second
(``benchmarks/throughput.py``'s accounting) over the best fp32 rate of a 768 x 3072 matmul at
512 rows (the step's shapes), measured in the same run; bf16 modes are set against the bf16 rate.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _common import CONFIGS, INITIAL, MIN_LR, PEAK, machine, real_batches

from enginekit import Engine, hookimpl
from enginekit.fast import adamw
from enginekit.gpt import GPTModel
from enginekit.plugins import GradClip, cosine_lr, warmup_lr

MODES: dict[str, dict[str, Any]] = {
    "eager": {"compile": False, "adamw": "default", "pad": None, "precision": "fp32"},
    "compile": {"compile": True, "adamw": "default", "pad": None, "precision": "fp32"},
    "fused": {"compile": False, "adamw": "fused", "pad": 64, "precision": "bf16"},
    "fast": {"compile": True, "adamw": "fused", "pad": 64, "precision": "bf16"},
}


class Clock:
    """Start time of every step and its loss tensor (read after the timing)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.losses: list[torch.Tensor] = []

    @hookimpl
    def before_step(self, engine: Engine, batch: Any) -> None:
        self.starts.append(time.perf_counter())

    @hookimpl
    def after_step(self, engine: Engine, loss: torch.Tensor) -> None:
        self.losses.append(loss)


class FixedSchedule:
    """Appendix D's warmup + cosine over a fixed total: the runners call ``fit`` once per block,
    and each fit plans anew, so the built-in schedules would restart with every block."""

    def __init__(self, total: int) -> None:
        self.total, self.warmup = total, max(1, int(0.2 * total))

    @hookimpl
    def before_step(self, engine: Engine, batch: Any) -> None:
        step = engine.state.step
        if step < self.warmup:
            lr = warmup_lr(step, self.warmup, INITIAL, PEAK)
        else:
            lr = cosine_lr(step, self.warmup, self.total, PEAK, MIN_LR)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr


class Runner:
    """One mode's engine, advanced a block of steps at a time."""

    def __init__(self, name: str, cfg: dict[str, Any], batches: list, total: int) -> None:
        mode = MODES[name]
        torch.manual_seed(123)
        model_cfg = {**cfg, "vocab_padding_multiple": mode["pad"]} if mode["pad"] else cfg
        model = GPTModel(model_cfg)
        if mode["pad"]:  # the unpadded model's weights in the first rows: the same start as eager
            torch.manual_seed(123)
            plain = GPTModel(cfg).state_dict()
            head = model.out_head.weight.detach().clone()
            head[: cfg["vocab_size"]] = plain["out_head.weight"]
            model.load_state_dict({**plain, "out_head.weight": head})
        optimizer = adamw(model.parameters(), lr=1e-3, weight_decay=0.1, implementation=mode["adamw"])
        self.clock = Clock()
        schedule = FixedSchedule(total)
        self.engine = Engine(
            model,
            optimizer,
            batches,
            # clipping from step 0: each block's fit plans anew, and a later start_step would be refused
            plugins=[schedule, GradClip(1.0), self.clock],
            device="cpu",
            precision=mode["precision"],
            compile=mode["compile"],
        )
        self.name = name
        self.precision = mode["precision"]

    def run(self, steps: int) -> list[float]:
        """Seconds of each of the next ``steps`` steps (start to start)."""
        first = len(self.clock.starts)
        self.engine.fit(max_steps=self.engine.state.step + steps)
        self.clock.starts.append(time.perf_counter())
        starts = self.clock.starts[first:]
        self.clock.starts.pop()
        return [b - a for a, b in zip(starts, starts[1:])]


def matmul_gflops(dtype: torch.dtype, reps: int = 20) -> float:
    x, w = torch.randn(512, 768, dtype=dtype), torch.randn(3072, 768, dtype=dtype)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * 512 * 768 * 3072 / best / 1e9


def model_flops_per_step(cfg: dict[str, Any], batch: int) -> float:
    model = GPTModel(cfg)
    lookups = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    params = sum(p.numel() for p in model.parameters()) - lookups
    per_token = 6 * params + 12 * cfg["n_layers"] * cfg["context_length"] * cfg["emb_dim"]
    return per_token * batch * cfg["context_length"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(CONFIGS), default="124M")
    p.add_argument("--modes", default="eager,compile,fused,fast")
    p.add_argument("--warmup", type=int, default=5, help="steps per mode before timing (the compile happens here)")
    p.add_argument("--block", type=int, default=4, help="timed steps per mode and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--curve", type=int, default=20, help="steps whose losses are compared with eager's")
    p.add_argument(
        "--fallback-random",
        action="store_true",
        help="compiled dropout draws from eager's RNG (inductor's fallback_random), so loss curves can be "
        "compared to rounding; by default compiled dropout uses inductor's own RNG and curves agree only in trend",
    )
    args = p.parse_args()
    if args.fallback_random:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
    cfg = CONFIGS[args.model]
    names = args.modes.split(",")
    if "eager" not in names:
        names.insert(0, "eager")
    total = args.warmup + args.rounds * args.block + args.curve
    batches = real_batches(cfg, total)
    print(f"machine: {machine()}")
    peak = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"matmul 512x768 @ 768x3072: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    runners = {}
    for name in names:
        start = time.perf_counter()
        runners[name] = Runner(name, cfg, batches, total)
        runners[name].run(args.warmup)
        print(f"{name:<8} warm-up of {args.warmup} steps: {time.perf_counter() - start:.1f} s", flush=True)
    blocks: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times = runners[name].run(args.block)
            blocks[name].append(statistics.median(times[1:] if len(times) > 1 else times))
        print(f"round {r + 1}: " + "  ".join(f"{n} {blocks[n][-1]:.3f} s" for n in names), flush=True)
    flops = model_flops_per_step(cfg, 2)
    print(f"\n{args.model}, batch 2 x {cfg['context_length']}, {args.rounds} rounds of {args.block} steps (median)")
    print(f"{'mode':<8} {'s/step':>7} {'speed-up (min-max)':>22} {'of matmul peak':>15}")
    for name in names:
        step = statistics.median(blocks[name])
        ups = [e / m for e, m in zip(blocks["eager"], blocks[name])]
        share = flops / step / 1e9 / peak[runners[name].precision]
        print(
            f"{name:<8} {step:>7.3f} {statistics.median(ups):>9.2f}x ({min(ups):.2f}-{max(ups):.2f}) {share:>14.1%}"
        )
    for name in names:  # the rest of the steps, compared as loss curves
        runners[name].run(args.curve)
    eager = torch.tensor([float(x) for x in runners["eager"].clock.losses])
    for name in names[1:]:
        curve = torch.tensor([float(x) for x in runners[name].clock.losses])
        diff = (curve - eager).abs()
        print(
            f"loss {name} vs eager over {len(eager)} steps: max |diff| {diff.max():.4f} "
            f"(relative {(diff / eager).max():.2%}); final eager {eager[-1]:.3f}, {name} {curve[-1]:.3f}"
        )


if __name__ == "__main__":
    main()
