"""The plugin-testing kit itself: it drives plugins exactly like the engine, with no model."""

from __future__ import annotations

import math

import pytest

from enginekit import hookimpl
from enginekit.testing import HookRecorder, StandInModel, drive, make_engine


class Halving:
    @hookimpl
    def before_step(self, engine, batch):
        if engine.state.step > 0:
            for group in engine.optimizer.param_groups:
                group["lr"] *= 0.5


def test_drives_a_toy_plugin_without_a_model():
    run = drive(Halving(), steps_per_epoch=4, lr=1.0)
    assert run.lrs == [1.0, 0.5, 0.25, 0.125]
    assert isinstance(run.engine.model, StandInModel)
    step_hooks = ["before_step", "after_backward", "before_optimizer_step", "after_step"]
    assert [s.hooks for s in run.steps] == [step_hooks] * 4


def test_records_which_plugins_ran_for_each_hook_in_call_order():
    class Other:
        @hookimpl
        def before_step(self, engine, batch):
            pass

    run = drive([Halving(), Other()], steps_per_epoch=1)
    before_step = next(c for c in run.calls if c.hook == "before_step")
    assert before_step.plugins == ["other", "halving"]  # pluggy: last registered runs first
    assert next(c for c in run.calls if c.hook == "after_step").plugins == []


def test_real_param_groups_and_per_group_lrs():
    engine = make_engine(param_groups=3, lr=[0.1, 0.2, 0.3])
    assert [g["lr"] for g in engine.optimizer.param_groups] == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="lr has 2 values but param_groups is 3"):
        make_engine(param_groups=3, lr=[0.1, 0.2])


def test_fixed_losses_reach_after_step():
    seen = []

    class Spy:
        @hookimpl
        def after_step(self, engine, loss):
            seen.append(float(loss))

    drive(Spy(), steps_per_epoch=3, losses=[3.0, 2.0, 1.0])
    assert seen == [3.0, 2.0, 1.0]


def test_recorder_attaches_to_any_engine_and_detaches():
    engine = make_engine(steps_per_epoch=2)
    rec = HookRecorder(engine)
    engine.fit()
    assert rec.hooks[0] == "before_fit" and rec.hooks[-1] == "after_fit"
    n = len(rec.calls)
    rec.detach()
    engine.fit(epochs=2)  # a second fit continues from step 2; nothing recorded now
    assert len(rec.calls) == n
    assert all(not math.isnan(c.lr) for c in rec.calls)


def test_a_single_named_plugin_can_be_driven():
    run = drive(("halver", Halving()), steps_per_epoch=2, lr=1.0)
    assert list(run.engine.plugins) == ["halver"] and run.lrs == [1.0, 0.5]


def test_fixed_losses_are_the_training_loss_only_and_evaluations_are_injected_apart():
    from enginekit.plugins import LossTracker

    tracker = LossTracker(eval_freq=2)
    run = drive(tracker, steps_per_epoch=4, lr=0.0, losses=[9.0] * 4)
    assert all(r["step_loss"] == 9.0 for r in tracker.records)
    assert all(r["val_loss"] != 9.0 and r["train_loss"] != 9.0 for r in tracker.records)  # real evaluations

    run = drive([], steps_per_epoch=4, losses=[9.0] * 4, evaluations={1: {"val_loss": 0.5}, 3: {"val_loss": 0.25}})
    assert run.evaluations == [(1, {"val_loss": 0.5}), (3, {"val_loss": 0.25})]
    assert run.engine.metrics["val_loss"] == 0.25 and run.engine.metrics.step_of("val_loss") == 3
    assert "evaluator" in run.engine.plugins


def test_evaluations_can_be_a_function_of_the_step():
    run = drive([], steps_per_epoch=6, evaluations=lambda step: {"acc": step / 10} if step % 3 == 0 else None)
    assert run.evaluations == [(0, {"acc": 0.0}), (3, {"acc": 0.3})]


def test_no_validation_loader_when_asked():
    from enginekit.plugins import LossTracker

    tracker = LossTracker(eval_freq=2)
    run = drive(tracker, steps_per_epoch=2, val_batches=0)
    assert run.engine.val_loader is None
    assert math.isnan(tracker.val_losses[0]) and not math.isnan(tracker.train_losses[0])


def test_calls_record_arguments_and_what_was_published():
    run = drive([], steps_per_epoch=2)
    save_points = [c.kwargs["reason"] for c in run.calls if c.hook == "on_save_point"]
    assert save_points == ["step", "step", "epoch"]
    after_step = next(c for c in run.calls if c.hook == "after_step")
    assert float(after_step.kwargs["loss"]) > 0 and after_step.published == {}
