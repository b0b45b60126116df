"""enginekit.plugin_api: the public module plugins and scripts use."""

from __future__ import annotations

import pytest

import enginekit.plugin_api as api
from enginekit.plugins import CosineDecay, LRWarmup
from enginekit.testing import drive


def test_lr_preview_is_the_schedule_the_engine_runs():
    schedule = [LRWarmup(warmup_steps=3, initial_lr=0.0), CosineDecay(min_lr=0.1)]
    lrs = api.lr_preview(schedule, lr=1.0, steps_per_epoch=4, epochs=2)
    again = [LRWarmup(warmup_steps=3, initial_lr=0.0), CosineDecay(min_lr=0.1)]
    assert lrs == drive(again, lr=1.0, steps_per_epoch=4, epochs=2).lrs
    assert len(lrs) == 8 and lrs[:4] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0]) and lrs[-1] > 0.1


def test_lr_preview_per_group_and_max_steps():
    lrs = api.lr_preview([LRWarmup(warmup_steps=2, initial_lr=0.0)], lr=[1.0, 0.5], steps_per_epoch=5, max_steps=3)
    assert lrs == [[0.0, 0.0], [0.5, 0.25], [1.0, 0.5]]


def test_lr_preview_trains_nothing_and_checks_its_settings():
    with pytest.raises(ValueError, match="lr_preview: steps_per_epoch must be an int >= 1, got 0"):
        api.lr_preview([], lr=1.0, steps_per_epoch=0)
    assert api.lr_preview([], lr=0.25, steps_per_epoch=3) == [0.25, 0.25, 0.25]


def test_the_module_offers_what_it_documents():
    for name in api.__all__:
        assert getattr(api, name).__doc__, f"{name} is public and undocumented"
        assert f":func:`{name}`" in api.__doc__ or f":class:`{name}`" in api.__doc__, name


def test_the_run_lock_and_atomic_write_work_from_here(tmp_path):
    api.atomic_write(tmp_path / "x.txt", lambda f: f.write(b"hello"))
    assert (tmp_path / "x.txt").read_bytes() == b"hello"
    api.lock_folder(tmp_path)
    try:
        assert (tmp_path / ".enginekit.lock").exists()
    finally:
        api.unlock_folder(tmp_path)
