"""TensorBoard: every metric of the channel as scalars, equal to what metrics.jsonl holds."""

from __future__ import annotations

import json
import sys

import pytest

from enginekit.plugins import GradClip, LossTracker, TensorBoard
from enginekit.testing import drive


def test_scalars_read_back_equal_the_metrics_file(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plugins = [
        LossTracker(eval_freq=2, out_dir=tmp_path / "run"),
        GradClip(max_norm=1e-3),
        TensorBoard(tmp_path / "tb"),
    ]
    drive(plugins[::-1], steps_per_epoch=6, lr=0.1)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert {"step_loss", "lr", "grad_norm", "train_loss", "val_loss"} <= set(scalars)
    assert sorted(scalars["lr"]) == list(range(6)) and sorted(scalars["val_loss"]) == [0, 2, 4]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for name in ("train_loss", "val_loss", "lr", "step_loss", "grad_norm"):
            assert scalars[name][row["step"]] == pytest.approx(row[name], rel=1e-6)  # event files hold float32


def test_without_the_package_one_line_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError) as info:
        TensorBoard(tmp_path)
    assert (
        str(info.value) == 'TensorBoard: the tensorboard package is not installed; pip install "enginekit[tensorboard]"'
    )
