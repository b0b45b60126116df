"""Evaluation: the mean loss of a loader, as the book computes it (enginekit/evaluation.py)."""

from __future__ import annotations

import torch

from enginekit import Engine
from enginekit.gpt import GPTModel

from conftest import gpt_loader


def test_evaluate_restores_train_mode_and_averages_like_the_book(tiny_cfg):
    model = GPTModel(tiny_cfg)
    loader = gpt_loader(tiny_cfg, 6, 2)
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, device="cpu")
    model.train()
    got = engine.evaluate(loader, max_batches=2)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = (
            sum(
                torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                for x, y in list(loader)[:2]
            )
            / 2
        )
    assert got == expected
