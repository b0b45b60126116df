"""The hook protocol's composition guarantees: plugins talk through the engine, in any order.

Each test brings a third-party plugin written here (no subclass of a built-in, no import of one)
and checks that it joins the built-ins as an equal, whatever the registration order and
whatever tryfirst/trylast it uses.
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch

from enginekit import hookimpl
from enginekit.plugins import Checkpoint, CosineDecay, GradClip, LossTracker, LRWarmup
from enginekit.testing import drive, make_engine


class ThirdPartyWarmup:
    """A warmup of its own: publishes the fact, sets the lr during warmup, knows no other plugin."""

    def __init__(self, steps: int, initial_lr: float) -> None:
        self.steps, self.initial_lr = steps, initial_lr

    @hookimpl
    def before_fit(self, engine):
        engine.state.warmup_steps = self.steps

    @hookimpl
    def before_step(self, engine, batch):
        st = engine.state
        if st.step < self.steps:
            for group, peak in zip(engine.optimizer.param_groups, st.peak_lrs):
                group["lr"] = self.initial_lr + st.step * ((peak - self.initial_lr) / self.steps)


def clipped_steps(run) -> list[int]:
    return [c.step for c in run.calls if c.hook == "before_optimizer_step" and "grad_norm" in c.published]


def schedule_run(warmup, order: int):
    plugins = [warmup, CosineDecay(min_lr=1e-3), GradClip(max_norm=0.05, start_step="after_warmup")][::order]
    return drive(plugins, epochs=3, steps_per_epoch=5, lr=0.1, param_groups=2)


@pytest.mark.parametrize("order", [1, -1])
def test_a_third_party_warmup_drives_the_built_in_cosine_and_clipping_bit_for_bit(order):
    builtin = schedule_run(LRWarmup(warmup_steps=4, initial_lr=0.01), 1)
    third = schedule_run(ThirdPartyWarmup(steps=4, initial_lr=0.01), order)
    assert [s.lrs for s in third.steps] == [s.lrs for s in builtin.steps]  # every group, every step, exact
    assert clipped_steps(third) == clipped_steps(builtin) == list(range(4, 15))
    for a, b in zip(third.engine.model.parameters(), builtin.engine.model.parameters()):
        assert torch.equal(a, b)
    assert builtin.lrs[4] == 0.1 and builtin.lrs[3] < 0.1  # the D.2 shape: peak right after warmup


def make_publisher(opts: dict):
    class Accuracy:
        """Publishes a number of its own in after_step, with the given ordering options."""

        @hookimpl(**opts)
        def after_step(self, engine, loss):
            engine.metrics.publish("accuracy", engine.state.step / 100)

    return Accuracy()


class OwnClipper:
    """A clipper of its own; its norm reaches the metrics file through the channel."""

    @hookimpl
    def after_backward(self, engine):
        norm = torch.nn.utils.clip_grad_norm_(engine.model.parameters(), max_norm=1e9)
        engine.metrics.publish("own_norm", norm)


@pytest.mark.parametrize("opts", [{}, {"tryfirst": True}, {"trylast": True}])
@pytest.mark.parametrize("order", [1, -1])
def test_numbers_any_plugin_publishes_reach_the_metrics_rows_in_any_order(tmp_path, opts, order):
    plugins = [LossTracker(eval_freq=2, out_dir=tmp_path), make_publisher(opts), OwnClipper()][::order]
    drive(plugins, steps_per_epoch=5)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["accuracy"]) for r in rows] == [(0, 0.0), (2, 0.02), (4, 0.04)]
    assert all(r["own_norm"] > 0 and {"lr", "step_loss", "train_loss", "val_loss"} <= set(r) for r in rows)


class Dice:
    """A third-party plugin that draws random numbers late (trylast) in after_step and after_epoch."""

    def __init__(self) -> None:
        self.draws: list[float] = []

    @hookimpl(trylast=True)
    def after_step(self, engine, loss):
        self.draws.append(float(torch.rand(())))

    @hookimpl(trylast=True)
    def after_epoch(self, engine):
        self.draws.append(float(torch.rand(())))

    def state_dict(self):
        return {"draws": list(self.draws)}

    def load_state_dict(self, state):
        self.draws = list(state["draws"])


class Sigterm:
    def __init__(self, at_step: int) -> None:
        self.when = at_step  # not named like the parameter: a fault injector is not a run setting

    @hookimpl
    def after_backward(self, engine):
        if engine.state.step == self.when:
            signal.raise_signal(signal.SIGTERM)


def dice_run(folder, *, every_steps, every_epoch, resume=False, extra=()):
    torch.manual_seed(0)
    dice, tracker = Dice(), LossTracker(eval_freq=3)
    ckpt = Checkpoint(folder, every_steps=every_steps, every_epoch=every_epoch, keep_last=100, resume=resume)
    engine = make_engine([dice, tracker, ckpt, *extra], steps_per_epoch=4, lr=0.05)
    engine.fit(epochs=3)
    return engine, dice, tracker


def outcome(engine, dice, tracker):
    return dice.draws, tracker.records, [p.detach().clone() for p in engine.model.parameters()], engine.state.step


def assert_same(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3]
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


@pytest.mark.parametrize("every_steps, every_epoch", [(2, True), (4, False)])
def test_resuming_from_any_checkpoint_equals_the_uninterrupted_run(tmp_path, every_steps, every_epoch):
    """(2, True): per-step and epoch-end saves; (4, False): per-step saves at the epoch's last
    step, taken before after_epoch ran, so the resumed run must run that after_epoch itself."""
    full = tmp_path / "full"
    reference = outcome(*dice_run(full, every_steps=every_steps, every_epoch=every_epoch))
    saved = Checkpoint(full).checkpoints()
    assert len(saved) >= 3
    for ckpt in saved[1:]:  # resume from each (the newest is the end of the run)
        partial = tmp_path / f"from-{ckpt.name}"
        partial.mkdir()
        for older in Checkpoint(full).checkpoints():
            if older.name <= ckpt.name:
                shutil.copytree(older, partial / older.name)
        resumed = outcome(*dice_run(partial, every_steps=every_steps, every_epoch=every_epoch, resume=True))
        assert_same(resumed, reference)


def test_resuming_from_a_signal_checkpoint_equals_the_uninterrupted_run(tmp_path):
    from enginekit import TrainingInterrupted

    reference = outcome(*dice_run(tmp_path / "full", every_steps=None, every_epoch=True))
    with pytest.raises(TrainingInterrupted):
        dice_run(tmp_path / "cut", every_steps=None, every_epoch=True, extra=[Sigterm(at_step=5)])
    assert [p.name for p in Checkpoint(tmp_path / "cut").checkpoints()] == ["ckpt-00000006", "ckpt-00000004"]
    resumed = outcome(*dice_run(tmp_path / "cut", every_steps=None, every_epoch=True, resume=True))
    assert_same(resumed, reference)


def test_negative_control_a_checkpoint_taken_before_the_late_plugin_differs(tmp_path, monkeypatch):
    """Saving in after_step itself (as a trylast implementation used to) misses Dice's draw."""
    reference = outcome(*dice_run(tmp_path / "full", every_steps=2, every_epoch=False))

    def early_save(self, engine, loss):
        if (engine.state.step + 1) % 2 == 0:
            engine.state.step += 1  # describe the step as done, as the old save did
            try:
                self.save(engine)
            finally:
                engine.state.step -= 1

    monkeypatch.setattr(Checkpoint, "on_save_point", lambda self, engine, reason: None)
    monkeypatch.setattr(Checkpoint, "after_step", hookimpl(early_save), raising=False)
    dice_run(tmp_path / "early", every_steps=2, every_epoch=False)
    monkeypatch.undo()
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copytree(tmp_path / "early" / "ckpt-00000006", partial / "ckpt-00000006")
    resumed = outcome(*dice_run(partial, every_steps=2, every_epoch=False, resume=True))
    assert resumed[0] != reference[0]
