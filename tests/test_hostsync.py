"""The deferred finite check (sync_every > 1): how often the host reads, and what it still guarantees."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from enginekit import NonFiniteLossError
from enginekit.hostsync import HostSync
from enginekit.plugins import Checkpoint
from enginekit.testing import make_engine


def count_host_reads(monkeypatch) -> list[int]:
    """Every ``Tensor.item()`` and ``bool(tensor)`` the engine makes from here on: what makes a CUDA
    host wait (the DataLoader's own read of its CPU seed, once per epoch, is not the engine's)."""
    calls = [0]
    item, to_bool = torch.Tensor.item, torch.Tensor.__bool__

    def engines(frame) -> bool:
        return f"{os.sep}enginekit{os.sep}" in frame.f_code.co_filename

    def counting_item(self):
        calls[0] += engines(sys._getframe(1))
        return item(self)

    def counting_bool(self):
        calls[0] += engines(sys._getframe(1))
        return to_bool(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    return calls


def test_default_reads_every_step_and_sync_every_reads_every_n_steps_and_at_epoch_ends(monkeypatch):
    every_step = make_engine(steps_per_epoch=5)
    assert every_step._sync.every == 1  # the CPU default: free here, and a NaN never reaches the weights
    calls = count_host_reads(monkeypatch)
    every_step.fit(epochs=2)
    assert calls[0] == 10

    deferred = make_engine(steps_per_epoch=5, sync_every=4)
    calls[0] = 0
    deferred.fit(epochs=2)
    # reads after steps 4, 5 (epoch end), 8 and 10 (epoch end): one host read each
    assert deferred._sync.reads == 4 and calls[0] == 4


def test_a_nan_is_reported_at_the_next_read_with_the_range_of_steps():
    losses = [1.0] * 5 + [math.nan] + [1.0] * 10
    engine = make_engine(steps_per_epoch=12, losses=losses, sync_every=4)
    with pytest.raises(NonFiniteLossError, match=r"between step 4 and step 7 .*sync_every=4"):
        engine.fit()
    assert engine.state.step == 8  # steps 5..7 ran on: the honest cost of reading every 4 steps


def test_no_checkpoint_is_written_from_a_state_trained_on_a_nan(tmp_path):
    losses = [1.0] * 5 + [math.nan] + [1.0] * 10
    ckpt = Checkpoint(tmp_path, every_steps=3, every_epoch=False, async_write=False)
    engine = make_engine([ckpt], steps_per_epoch=12, losses=losses, sync_every=8)
    with pytest.raises(NonFiniteLossError):  # the save of step 6 reads first, and refuses
        engine.fit()
    assert [p.name for p in ckpt.checkpoints()] == ["ckpt-00000003"]


def test_sync_every_needs_the_error_policy_and_a_positive_count():
    with pytest.raises(ValueError, match="sync_every=4 needs nonfinite='error'"):
        make_engine(nonfinite="skip", sync_every=4)
    with pytest.raises(ValueError, match="sync_every"):
        make_engine(sync_every=0)
    assert HostSync(None, torch.device("cuda"), "error").every == 16  # only a device object: no GPU needed
    assert HostSync(None, torch.device("cuda"), "skip").every == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (benchmarks/gpu_checks.sh runs it)")
def test_a_cuda_step_waits_for_the_device_only_at_the_reads(tiny_cfg):
    from torch.utils.data import DataLoader, TensorDataset

    from enginekit import Engine, hookimpl
    from enginekit.gpt import GPTModel
    from enginekit.plugins import GradClip

    class NoSyncInsideSteps:  # torch raises on any host wait between before_step and after_step
        @hookimpl
        def before_step(self, engine, batch):
            if engine.state.step >= 2:  # the first steps set up cuBLAS and the allocator
                torch.cuda.set_sync_debug_mode("error")

        @hookimpl(trylast=True)
        def after_step(self, engine, loss):
            torch.cuda.set_sync_debug_mode("default")

    data = torch.randint(0, tiny_cfg["vocab_size"], (64, tiny_cfg["context_length"] + 1))
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=2, pin_memory=True)
    model = GPTModel(tiny_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    engine = Engine(model, opt, loader, plugins=[GradClip(1.0), NoSyncInsideSteps()], device="cuda", precision="bf16")
    try:
        engine.fit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.state.step == 32 and engine._sync.every == 16 and engine._sync.reads == 2
