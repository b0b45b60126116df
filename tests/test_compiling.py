"""Engine(compile=...): the model is compiled, the loop is not; keys, hooks and resume stay eager's."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from enginekit import Engine
from enginekit.compiling import compile_options
from enginekit.gpt import GPTModel
from enginekit.plugins import Checkpoint, LossTracker
from enginekit.testing import HookRecorder


def test_compile_options_are_torch_compile_arguments():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options({"mode": "reduce-overhead", "dynamic": False}) == {
        "mode": "reduce-overhead",
        "dynamic": False,
    }
    with pytest.raises(ValueError, match=r"unknown torch.compile argument\(s\) 'modes'"):
        compile_options({"modes": "max-autotune"})
    with pytest.raises(ValueError, match="compile must be True, False or a dict"):
        compile_options("inductor")


class CountingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts captures."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def tiny_gpt_run(cfg: dict, compile: object, plugins: list, epochs: int = 2):
    torch.manual_seed(0)
    model = GPTModel(cfg)
    data = torch.randint(0, cfg["vocab_size"], (8, cfg["context_length"] + 1))
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=2, shuffle=True)
    val = DataLoader(TensorDataset(data[:4, :-1], data[:4, 1:]), batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = Engine(model, optimizer, loader, val, plugins=plugins, device="cpu", compile=compile)
    recorder = HookRecorder(engine)
    engine.fit(epochs=epochs)
    return engine, recorder


def test_training_and_evaluation_compile_once_each_and_match_eager(tiny_cfg, capsys):
    cfg = {**tiny_cfg, "drop_rate": 0.0}
    backend = CountingBackend()
    tracker = LossTracker(eval_freq=2, eval_iter=2)
    compiled, compiled_hooks = tiny_gpt_run(cfg, {"backend": backend}, [tracker], epochs=1)
    after_one_epoch = backend.graphs
    # training (grad mode, train()) and evaluation (no_grad, eval()) are one graph each, captured once
    assert after_one_epoch == 2
    compiled.fit(epochs=3)  # more steps and evaluations: the cached graphs serve them all
    assert backend.graphs == after_one_epoch
    out = capsys.readouterr().out
    assert out.count("torch.compile: the first step compiles the model") == 1
    assert out.count("torch.compile: compiled; training goes on") == 1

    eager_tracker = LossTracker(eval_freq=2, eval_iter=2)
    eager, eager_hooks = tiny_gpt_run(cfg, False, [eager_tracker], epochs=1)
    eager.fit(epochs=3)
    assert [c.hook for c in compiled_hooks.calls] == [c.hook for c in eager_hooks.calls]
    assert tracker.train_losses == pytest.approx(eager_tracker.train_losses, rel=1e-6)
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # no _orig_mod. prefix
    assert not any(k.startswith("_orig_mod") for k in compiled.model.state_dict())


def test_inductor_run_checkpoints_and_resumes_eager_and_back(tiny_cfg, tmp_path):
    """One real compile (tens of seconds on two cores): compiled -> eager -> compiled through checkpoints."""
    cfg = {**tiny_cfg, "drop_rate": 0.0}

    def engine_for(compile: bool, resume: bool, seed: int = 0) -> tuple[Engine, Checkpoint]:
        torch.manual_seed(seed)  # a resumed engine starts from other weights: only the checkpoint makes them equal
        model = GPTModel(cfg)
        data = torch.randint(
            0, cfg["vocab_size"], (8, cfg["context_length"] + 1), generator=torch.Generator().manual_seed(9)
        )
        loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=2)
        ckpt = Checkpoint(tmp_path, every_steps=2, keep_last=5, resume=resume, async_write=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return Engine(model, optimizer, loader, plugins=[ckpt], device="cpu", compile=compile), ckpt

    first, _ = engine_for(compile=True, resume=False)
    first.fit(max_steps=2)
    saved = {k: v.clone() for k, v in first.model.state_dict().items()}

    second, _ = engine_for(compile=False, resume=True, seed=1)  # an eager engine takes the compiled run's checkpoint
    second.fit(max_steps=4)
    third, _ = engine_for(compile=True, resume=True, seed=2)  # and a compiled one the eager run's
    third.fit(max_steps=6)
    assert third.state.step == 6

    reference, _ = engine_for(compile=False, resume=False)
    for path in tmp_path.glob("ckpt-*"):
        shutil.rmtree(path)  # checkpoints are folders
    reference.fit(max_steps=2)
    for key, value in reference.model.state_dict().items():  # what the compiled run saved is eager's, to rounding
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5)
    reference.fit(max_steps=6)
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(third.model.state_dict()[key], value, rtol=1e-3, atol=1e-4)
