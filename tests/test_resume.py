"""The data position and the engine's part of a checkpoint (enginekit/resume.py)."""

from __future__ import annotations

import torch

from enginekit import Engine, hookimpl
from enginekit.gpt import GPTModel


def test_a_second_fit_continues_a_cut_epoch_in_the_same_data_order(tiny_cfg):
    from enginekit.data import create_dataloader, load_verdict

    def run(splits):
        torch.manual_seed(0)
        model = GPTModel(tiny_cfg)
        loader = create_dataloader(load_verdict()[:1500], batch_size=2, max_length=16, stride=16, shuffle=True)
        seen = []

        class Inputs:
            @hookimpl
            def before_step(self, engine, batch):
                seen.append(batch[0][:, 0].tolist())

        engine = Engine(model, torch.optim.AdamW(model.parameters()), loader, plugins=[Inputs()], device="cpu")
        for max_steps in splits:
            engine.fit(max_steps=max_steps, epochs=2)
        return seen, model.out_head.weight.detach().clone(), engine.state

    whole, w_whole, st = run([14])
    parts, w_parts, st2 = run([5, 14])
    assert parts == whole and torch.equal(w_parts, w_whole)
    assert (st.step, st.epoch) == (st2.step, st2.epoch) == (14, 1)
