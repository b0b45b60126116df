"""TrainState and the RNG snapshots a checkpoint carries (enginekit/state.py)."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from enginekit import TrainState
from enginekit.state import capture_rng, restore_rng


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
