"""A training job for the torchrun tests (2 CPU processes, gloo).

    torchrun --standalone --nproc_per_node=2 tests/ddp_job.py OUT [--batch-size B] [--no-dropout]
        [--no-shuffle] [--kill-at K] [--resume] [--per-rank-dirs]

Each rank writes OUT/result-rank<R>.pt (its final weights and counters) itself, so the tests
can compare ranks; everything else under OUT is written by enginekit's plugins. With
--per-rank-dirs each rank gives its plugins OUT/rank<R>/ so a test can see who wrote files.
Run without torchrun it is the single-process reference.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from resume_job import KillAt  # noqa: E402

from enginekit import Engine, hookimpl  # noqa: E402
from enginekit.data import create_dataloader, load_verdict  # noqa: E402
from enginekit.gpt import GPTModel  # noqa: E402
from enginekit.plugins import Checkpoint, CosineDecay, GradClip, LossTracker, LRWarmup  # noqa: E402

from conftest import TINY_CFG  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--no-dropout", action="store_true")
    p.add_argument("--no-shuffle", action="store_true")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--per-rank-dirs", action="store_true")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--async-writes", action="store_true")
    p.add_argument("--compile", default=None, metavar="BACKEND", help="Engine(compile={'backend': BACKEND})")
    p.add_argument("--sync-every", type=int, default=None)
    p.add_argument("--stop-on-rank1-at", type=int, default=None, help="rank 1 alone sets should_stop at this step")
    args = p.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    out = args.out / f"rank{rank}" if args.per_rank_dirs else args.out

    torch.manual_seed(123)
    cfg = {**TINY_CFG, "drop_rate": 0.0 if args.no_dropout else 0.1}
    text = load_verdict()[:3000]
    split = int(0.9 * len(text))
    ctx = cfg["context_length"]
    train = create_dataloader(
        text[:split], batch_size=args.batch_size, max_length=ctx, stride=ctx, shuffle=not args.no_shuffle
    )
    val = create_dataloader(text[split:], batch_size=2, max_length=ctx, stride=ctx, shuffle=False, drop_last=False)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    tracker = LossTracker(eval_freq=4, eval_iter=1, out_dir=out / "metrics")
    plugins = [
        LRWarmup(warmup_steps=3, initial_lr=1e-5),
        CosineDecay(min_lr=1e-5),
        GradClip(max_norm=1.0, start_step=3),
        tracker,
        # synchronous unless asked, so a kill at a given step finds a known set of files on disk
        Checkpoint(out / "checkpoints", every_steps=5, resume=args.resume, async_write=args.async_writes),
    ]
    if args.kill_at is not None:
        plugins.append(KillAt(args.kill_at))
    seen: list[list] = []

    class Seen:  # which sequences this rank trained on, per epoch
        @hookimpl
        def before_step(self, engine, batch):
            micro = batch if engine.grad_accum_steps > 1 else [batch]
            seen.append([engine.state.epoch, [row[:4].tolist() for mb in micro for row in mb[0]]])

    plugins.append(Seen())

    class StopOnRank1:  # a stop asked for on one rank only: every rank must still leave together
        @hookimpl
        def after_step(self, engine, loss):
            if engine.state.rank == 1 and engine.state.step == args.stop_on_rank1_at:
                engine.state.should_stop = True

    if args.stop_on_rank1_at is not None:
        plugins.append(StopOnRank1())
    engine = Engine(
        model,
        optimizer,
        train,
        val,
        plugins=plugins,
        device="cpu",
        grad_accum_steps=args.grad_accum,
        compile={"backend": args.compile} if args.compile else False,
        sync_every=args.sync_every,
    )
    engine.fit(epochs=args.epochs, max_steps=args.max_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": model.state_dict(),
            "steps": engine.state.step,
            "tokens_seen": engine.state.tokens_seen,
            "world_size": engine.state.world_size,
            "train_losses": tracker.train_losses,
            "lrs": tracker.lrs,
            "seen": seen,
        },
        args.out / f"result-rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
