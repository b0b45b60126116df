from __future__ import annotations

import pytest
import torch

from enginekit import hookimpl
from enginekit.plugins import GradClip, LRWarmup
from enginekit.testing import drive


class NormSpy:
    def __init__(self) -> None:
        self.norms: list[float] = []

    @hookimpl
    def after_backward(self, engine):
        grads = [p.grad for p in engine.model.parameters()]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


class UpdateSpy:
    """The gradient each update applied, read back from SGD's weight change (lr 1, no momentum)."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self.applied: list[float] = []

    @hookimpl
    def before_step(self, engine, batch):
        self.weights = [p.detach().clone() for p in engine.model.parameters()]

    @hookimpl
    def after_step(self, engine, loss):
        deltas = [(w - p.detach()).norm() for w, p in zip(self.weights, engine.model.parameters())]
        self.applied.append(float(torch.linalg.vector_norm(torch.stack(deltas))))


def test_readers_see_unclipped_gradients_and_the_update_uses_clipped_ones_in_every_order():
    from itertools import permutations

    for order in permutations(["before", "clip", "after"]):
        spies = {"before": NormSpy(), "after": NormSpy()}
        clip, update = GradClip(max_norm=1e-3, start_step=2), UpdateSpy()
        plugins = {"clip": clip, **spies}
        run = drive([(name, plugins[name]) for name in order] + [update], steps_per_epoch=5, lr=1.0)
        assert len(run.steps) == 5 and all(n > 1e-3 for n in spies["before"].norms)
        assert spies["after"].norms == spies["before"].norms  # every reader: as backward left them
        assert float(clip.last_norm) == pytest.approx(spies["before"].norms[-1], rel=1e-6)  # grad_norm is pre-clip
        assert update.applied[:2] == pytest.approx(spies["before"].norms[:2], rel=1e-5)  # not clipped yet
        assert update.applied[2:] == pytest.approx([1e-3] * 3, rel=1e-3)  # clip_grad_norm_ adds 1e-6 to the norm


def test_clipping_gives_the_same_update_whatever_the_registration_order():
    weights = []
    for plugins in (
        [GradClip(max_norm=1e-3), LRWarmup(warmup_steps=2)],
        [LRWarmup(warmup_steps=2), GradClip(max_norm=1e-3)],
    ):
        run = drive([*plugins, NormSpy()], steps_per_epoch=4, grad_accum_steps=2)
        weights.append([p.detach().clone() for p in run.engine.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_clip_with_accumulation_sees_the_whole_steps_gradient():
    clip = GradClip(max_norm=1e9)
    one = drive(clip, steps_per_epoch=1, batch_size=8, lr=0.0)
    norm_big = float(clip.last_norm)
    clip2 = GradClip(max_norm=1e9)
    drive(clip2, steps_per_epoch=1, batch_size=2, grad_accum_steps=4, lr=0.0)
    assert one.engine.state.step == 1
    assert float(clip2.last_norm) == pytest.approx(norm_big, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_norm": 0}, "max_norm must be a finite number > 0"),
        ({"max_norm": float("nan")}, "max_norm"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"start_step": -1}, "start_step"),
    ],
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=f"GradClip: {match}"):
        GradClip(**kwargs)


def test_start_step_after_the_run_is_rejected():
    with pytest.raises(ValueError, match="start_step \\(50\\) is not before the run's end \\(10 steps\\)"):
        drive(GradClip(start_step=50), steps_per_epoch=10)


def clipped_steps(run) -> list[int]:
    """Steps whose grad_norm was published, read from the metrics channel as a consumer would."""
    return [c.step for c in run.calls if c.hook == "before_optimizer_step" and c.published.get("grad_norm")]


def test_after_warmup_takes_the_start_from_the_published_warmup_in_either_order():
    for plugins in (
        [GradClip(start_step="after_warmup"), LRWarmup(warmup_fraction=0.2)],
        [LRWarmup(warmup_fraction=0.2), GradClip(start_step="after_warmup")],
    ):
        run = drive(plugins, epochs=15, steps_per_epoch=9)
        assert run.engine.state.warmup_steps == 27  # int(0.2 * 135), the book's first post-warmup step
        assert clipped_steps(run) == list(range(27, 135))


def test_after_warmup_without_any_warmup_clips_from_step_zero():
    run = drive(GradClip(start_step="after_warmup"), steps_per_epoch=4)
    assert run.engine.state.warmup_steps == 0
    assert clipped_steps(run) == [0, 1, 2, 3]
