"""A training job for the FSDP tests (2 CPU processes, gloo): the same run under either strategy.

    torchrun --standalone --nproc_per_node=2 tests/fsdp_job.py OUT --strategy {ddp,fsdp}
        [--batch-size B] [--grad-accum N] [--steps S] [--precision P] [--sample] [--checkpoint]
        [--engine NAME STRATEGY BATCH ACCUM ...]

Dropout off and no shuffling, so runs of different strategies (or one process) see the same
data and can be compared number for number. Each rank writes OUT/result-rank<R>.pt itself:
its per-step losses (averaged over ranks by the engine), the evaluations, the gathered final
weights and, with --sample, the text SampleText printed. Each --engine trains one more engine in
the same processes (one process group, started once: the tests pay torchrun's start-up once)
and writes OUT/NAME/result-rank<R>.pt. Run without torchrun it is the single-process reference.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from enginekit import Engine, hookimpl  # noqa: E402
from enginekit.data import create_dataloader, load_verdict  # noqa: E402
from enginekit.gpt import GPTModel  # noqa: E402
from enginekit.plugins import Checkpoint, CosineDecay, GradClip, LossTracker, LRWarmup, SampleText  # noqa: E402

from conftest import TINY_CFG  # noqa: E402


class StepLosses:
    """Every step's loss and the evaluations, as floats (read on every rank: no rank-0-only collective)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.evals: list[dict[str, float]] = []
        self.grad_norms: list[float] = []

    @hookimpl
    def after_step(self, engine, loss):
        self.losses.append(float(loss))
        if "grad_norm" in engine.metrics.at(engine.state.step):
            self.grad_norms.append(engine.metrics["grad_norm"])

    @hookimpl
    def after_evaluate(self, engine, metrics):
        self.evals.append(dict(metrics))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--sample", action="store_true")
    p.add_argument("--checkpoint", action="store_true")
    p.add_argument("--engine", nargs=4, action="append", metavar=("NAME", "STRATEGY", "BATCH", "ACCUM"))
    args = p.parse_args()
    torch.set_num_threads(1)  # two ranks on two busy cores; and one thread sums alike in every run
    if not args.engine:
        train(args, args.out)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # ours, so no engine tears it down between the runs
    for name, strategy, batch, accum in args.engine:
        args.strategy, args.batch_size, args.grad_accum = strategy, int(batch), int(accum)
        train(args, args.out / name)


def train(args: argparse.Namespace, out: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))

    torch.manual_seed(123)
    cfg = {**TINY_CFG, "drop_rate": 0.0}
    text = load_verdict()[:3000]
    split = int(0.9 * len(text))
    ctx = cfg["context_length"]
    train = create_dataloader(text[:split], batch_size=args.batch_size, max_length=ctx, stride=ctx, shuffle=False)
    val = create_dataloader(text[split:], batch_size=2, max_length=ctx, stride=ctx, shuffle=False, drop_last=False)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    steps = StepLosses()
    plugins: list[object] = [
        LRWarmup(warmup_steps=3, initial_lr=1e-5),
        CosineDecay(min_lr=1e-5),
        GradClip(max_norm=1.0, start_step=3),
        LossTracker(eval_freq=4, eval_iter=2),
        steps,
    ]
    sampler = SampleText(max_new_tokens=5)
    if args.sample:
        plugins.append(sampler)
    if args.checkpoint:
        plugins.append(Checkpoint(out / "checkpoints"))
    engine = Engine(
        model,
        optimizer,
        train,
        val,
        plugins=plugins,
        device="cpu",
        grad_accum_steps=args.grad_accum,
        precision=args.precision,
        strategy=args.strategy,
    )
    engine.fit(epochs=1, max_steps=args.steps)
    weights = engine.model_state_dict()  # gathered from the shards under FSDP, on every rank
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": weights,
            "steps": engine.state.step,
            "world_size": engine.state.world_size,
            "losses": steps.losses,
            "evals": steps.evals,
            "grad_norms": steps.grad_norms,
            "samples": sampler.samples,
            "sharded": type(model).__name__,
        },
        out / f"result-rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
