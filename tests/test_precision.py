"""Mixed precision: bf16 autocast, fp16 with its GradScaler, overflow steps (enginekit/precision.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from enginekit import Engine, hookimpl
from enginekit.gpt import GPTModel
from enginekit.testing import HookRecorder, make_engine

from conftest import DEVICES, gpt_loader


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocasts_the_matmuls(tiny_cfg, device):
    dtypes = {}
    for precision in ("fp32", "bf16"):
        model = GPTModel(tiny_cfg)
        seen = []
        model.out_head.register_forward_hook(lambda mod, inp, out, seen=seen: seen.append(out.dtype))
        engine = Engine(
            model, torch.optim.AdamW(model.parameters()), gpt_loader(tiny_cfg, 4, 2), device=device, precision=precision
        )
        state = engine.fit(epochs=1)
        dtypes[precision] = set(seen)
        assert state.step == 2
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_runs_with_a_grad_scaler_and_on_cpu_with_a_warning(tiny_cfg, device):
    model = GPTModel(tiny_cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            gpt_loader(tiny_cfg, 4, 2),
            device=device,
            precision="fp16",
        )
    said = [str(w.message) for w in caught if "precision='fp16' on CPU exercises the GradScaler path" in str(w.message)]
    assert len(said) == (1 if device == "cpu" else 0)  # the CPU is for testing; CUDA is fp16's home
    seen = []

    class Dtype:
        @hookimpl
        def after_backward(self, engine):
            seen.append(all(torch.isfinite(p.grad).all() for p in engine.model.parameters() if p.grad is not None))

    engine.register(Dtype())
    engine.fit()
    assert engine.state.step == 2 and seen == [True, True]
    assert isinstance(engine.scaler, torch.amp.GradScaler) and engine.scaler.get_scale() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_an_fp16_overflow_step_is_not_counted_and_never_reaches_after_backward(device):
    """A finite loss whose scaled gradients overflow: GradScaler skips the update; so does the engine."""
    from enginekit.plugins import LRWarmup

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on CPU says it is for testing
        engine = make_engine(
            [LRWarmup(warmup_steps=2, initial_lr=0.0)],
            steps_per_epoch=10,
            lr=1.0,
            precision="fp16",
            device=device,
            loss_fn=lambda out, targets: (out * 1e3).sum(),  # finite, with gradients near 4e4
        )
    # scaled by 2**115 those gradients overflow float32 (3.4e38) until the scaler has halved ~3 times
    engine.scaler = engine._precision.scaler = torch.amp.GradScaler(device, init_scale=2.0**115, growth_interval=1000)
    rec = HookRecorder(engine)
    grads_finite = []

    class Check:
        @hookimpl
        def after_backward(self, engine):
            grads_finite.append(all(torch.isfinite(p.grad).all() for p in engine.model.parameters()))

    engine.register(Check())
    engine.fit(max_steps=3)
    starts = [c.step for c in rec.calls if c.hook == "before_step"]
    assert len(starts) > 3 and starts[:2] == [0, 0]  # step 0 was tried again after the overflow
    assert [c.step for c in rec.calls if c.hook == "after_step"] == [0, 1, 2]
    assert grads_finite == [True, True, True]
    assert engine.state.step == 3 and engine.state.tokens_seen == 3 * 2 * 4  # only the steps taken
    assert rec.lrs == [0.0, 0.5, 1.0]  # the schedule did not move on for the dropped attempts
    assert engine.scaler.get_scale() < 2.0**115
