"""What a resumed run must share with the run that wrote its checkpoint."""

from __future__ import annotations

import pytest

from enginekit.checkpointing import CheckpointError, check_same_model, run_settings
from enginekit.checkpointing.settings import compare_settings
from enginekit.plugins import GradClip
from enginekit.testing import make_engine


def test_run_settings_hold_the_engine_plan_optimizer_and_plugin_settings():
    engine = make_engine([GradClip(max_norm=0.5)], lr=0.1, steps_per_epoch=5)
    settings = run_settings(engine)
    assert settings["engine.train batches per epoch"] == 5
    assert settings["optimizer.group0.momentum"] == 0
    assert settings["grad_clip.max_norm"] == 0.5
    assert not any(key.endswith(".lr") or key.endswith(".foreach") for key in settings)  # scheduled / how it runs


def test_changes_are_listed_one_line_each_and_ignored_plugins_are_not_compared():
    saved = {"engine.precision": "fp32", "grad_clip.max_norm": 1.0, "gone.x": 1}
    now = {"engine.precision": "bf16", "grad_clip.max_norm": 1.0, "new.y": 2}
    assert compare_settings(saved, now, ignore=["gone", "new"]) == [
        "engine.precision: 'fp32' in the checkpoint, 'bf16' now"
    ]
    assert compare_settings(saved, now, ignore=[]) == [
        "engine.precision: 'fp32' in the checkpoint, 'bf16' now",
        "gone.x: 1 in the checkpoint, '(not set)' now",
        "new.y: '(not set)' in the checkpoint, 2 now",
    ]


def test_another_model_is_one_line_with_every_difference_in_details():
    own = {"a": (2, 3), "b": (4,), "c": (1,)}
    saved = {"a": (2, 4), "b": (4,), "d": (1,)}
    with pytest.raises(
        CheckpointError,
        match=r"ckpt-00000004 holds another model \(3 difference\(s\), first: missing from the checkpoint: c\)",
    ) as info:
        check_same_model("ckpt-00000004", own, saved)
    assert info.value.details == [
        "missing from the checkpoint: c",
        "not in this model: d",
        "a: (2, 4) in the checkpoint, (2, 3) here",
    ]
    check_same_model("ckpt-00000004", own, dict(own))
