"""The engine with the appendix-D plugins equals the book's train_model loop, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from enginekit import Engine
from enginekit.data import create_dataloader, load_verdict
from enginekit.gpt import GPTModel
from enginekit.plugins import CosineDecay, GradClip, LossTracker, LRWarmup, SampleText

EPOCHS, WARMUP, INITIAL_LR, MIN_LR, PEAK_LR = 2, 5, 1e-5, 1e-5, 1e-3
EVAL_FREQ, EVAL_ITER = 3, 2


def loaders(cfg):
    text = load_verdict()[:1800]
    split = int(0.9 * len(text))
    ctx = cfg["context_length"]
    train = create_dataloader(text[:split], batch_size=2, max_length=ctx, stride=ctx, shuffle=True, drop_last=True)
    val = create_dataloader(text[split:], batch_size=2, max_length=ctx, stride=ctx, shuffle=False, drop_last=False)
    return train, val


def loader_loss(model, loader, num_batches):
    total = 0.0
    for i, (x, y) in enumerate(loader):
        if i >= num_batches:
            break
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    return total / num_batches


def appendix_d_loop(cfg):
    """Appendix D's train_model (clipping from the first post-warmup step), from its formulas."""
    torch.manual_seed(123)
    train_loader, val_loader = loaders(cfg)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.1)
    peak_lr = optimizer.param_groups[0]["lr"]
    total_steps = len(train_loader) * EPOCHS
    lr_increment = (peak_lr - INITIAL_LR) / WARMUP
    train_losses, val_losses, track_tokens, track_lrs = [], [], [], []
    tokens_seen, global_step = 0, -1
    for _ in range(EPOCHS):
        model.train()
        for inputs, targets in train_loader:
            optimizer.zero_grad()
            global_step += 1
            if global_step < WARMUP:
                lr = INITIAL_LR + global_step * lr_increment
            else:
                progress = (global_step - WARMUP) / (total_steps - WARMUP)
                lr = MIN_LR + (peak_lr - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))
            for group in optimizer.param_groups:
                group["lr"] = lr
            track_lrs.append(lr)
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            loss.backward()
            if global_step >= WARMUP:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            tokens_seen += inputs.numel()
            if global_step % EVAL_FREQ == 0:
                model.eval()
                with torch.no_grad():
                    train_losses.append(loader_loss(model, train_loader, EVAL_ITER))
                    val_losses.append(loader_loss(model, val_loader, min(EVAL_ITER, len(val_loader))))
                model.train()
                track_tokens.append(tokens_seen)
    return model, (train_losses, val_losses, track_tokens, track_lrs)


def engine_run(cfg, order):
    torch.manual_seed(123)
    train_loader, val_loader = loaders(cfg)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.1)
    tracker = LossTracker(eval_freq=EVAL_FREQ, eval_iter=EVAL_ITER)
    plugins = [
        LRWarmup(warmup_steps=WARMUP, initial_lr=INITIAL_LR),
        CosineDecay(min_lr=MIN_LR),
        GradClip(max_norm=1.0, start_step=WARMUP),
        tracker,
        SampleText(max_new_tokens=5),  # greedy sampling must not disturb the run
    ]
    if order == "reversed":
        plugins.reverse()
    Engine(model, optimizer, train_loader, val_loader, plugins=plugins, device="cpu").fit(epochs=EPOCHS)
    return model, (tracker.train_losses, tracker.val_losses, tracker.tokens_seen, tracker.lrs)


@pytest.fixture(scope="module")
def book(request):
    from conftest import TINY_CFG

    return appendix_d_loop(TINY_CFG)


@pytest.mark.parametrize("order", ["given", "reversed"])
def test_engine_equals_the_appendix_d_loop_bit_for_bit(book, tiny_cfg, order):
    book_model, (b_train, b_val, b_tokens, b_lrs) = book
    model, (train, val, tokens, lrs) = engine_run(tiny_cfg, order)
    assert (
        len(b_lrs) == len(loaders(tiny_cfg)[0]) * EPOCHS and b_lrs[WARMUP] == PEAK_LR
    )  # the run covers warmup and cosine
    assert lrs == b_lrs
    assert train == b_train and val == b_val and tokens == b_tokens
    book_state = book_model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, book_state[key]), key


def test_parity_test_can_fail(book, tiny_cfg):
    """Negative control: evaluating one step later shifts the RNG stream (evaluation iterates the
    shuffled loader), so dropout masks and the final weights differ: the comparison is that sharp."""
    book_model = book[0]
    torch.manual_seed(123)
    train_loader, val_loader = loaders(tiny_cfg)
    model = GPTModel(tiny_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.1)
    plugins = [
        LRWarmup(warmup_steps=WARMUP, initial_lr=INITIAL_LR),
        CosineDecay(min_lr=MIN_LR),
        GradClip(max_norm=1.0, start_step=WARMUP),
        LossTracker(eval_freq=EVAL_FREQ + 1, eval_iter=EVAL_ITER),
    ]
    Engine(model, optimizer, train_loader, val_loader, plugins=plugins, device="cpu").fit(epochs=EPOCHS)
    assert not torch.equal(model.out_head.weight, book_model.out_head.weight)
