"""EarlyStopping: a consumer of evaluation results, correct in any registration order."""

from __future__ import annotations

import math

import pytest

from enginekit import hookimpl
from enginekit.plugins import Checkpoint, EarlyStopping, LossTracker
from enginekit.plugins.early_stopping import improved
from enginekit.testing import drive, make_engine

from checkpoint_helpers import read_checkpoint


def val_losses(*values: float) -> dict[int, dict[str, float]]:
    """Evaluation results at steps 0, 1, 2, ... (one evaluation per step)."""
    return {step: {"val_loss": v} for step, v in enumerate(values)}


def test_stops_after_patience_evaluations_without_improvement(capsys):
    stopper = EarlyStopping(patience=2)
    run = drive(stopper, steps_per_epoch=10, evaluations=val_losses(3.0, 2.0, 2.5, 2.0, 1.0, 0.5))
    assert run.engine.state.step == 4  # judged at step 3: no better than 2.0 twice; ends after it
    assert (stopper.best, stopper.best_step, stopper.stopped_step) == (2.0, 1, 3)
    assert run.engine.metrics["val_loss_best"] == 2.0
    assert "EarlyStopping: val_loss has not improved by more than 0.0 for 2 evaluations" in capsys.readouterr().out


def test_min_delta_and_mode_max():
    assert improved(1.0, 2.0, 0.5, "min") and not improved(1.6, 2.0, 0.5, "min")
    assert improved(3.0, 2.0, 0.5, "max") and not improved(2.4, 2.0, 0.5, "max")
    assert not improved(math.nan, None, 0.0, "min")  # a NaN is never progress
    stopper = EarlyStopping(monitor="acc", patience=1, mode="max", min_delta=0.1)
    evaluations = {0: {"acc": 0.5}, 1: {"acc": 0.7}, 2: {"acc": 0.75}, 3: {"acc": 0.9}}
    run = drive(stopper, steps_per_epoch=10, evaluations=evaluations)
    assert run.engine.state.step == 3 and stopper.best == 0.7


def test_reports_of_other_metrics_are_not_judged():
    stopper = EarlyStopping(patience=1)
    evaluations = {0: {"val_loss": 1.0}, 1: {"acc": 0.1}, 2: {"acc": 0.2}, 3: {"val_loss": 0.5}, 4: {"val_loss": 0.6}}
    run = drive(stopper, steps_per_epoch=10, evaluations=evaluations)
    assert run.engine.state.step == 5 and stopper.best == 0.5


def test_a_monitor_nobody_reports_is_said_once_not_silently_ignored(capsys):
    stopper = EarlyStopping(monitor="val_acc")
    drive(stopper, steps_per_epoch=4, evaluations=val_losses(1.0, 1.0))
    out = capsys.readouterr().out
    assert out.count("EarlyStopping: no evaluation reported 'val_acc' in this fit, so it never judged") == 1
    assert "reported: val_loss" in out


def test_same_stop_in_every_registration_order_with_real_evaluations():
    """lr 0 keeps the validation loss constant, so patience runs out at a known step."""
    stops = []
    for order in (1, -1):
        plugins = [LossTracker(eval_freq=2), EarlyStopping(patience=2)][::order]
        run = drive(plugins, steps_per_epoch=20, lr=0.0)
        stops.append((run.engine.state.step, plugins[::order][1].stopped_step))
    assert stops == [(5, 4), (5, 4)]  # evaluations at steps 0 (best), 2, 4: stop after step 4


def test_judges_within_the_step_before_its_checkpoint(tmp_path):
    stopper = EarlyStopping(patience=1)
    run = drive(
        [stopper, Checkpoint(tmp_path, every_steps=1, every_epoch=False)],
        steps_per_epoch=10,
        evaluations=val_losses(1.0, 2.0),
    )
    hooks = [(c.hook, c.step) for c in run.calls if c.hook == "after_evaluate" or c.kwargs.get("reason") == "step"]
    assert hooks == [("after_evaluate", 0), ("on_save_point", 1), ("after_evaluate", 1), ("on_save_point", 2)]
    saved = read_checkpoint(tmp_path / "ckpt-00000002")
    assert saved["plugins"]["early_stopping"]["stopped_step"] == 1 and saved["engine"]["should_stop"] is True


def test_a_resumed_run_that_had_stopped_stays_stopped(tmp_path):
    first = drive(
        [EarlyStopping(patience=1), Checkpoint(tmp_path)], epochs=3, steps_per_epoch=10, evaluations=val_losses(1, 2)
    )
    assert first.engine.state.step == 2
    engine = make_engine(
        [EarlyStopping(patience=1), Checkpoint(tmp_path, resume=True)], steps_per_epoch=10, evaluations=val_losses(1, 2)
    )
    steps = []

    class Count:
        @hookimpl
        def after_step(self, engine, loss):
            steps.append(engine.state.step)

    engine.register(Count())
    engine.fit(epochs=3)
    assert steps == [] and engine.state.step == 2 and engine.plugins["early_stopping"].stopped_step == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"patience": 0}, "patience must be an int >= 1"),
        ({"patience": 1.5}, "patience must be an int >= 1"),
        ({"min_delta": -0.1}, "min_delta must be a finite number >= 0"),
        ({"min_delta": math.nan}, "min_delta must be a finite number >= 0"),
        ({"mode": "lowest"}, "mode must be one of"),
        ({"monitor": ""}, "monitor must be a metric name"),
    ],
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=f"EarlyStopping: {match}"):
        EarlyStopping(**kwargs)
