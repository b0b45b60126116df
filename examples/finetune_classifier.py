"""Fine-tune the book's GPT as a 2-class classifier (the idea of chapter 6), with enginekit.

The task is a small synthetic spam filter: messages built from templates, "spam" (prize and
urgency wording) against "ham" (everyday wording), padded with <|endoftext|> as the book's
SpamDataset does. The model is the book's GPT with its output head replaced by a 2-way linear
layer; the class is read from the last token's logits. Around it, the appendix-D plugins
(warmup, cosine decay, clipping), LossTracker, a checkpoint, and an accuracy plugin that
reports through the engine's metrics channel, so the accuracy lands in metrics.jsonl beside the
losses and EarlyStopping can watch it.

    python examples/finetune_classifier.py                     # a few seconds on a CPU
    python examples/finetune_classifier.py --epochs 6 --out runs/classifier
    python examples/finetune_classifier.py --init gpt2         # chapter 6: from GPT-2's weights

With ``--init`` (a Hugging Face GPT-2 folder, its model.safetensors, or a hub name) the model is
GPT-2 with the book's chapter-6 choices: dropout 0, the head replaced by a 2-class layer, and
only the last transformer block, the final norm and the new head trained (the rest frozen).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from enginekit import Engine, hookimpl
from enginekit.data import gpt2_tokenizer
from enginekit.gpt import GPT_CONFIG_TINY, GPTModel, load_pretrained
from enginekit.plugins import Checkpoint, CosineDecay, EarlyStopping, GradClip, LossTracker, LRWarmup

SPAM = (
    ["WINNER!", "URGENT:", "Congratulations!", "FREE", "Final notice:"],
    ["you have won", "claim your", "get a free", "cash prize of", "exclusive offer for"],
    ["$1000 now", "iPhone today", "gift card", "vacation, reply YES", "prize, call now"],
)
HAM = (
    ["Hey,", "Hi mum,", "Ok so", "Sorry,", "Reminder:"],
    ["are we still on for", "can you pick up", "I left my keys at", "see you at", "don't forget"],
    ["lunch tomorrow", "the kids at five", "home tonight", "the station", "the meeting"],
)
PAD = 50256  # <|endoftext|>, as the book pads


def messages(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` labelled messages (1 = spam), half of each class, shuffled."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts, label = (SPAM, 1) if i % 2 else (HAM, 0)
        out.append((" ".join(rng.choice(p) for p in parts), label))
    rng.shuffle(out)
    return out


def loader(data: list[tuple[str, int]], batch_size: int, shuffle: bool) -> DataLoader:
    tokenizer = gpt2_tokenizer()
    encoded = [tokenizer.encode(text) for text, _ in data]
    length = max(len(e) for e in encoded)
    ids = torch.tensor([e + [PAD] * (length - len(e)) for e in encoded])
    labels = torch.tensor([label for _, label in data])
    return DataLoader(TensorDataset(ids, labels), batch_size=batch_size, shuffle=shuffle, drop_last=shuffle)


def last_token(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's forward_fn: the class logits are the last token's (the book's chapter 6)."""
    ids, labels = batch
    return model(ids)[:, -1, :], labels


class Accuracy:
    """Every ``eval_freq`` steps, the share of correct classes on both loaders, reported through
    the engine (``publish_evaluation``): it reaches metrics.jsonl and any ``after_evaluate``."""

    def __init__(self, eval_freq: int = 5) -> None:
        self.eval_freq = eval_freq

    @hookimpl
    def after_step(self, engine: Engine, loss: Any) -> None:
        if engine.state.step % self.eval_freq == 0:
            engine.publish_evaluation(
                {
                    "train_accuracy": accuracy(engine, engine.train_loader),
                    "val_accuracy": accuracy(engine, engine.val_loader),
                }
            )


def accuracy(engine: Engine, data: Any) -> float:
    model = engine.model
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for ids, labels in data:
                logits, labels = last_token(model, (ids.to(engine.device), labels.to(engine.device)))
                correct += int((logits.argmax(-1) == labels).sum())
                total += labels.numel()
    finally:
        model.train(was_training)
    return correct / total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-freq", type=int, default=5)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/classifier"))
    p.add_argument("--overwrite", action="store_true", help="start over in a folder that holds checkpoints")
    p.add_argument("--init", metavar="PATH_OR_NAME", help="start from GPT-2 weights (folder, .safetensors, hub name)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the first step is slow)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data = messages(240, args.seed)
    train_loader = loader(data[:200], args.batch_size, shuffle=True)
    val_loader = loader(data[200:], args.batch_size, shuffle=False)
    if args.init is None:
        model, cfg = GPTModel(GPT_CONFIG_TINY), GPT_CONFIG_TINY
    else:
        try:
            model, cfg = load_pretrained(args.init, drop_rate=0.0)
        except (OSError, ValueError, ImportError) as exc:
            print(f"error: --init: {exc}", file=sys.stderr)
            return 2
        model.requires_grad_(False)  # the book's chapter 6 trains the last block, the final norm and the head
        model.trf_blocks[-1].requires_grad_(True)
        model.final_norm.requires_grad_(True)
    model.out_head = torch.nn.Linear(cfg["emb_dim"], 2)  # as the book does for 2 classes
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    engine = Engine(
        model,
        optimizer,
        train_loader,
        val_loader,
        forward_fn=last_token,
        loss_fn=F.cross_entropy,
        device=args.device,
        compile=args.compile,
        plugins=[
            LRWarmup(warmup_fraction=0.1, initial_lr=args.lr / 100),
            CosineDecay(min_lr=args.lr / 100),
            GradClip(max_norm=1.0, start_step="after_warmup"),
            LossTracker(eval_freq=args.eval_freq, eval_iter=len(val_loader), out_dir=args.out),
            Accuracy(eval_freq=args.eval_freq),
            EarlyStopping(monitor="val_accuracy", mode="max", patience=4),
            Checkpoint(args.out / "checkpoints", overwrite=args.overwrite),
        ],
    )
    try:
        engine.fit(epochs=args.epochs)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    m = engine.metrics
    engine.print(
        f"done: {engine.state.step} steps; train accuracy {m['train_accuracy']:.2f}, "
        f"validation accuracy {m['val_accuracy']:.2f} (step {m.step_of('val_accuracy')}); metrics in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
