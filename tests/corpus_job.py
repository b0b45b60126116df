"""A tiny GPT trained on a prepared corpus through the engine, for the SIGTERM resume test (fresh processes).

    python tests/corpus_job.py CORPUS OUT [--term-at K] [--resume] [--workers N]
    torchrun --standalone --nproc_per_node=2 tests/corpus_job.py CORPUS OUT ...

Two epochs with the appendix-D plugins, a LossTracker writing OUT/metrics/metrics.jsonl and a
Checkpoint every 5 steps. Every step appends "step sha256-of-its-inputs" to OUT/order.txt (the
data order; OUT/order-rank{R}.txt under torchrun). ``--term-at K`` sends SIGTERM to itself
during step K: the engine finishes the step, checkpoints it and exits 143. At the end
OUT/result.pt (rank 0) holds the weights and the losses.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from enginekit import Engine, TrainingInterrupted, hookimpl  # noqa: E402
from enginekit.data import corpus_loaders  # noqa: E402
from enginekit.gpt import GPTModel  # noqa: E402
from enginekit.plugins import Checkpoint, CosineDecay, GradClip, LossTracker, LRWarmup  # noqa: E402

from conftest import TINY_CFG  # noqa: E402


class OrderLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    @hookimpl
    def before_step(self, engine, batch):
        digest = hashlib.sha256(batch[0].numpy().tobytes()).hexdigest()[:16]
        with self.path.open("a") as f:
            f.write(f"{engine.state.step} {digest}\n")


class TermAt:
    def __init__(self, step: int) -> None:
        self.term_step = step

    @hookimpl
    def after_backward(self, engine):
        if engine.state.step == self.term_step:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("corpus", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--term-at", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(123)
    args.out.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    order = args.out / (f"order-rank{os.environ.get('RANK', '0')}.txt" if world > 1 else "order.txt")
    ctx = TINY_CFG["context_length"]
    train, val = corpus_loaders(args.corpus, batch_size=2, context_length=ctx, seed=7, num_workers=args.workers)
    model = GPTModel(TINY_CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    tracker = LossTracker(eval_freq=3, eval_iter=2, out_dir=args.out / "metrics")
    plugins = [
        LRWarmup(warmup_steps=4, initial_lr=1e-5),
        CosineDecay(min_lr=1e-5),
        GradClip(max_norm=1.0, start_step=4),
        tracker,
        OrderLog(order),
        Checkpoint(args.out / "checkpoints", every_steps=5, keep_last=2, resume=args.resume, async_write=False),
    ]
    if args.term_at is not None:
        plugins.append(TermAt(args.term_at))
    engine = Engine(model, optimizer, train, val, plugins=plugins, device="cpu")
    try:
        engine.fit(epochs=2)
    except TrainingInterrupted as exc:
        return exc.exit_code
    if not engine.state.is_main:
        return 0
    torch.save(
        {
            "model": model.state_dict(),
            "train_losses": tracker.train_losses,
            "val_losses": tracker.val_losses,
            "steps": engine.state.step,
            "steps_per_epoch": engine.state.steps_per_epoch,
        },
        args.out / "result.pt",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
