"""TrainState, read-only while a save point writes it out, and the RNG snapshots a checkpoint
carries (enginekit/state.py)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from enginekit import TrainState, hookimpl, plugin_failure
from enginekit.plugins import Checkpoint
from enginekit.state import capture_rng, restore_rng
from enginekit.testing import drive


def draws() -> tuple[float, float, float]:
    return random.random(), float(torch.rand(1)), float(np.random.rand())


def test_a_snapshot_restores_every_stream_to_the_same_draws():
    snapshot = capture_rng()
    first = [draws() for _ in range(3)]
    restore_rng(snapshot)
    assert [draws() for _ in range(3)] == first


def test_a_snapshot_survives_a_weights_only_checkpoint():
    snapshot = capture_rng()
    expected = draws()
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    buffer.seek(0)
    restore_rng(torch.load(buffer, weights_only=True))  # tensors and plain values only
    assert draws() == expected


def test_the_state_starts_at_zero_with_no_plan_and_rank_zero_is_main():
    state = TrainState()
    assert (state.step, state.epoch, state.tokens_seen, state.warmup_steps) == (0, 0, 0, 0)
    assert state.lr_decay is None and state.peak_lrs == [] and not state.should_stop
    assert state.is_main and not TrainState(rank=1, world_size=2).is_main
    assert TrainState().peak_lrs is not state.peak_lrs  # no list shared between runs



class Bump:
    @hookimpl
    def on_save_point(self, engine, reason):
        engine.state.step += 100


@pytest.mark.parametrize("registered_first", [True, False])
def test_a_plugin_changing_counters_at_a_save_point_fails_naming_it(tmp_path, registered_first):
    checkpoint = Checkpoint(tmp_path, every_steps=1)
    plugins = [("bump", Bump()), checkpoint] if registered_first else [checkpoint, ("bump", Bump())]
    with pytest.raises(RuntimeError, match="engine.state.step was changed in on_save_point") as info:
        drive(plugins, steps_per_epoch=4)
    failure = plugin_failure(info.value)
    assert failure is not None and (failure.plugin_name, failure.hook_name) == ("bump", "on_save_point")


def test_counters_stay_writable_outside_save_points():
    class Stopper:
        @hookimpl
        def after_step(self, engine, loss):
            engine.state.should_stop = engine.state.step == 1

    run = drive(Stopper(), steps_per_epoch=4)
    assert run.engine.state.step == 2
