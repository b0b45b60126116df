"""A small training job for the resume and crash tests, run in fresh processes.

    python tests/resume_job.py OUT [--kill-at K] [--pause-write-at K] [--resume] [--async-writes]
                                   [--broken-rng | --broken-schedule]

Trains a tiny GPT (dropout on, shuffled data) for 3 epochs with every appendix-D plugin, a
LossTracker and a Checkpoint every 4 steps, then writes OUT/result.pt with everything a
bit-exact comparison needs. ``--kill-at K`` SIGKILLs itself at the start of step K;
``--pause-write-at K`` stops inside the write of the checkpoint after K steps, with every
file written but its manifest (the commit) not yet renamed into place, after creating
OUT/paused. The ``--broken-*`` flags are negative controls: resume without restoring the RNGs,
or without the step counter.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from enginekit import Engine, files, hookimpl, resume  # noqa: E402
from enginekit.data import create_dataloader, load_verdict  # noqa: E402
from enginekit.gpt import GPTModel  # noqa: E402
from enginekit.plugins import Checkpoint, CosineDecay, GradClip, LossTracker, LRWarmup  # noqa: E402

from conftest import TINY_CFG  # noqa: E402

EPOCHS, WARMUP = 3, 5


class KillAt:
    """SIGKILLs its own process at the start of step ``step``: a crash with no chance to clean up."""

    def __init__(self, step: int) -> None:
        self.kill_step = step  # not named like the parameter: a crash injector is not a run setting

    @hookimpl
    def before_step(self, engine, batch):
        if engine.state.step == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--pause-write-at", type=int)
    # synchronous by default, so a kill at a given step finds a known set of files on disk
    p.add_argument("--async-writes", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--broken-rng", action="store_true")
    p.add_argument("--broken-schedule", action="store_true")
    args = p.parse_args()

    if args.broken_rng:
        resume.restore_rng = lambda rng: None
    if args.broken_schedule:
        original = Engine.load_state_dict

        def forget_step(self, state):
            original(self, state)
            self.state.step = 0

        Engine.load_state_dict = forget_step
    if args.pause_write_at is not None:
        target = f"ckpt-{args.pause_write_at:08d}"

        def pause(tmp: Path) -> None:
            if tmp.parent.name == target and tmp.name.startswith(".manifest.json."):  # all written, not committed
                (args.out / "paused").write_text(tmp.name)
                time.sleep(120)

        files.before_replace = pause

    torch.manual_seed(123)
    text = load_verdict()[:1800]
    split = int(0.9 * len(text))
    ctx = TINY_CFG["context_length"]
    train = create_dataloader(text[:split], batch_size=2, max_length=ctx, stride=ctx, shuffle=True, drop_last=True)
    val = create_dataloader(text[split:], batch_size=2, max_length=ctx, stride=ctx, shuffle=False, drop_last=False)
    model = GPTModel(TINY_CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    tracker = LossTracker(eval_freq=3, eval_iter=2, out_dir=args.out / "metrics")
    plugins = [
        LRWarmup(warmup_steps=WARMUP, initial_lr=1e-5),
        CosineDecay(min_lr=1e-5),
        GradClip(max_norm=1.0, start_step=WARMUP),
        tracker,
        Checkpoint(
            args.out / "checkpoints", every_steps=4, keep_last=3, resume=args.resume, async_write=args.async_writes
        ),
    ]
    if args.kill_at is not None:
        plugins.append(KillAt(args.kill_at))
    engine = Engine(model, optimizer, train, val, plugins=plugins, device="cpu")
    engine.fit(epochs=EPOCHS)
    result = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lrs": tracker.lrs,
        "train_losses": tracker.train_losses,
        "val_losses": tracker.val_losses,
        "tokens_seen": tracker.tokens_seen,
        "steps": engine.state.step,
    }
    torch.save(result, args.out / "result.pt")


if __name__ == "__main__":
    main()
