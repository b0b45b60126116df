"""The metrics channel: publish anywhere, read anywhere, tensors stay tensors until read."""

from __future__ import annotations

import math

import pytest
import torch

from enginekit import Metrics, hookimpl
from enginekit.plugins import GradClip
from enginekit.testing import drive


def test_a_tensor_is_stored_as_is_until_someone_reads_it():
    metrics = Metrics()
    metrics.step = 4
    value = torch.tensor(2.5)
    metrics.publish("loss", value)
    assert metrics.tensor("loss") is value  # no .item(): publishing never waits for the device
    assert metrics["loss"] == 2.5 and isinstance(metrics["loss"], float)
    assert isinstance(metrics.tensor("loss"), float)  # converted once, then cached
    assert metrics.step_of("loss") == 4


def test_latest_value_wins_and_at_collects_one_steps_numbers():
    metrics = Metrics()
    metrics.step = 0
    metrics.publish("lr", 0.1)
    metrics.publish("acc", 0.5)
    metrics.step = 1
    metrics.publish("lr", 0.2)
    assert metrics.at(1) == {"lr": 0.2}
    assert metrics.at(0) == {"acc": 0.5}
    assert metrics.as_dict() == {"lr": 0.2, "acc": 0.5}
    assert metrics.get("missing") is None and metrics.get("missing", 3.0) == 3.0
    assert "lr" in metrics and len(metrics) == 2


def test_serial_tells_a_consumer_whether_a_value_is_new():
    metrics = Metrics()
    assert metrics.serial("x") == 0
    metrics.publish("x", 1.0)
    first = metrics.serial("x")
    _ = metrics["x"]  # reading is not publishing
    assert metrics.serial("x") == first
    metrics.publish("x", 1.0)
    assert metrics.serial("x") > first


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("", 1.0, "non-empty strings"),
        ("x", torch.ones(3), "single number, got a tensor of shape \\(3,\\)"),
        ("x", "1.0", "number or a 0-dim tensor, got str"),
        ("x", True, "number or a 0-dim tensor, got bool"),
    ],
)
def test_bad_publications_name_the_metric(name, value, match):
    with pytest.raises(ValueError, match=match):
        Metrics().publish(name, value)


def test_reading_an_unknown_metric_lists_the_published_ones():
    metrics = Metrics()
    metrics.publish("val_loss", 1.0)
    with pytest.raises(KeyError, match="no metric 'val_los' has been published; published so far: val_loss"):
        metrics["val_los"]


def test_state_round_trips_as_plain_values():
    metrics = Metrics()
    metrics.step = 7
    metrics.publish("step_loss", torch.tensor(1.5))
    state = metrics.state_dict()
    assert state == {"step_loss": [1.5, 7]}
    clone = Metrics()
    clone.load_state_dict(state)
    assert clone["step_loss"] == 1.5 and clone.step_of("step_loss") == 7 and clone.serial("step_loss") > 0


class ChannelSpy:
    """Reads the channel in every step hook, as a consumer would."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float, bool]] = []

    @hookimpl
    def after_step(self, engine, loss):
        m = engine.metrics
        self.seen.append((engine.state.step, m.step_of("step_loss"), m["lr"], m.tensor("step_loss") is loss))


def test_the_engine_publishes_step_loss_and_lr_for_the_step_in_progress():
    spy = ChannelSpy()
    run = drive([spy, GradClip(max_norm=1e-6, start_step=2)], steps_per_epoch=4, lr=0.5)
    assert [s[0] for s in spy.seen] == [s[1] for s in spy.seen] == [0, 1, 2, 3]
    assert [s[2] for s in spy.seen] == [0.5] * 4
    assert all(s[3] for s in spy.seen)  # the very tensor after_step receives: no copy, no sync
    published = [(c.step, sorted(c.published)) for c in run.calls if c.hook == "before_optimizer_step"]
    assert published == [(0, []), (1, []), (2, ["grad_norm"]), (3, ["grad_norm"])]
    assert run.engine.metrics.step == 3  # outside a step: the last finished one


def test_a_value_published_outside_a_step_belongs_to_the_last_finished_step():
    class EpochEnd:
        @hookimpl
        def after_epoch(self, engine):
            engine.metrics.publish("epoch_metric", float(engine.state.epoch))

    run = drive(EpochEnd(), epochs=2, steps_per_epoch=3)
    assert run.engine.metrics.step_of("epoch_metric") == 5
    assert math.isclose(run.engine.metrics["epoch_metric"], 1.0)
