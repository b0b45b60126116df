from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from enginekit import Engine
from enginekit.gpt import GPTModel
from enginekit.plugins import SampleText


def engine_for(cfg, plugin):
    x = torch.randint(0, 100, (4, cfg["context_length"] + 1), generator=torch.Generator().manual_seed(0))
    model = GPTModel(cfg)
    loader = DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=2)
    return Engine(model, torch.optim.AdamW(model.parameters()), loader, plugins=[plugin], device="cpu")


def test_prints_a_greedy_sample_after_each_epoch(tiny_cfg, capsys):
    sample = SampleText(max_new_tokens=7)
    engine_for(tiny_cfg, sample).fit(epochs=3)
    out = capsys.readouterr().out.splitlines()
    assert len(sample.samples) == 3 and out == sample.samples
    assert all(s.startswith("Every effort moves you") for s in sample.samples)
    assert all("\n" not in s for s in sample.samples)


def test_sampling_leaves_train_mode_and_the_rng_untouched(tiny_cfg):
    sample = SampleText(start_context="Hello", max_new_tokens=5)
    engine = engine_for(tiny_cfg, sample)
    engine.model.train()
    rng = torch.get_rng_state()
    sample.after_epoch(engine)
    assert engine.model.training
    assert torch.equal(rng, torch.get_rng_state())
    sample.after_epoch(engine)
    assert sample.samples[0] == sample.samples[1]  # greedy: deterministic


@pytest.mark.parametrize(
    "kwargs, match", [({"start_context": ""}, "start_context"), ({"max_new_tokens": 0}, "max_new_tokens")]
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=f"SampleText: {match}"):
        SampleText(**kwargs)
