from __future__ import annotations

import json
import re
import sys

import pytest

from enginekit import hookimpl
from enginekit.plugins import LossTracker, LRWarmup
from enginekit.testing import drive

LINE = re.compile(r"^Ep (\d+) \(Iter (\d{6})\): Train loss (\d+\.\d{3}), Val loss (\d+\.\d{3})$")


def test_evaluates_every_eval_freq_steps_and_prints_book_lines(capsys):
    tracker = LossTracker(eval_freq=3, eval_iter=2)
    run = drive([tracker, LRWarmup(warmup_steps=4, initial_lr=0.0)], epochs=2, steps_per_epoch=5, lr=0.1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Ep ")]
    assert [m.groups()[:2] for m in map(LINE.match, lines)] == [
        ("1", "000000"),
        ("1", "000003"),
        ("2", "000006"),
        ("2", "000009"),
    ]
    assert [r["step"] for r in tracker.records] == [0, 3, 6, 9]
    assert len(tracker.train_losses) == len(tracker.val_losses) == len(tracker.tokens_seen) == 4
    assert tracker.tokens_seen == [8, 32, 56, 80]  # batch 2 x 4 tokens per step, counted after the step
    assert tracker.lrs == run.lrs and len(tracker.lrs) == 10  # one lr per step


def test_losses_are_the_engines_evaluation_of_both_loaders():
    tracker = LossTracker(eval_freq=100, eval_iter=2)
    run = drive(tracker, steps_per_epoch=3, lr=0.0)  # lr 0: weights never move
    engine = run.engine
    assert tracker.train_losses == [engine.evaluate(engine.train_loader, 2)]
    assert tracker.val_losses == [engine.evaluate(engine.val_loader, 2)]
    assert tracker.train_losses != tracker.val_losses


def test_out_dir_gets_metrics_as_they_come_and_plots_at_the_end(tmp_path):
    tracker = LossTracker(eval_freq=2, out_dir=tmp_path / "run")
    drive(tracker, steps_per_epoch=6)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows == tracker.records
    for png in ("losses.png", "lr.png"):
        assert (tmp_path / "run" / png).read_bytes()[:4] == b"\x89PNG"


def test_without_matplotlib_one_line_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    drive(LossTracker(eval_freq=2, out_dir=tmp_path), steps_per_epoch=4)
    out = capsys.readouterr().out
    assert out.count("matplotlib is not installed") == 1
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "losses.png").exists()


def test_state_round_trips():
    tracker = LossTracker(eval_freq=2)
    drive(tracker, steps_per_epoch=5)
    clone = LossTracker(eval_freq=2)
    clone.load_state_dict(tracker.state_dict())
    assert clone.records == tracker.records and clone.lrs == tracker.lrs


@pytest.mark.parametrize(
    "kwargs, match",
    [({"eval_freq": 0}, "eval_freq must be an int >= 1"), ({"eval_iter": 0}, "eval_iter must be an int >= 1")],
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=f"LossTracker: {match}"):
        LossTracker(**kwargs)


class WrapperEvaluator:
    """Reports from the code after its yield: when registered last it runs after LossTracker's."""

    @hookimpl(wrapper=True)
    def after_step(self, engine, loss):
        result = yield
        if engine.state.step in (0, 2):
            engine.publish_evaluation({"late": 1.0})
        return result


class EpochEvaluator:
    @hookimpl
    def after_epoch(self, engine):
        engine.publish_evaluation({"epoch_score": 2.0})


@pytest.mark.parametrize("order", [1, -1])
def test_late_and_out_of_step_evaluations_merge_into_one_row_per_step(tmp_path, order):
    tracker = LossTracker(eval_freq=5, out_dir=tmp_path)
    drive([tracker, WrapperEvaluator(), EpochEvaluator()][::order], steps_per_epoch=6)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == tracker.records
    assert [r["step"] for r in rows] == [0, 2, 5]  # own at 0 and 5; late at 0 and 2; the epoch's at 5
    assert rows[0]["late"] == 1.0 and "train_loss" in rows[0]
    assert rows[2]["epoch_score"] == 2.0 and "train_loss" in rows[2]
    assert tracker.train_losses == [rows[0]["train_loss"], rows[2]["train_loss"]]
