"""Order-free for real (issue 23): every registration order gives the same run.

lr modifiers on top of warmup + cosine (also through checkpoint and resume), gradient readers
against a gradient writer, two owners of one plan fact, and every evaluator's metrics rows;
each through the stand-in engine in every order, and through a real tiny GPT.
"""

from __future__ import annotations

import json
import math
import signal
from itertools import permutations
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from enginekit import Engine, TrainingInterrupted, hookimpl
from enginekit.gpt import GPTModel
from enginekit.plugins import (
    Checkpoint,
    CosineDecay,
    EarlyStopping,
    GradClip,
    LossTracker,
    LRWarmup,
    ReduceLROnPlateau,
    cosine_lr,
    warmup_lr,
)
from enginekit.testing import HookRecorder, drive, make_engine

STEPS = 8  # one epoch of 8 steps: warmup 0..1, cosine 2..7
VAL = {0: 2.0, 1: 2.5, 2: 2.4, 4: 2.6, 5: 2.7}  # with patience 1: reduced at steps 2 and 5


class Evaluator:
    """Reports fixed validation results at chosen steps, as an evaluating plugin would."""

    def __init__(self, values: dict[int, float], name: str = "val_loss") -> None:
        self.values, self.name = values, name

    @hookimpl
    def after_step(self, engine, loss):
        if engine.state.step in self.values:
            engine.publish_evaluation({self.name: self.values[engine.state.step]})


class Kill:
    """SIGTERM during a chosen step: the engine finishes it, saves, raises TrainingInterrupted."""

    def __init__(self, at_step: int) -> None:
        self._at = at_step  # not a constructor-named attribute: not a setting the resume compares

    @hookimpl
    def after_backward(self, engine):
        if engine.state.step == self._at:
            signal.raise_signal(signal.SIGTERM)


class OldHalving:
    """The README's former HalveLROnPlateau: writes param_groups in after_evaluate (the bug)."""

    @hookimpl
    def after_evaluate(self, engine, metrics):
        if engine.state.step == 4:
            for group in engine.optimizer.param_groups:
                group["lr"] /= 2


def expected_lrs(scales: dict[int, float]) -> list[float]:
    """Warmup 2 steps from 0, cosine to 0, times the modifier's scale in force at each step."""
    base = [warmup_lr(s, 2, 0.0, 1.0) if s < 2 else cosine_lr(s, 2, STEPS, 1.0, 0.0) for s in range(STEPS)]
    scale, out = 1.0, []
    for step, lr in enumerate(base):
        out.append(lr * scale)
        scale = scales.get(step, scale)  # a reduction at step s counts from step s + 1
    return out


def lr_plugins():
    return [
        ("warmup", LRWarmup(warmup_steps=2, initial_lr=0.0)),
        ("cosine", CosineDecay(min_lr=0.0)),
        ("plateau", ReduceLROnPlateau(factor=0.5, patience=1, threshold=0.0)),
        ("evaluator", Evaluator(VAL)),
    ]


def test_a_plateau_reducer_composes_with_warmup_and_cosine_in_every_order():
    want = expected_lrs({2: 0.5, 5: 0.25})
    for order in permutations(range(4)):
        chosen = lr_plugins()
        run = drive([chosen[j] for j in order], steps_per_epoch=STEPS, lr=1.0)
        assert run.lrs == pytest.approx(want, rel=1e-12, abs=0), order
        assert dict(run.engine.lr_scales) == {"plateau": 0.25}
        assert run.engine.plugins["plateau"].reductions == [2, 5]
        # the published lr is the effective one, and after_step sees it in param_groups
        assert [c.lr for c in run.calls if c.hook == "after_step"] == run.lrs


def test_the_old_way_of_writing_param_groups_is_lost_under_a_schedule():
    """Negative control: what the README used to do is overwritten by the next before_step."""
    base = expected_lrs({})
    for order in permutations(range(3)):
        chosen = [LRWarmup(warmup_steps=2, initial_lr=0.0), CosineDecay(min_lr=0.0), OldHalving()]
        run = drive([chosen[j] for j in order] + [Evaluator(VAL)], steps_per_epoch=STEPS, lr=1.0)
        assert run.lrs == pytest.approx(base, rel=1e-12, abs=0)  # the halving never took effect


def test_without_a_schedule_a_factor_does_not_compound():
    run = drive([ReduceLROnPlateau(factor=0.5, patience=0, threshold=0.0), Evaluator({0: 1.0, 1: 2.0})], lr=1.0)
    assert run.lrs == [1.0, 1.0] + [0.5] * 8  # reduced once at step 1; the base stays 1.0
    assert run.engine.optimizer.param_groups[0]["lr"] == 1.0  # after fit: the base, not the scaled rate


def test_per_group_factors_and_any_setting_order_give_one_product():
    class Sets:
        def __init__(self, factor) -> None:
            self.factor = factor

        @hookimpl
        def before_step(self, engine, batch):
            engine.lr_scales[engine.name_of(self)] = self.factor

    for order in permutations([("a", Sets(0.5)), ("b", Sets([0.1, 1.0])), ("c", Sets(3.0))]):
        run = drive(list(order), steps_per_epoch=2, lr=[1.0, 2.0], param_groups=2)
        assert [s.lrs for s in run.steps] == [[0.5 * 0.1 * 3.0, 2.0 * 0.5 * 1.0 * 3.0]] * 2


def test_lr_scales_reject_bad_factors_in_one_line():
    engine = make_engine([])
    with pytest.raises(ValueError, match=r"engine.lr_scales\['x'\]: a factor must be a finite number >= 0, got nan"):
        engine.lr_scales["x"] = math.nan
    engine.lr_scales["y"] = [0.5, 0.5]
    with pytest.raises(ValueError, match=r"lr_scales\['y'\] has 2 factors but the optimizer has 1 parameter group"):
        engine.fit()


def test_a_reduction_survives_checkpoint_and_resume_in_every_order(tmp_path):
    want = drive(lr_plugins(), steps_per_epoch=STEPS, lr=1.0).lrs
    orders = [(order, False) for order in permutations(range(4))] + [((0, 1, 2, 3), True)]
    for i, (order, allow_changes) in enumerate(orders):  # allow_changes must not undo the reduction either
        folder = tmp_path / f"run{i}"

        def plugins(resume: bool, folder=folder, order=order, allow_changes=allow_changes) -> list:
            chosen = lr_plugins()
            ckpt = Checkpoint(folder, resume=resume, allow_changes=allow_changes, async_write=False)  # saves at SIGTERM
            return [chosen[j] for j in order] + [ckpt]

        first = make_engine([*plugins(False), Kill(3)], steps_per_epoch=STEPS, lr=1.0)
        first_rec = HookRecorder(first)
        with pytest.raises(TrainingInterrupted):
            first.fit()  # steps 0..3 done, reduced at step 2
        assert dict(first.lr_scales) == {"plateau": 0.5}
        resumed = make_engine(plugins(True), steps_per_epoch=STEPS, lr=1.0)
        rec = HookRecorder(resumed)
        resumed.fit()  # no plan change reported: the factor is not a plan fact
        assert dict(resumed.lr_scales) == {"plateau": 0.25}
        assert first_rec.lrs + rec.lrs == want


# ------------------------------------------------------------------ a real tiny GPT


def gpt_engine(cfg, plugins, seed: int = 0) -> Engine:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg["vocab_size"], (16, cfg["context_length"] + 1), generator=g)
    data = TensorDataset(x[:, :-1], x[:, 1:])
    train = DataLoader(data, batch_size=2, shuffle=True)
    val = DataLoader(TensorDataset(x[:4, :-1], x[:4, 1:]), batch_size=2)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return Engine(model, optimizer, train, val, plugins=plugins, device="cpu")


def gpt_lr_plugins(folder: Path, resume: bool, order: list[int]) -> list:
    chosen = [
        ("warmup", LRWarmup(warmup_steps=3, initial_lr=1e-5)),
        ("cosine", CosineDecay(min_lr=1e-5)),
        # mode "max" on a falling val_loss never improves: reductions are certain
        ("plateau", ReduceLROnPlateau(factor=0.5, patience=0, mode="max")),
        ("tracker", LossTracker(eval_freq=2)),
    ]
    return [chosen[j] for j in order] + [Checkpoint(folder, every_steps=2, resume=resume, async_write=False)]


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0]])
def test_tiny_gpt_with_a_plateau_reducer_resumed_equals_uninterrupted(tiny_cfg, tmp_path, order):
    whole = gpt_engine(tiny_cfg, gpt_lr_plugins(tmp_path / "whole", False, order))
    whole.fit(epochs=2)  # 16 steps
    cut = gpt_engine(tiny_cfg, [*gpt_lr_plugins(tmp_path / "cut", False, order), Kill(6)])
    with pytest.raises(TrainingInterrupted):
        cut.fit(epochs=2)  # steps 0..6 done and saved
    assert dict(cut.lr_scales) != {}  # reduced before the interruption
    resumed = gpt_engine(tiny_cfg, gpt_lr_plugins(tmp_path / "cut", True, order), seed=123)  # weights come back
    resumed.fit(epochs=2)
    tracked = resumed.plugins["tracker"]
    assert tracked.lrs == whole.plugins["tracker"].lrs
    assert resumed.plugins["plateau"].reductions == whole.plugins["plateau"].reductions != []
    assert dict(resumed.lr_scales) == dict(whole.lr_scales) != {}
    lrs = tracked.lrs
    assert lrs[8] < cosine_lr(8, 3, 16, 1e-3, 1e-5)  # scaled below the schedule's own value
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ gradient readers and writers


class GradNorm:
    """A reader: the total gradient norm in after_backward."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    @hookimpl
    def after_backward(self, engine):
        grads = [p.grad for p in engine.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


class Published:
    """What GradClip published as grad_norm (the norm before clipping), read after the step."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    @hookimpl
    def after_step(self, engine, loss):
        self.norms.append(engine.metrics["grad_norm"])


def test_tiny_gpt_gradient_readers_see_unclipped_gradients_in_either_order(tiny_cfg):
    seen = []
    for order in ([0, 1], [1, 0]):
        reader, clip = GradNorm(), GradClip(max_norm=1e-4)
        published = Published()
        plugins = [[reader, clip][j] for j in order] + [published]
        gpt_engine(tiny_cfg, plugins).fit(max_steps=3)
        assert reader.norms == pytest.approx(published.norms, rel=1e-5) and min(reader.norms) > 1e-3
        seen.append(reader.norms)
    assert seen[0] == seen[1]


# ------------------------------------------------------------------ one owner per plan fact


class LinearDecay:
    """A third-party decay that publishes lr_decay without checking for another."""

    @hookimpl
    def before_fit(self, engine):
        engine.state.lr_decay = engine.name_of(self)

    @hookimpl
    def before_step(self, engine, batch):
        st = engine.state
        for group, peak in zip(engine.optimizer.param_groups, st.peak_lrs):
            group["lr"] = peak * (1 - st.step / st.total_steps)


class OwnWarmup:
    @hookimpl
    def before_fit(self, engine):
        engine.state.warmup_steps = 2


@pytest.mark.parametrize(
    "pair, fact",
    [
        ([("linear_decay", LinearDecay()), ("cosine_decay", CosineDecay(min_lr=0.0))], "lr_decay"),
        ([("own_warmup", OwnWarmup()), ("lr_warmup", LRWarmup(warmup_steps=3))], "warmup_steps"),
    ],
)
def test_two_owners_of_one_plan_fact_are_refused_in_either_order(pair, fact):
    for order in (pair, pair[::-1]):
        with pytest.raises(ValueError, match=rf"plan fact TrainState\.{fact} has two owners") as info:
            drive(list(order), steps_per_epoch=4)
        names = [name for name, _ in pair]
        assert all(f"'{name}'" in str(info.value) for name in names)  # both named, whoever ran first


def test_one_owner_may_set_its_fact_again_and_every_fit_starts_afresh():
    warmup = LRWarmup(warmup_steps=1)
    engine = make_engine([warmup], steps_per_epoch=4)
    engine.fit(max_steps=2)
    engine.fit(max_steps=4)  # a second fit: the owner publishes again, no conflict
    assert engine.state.warmup_steps == 1


def test_tiny_gpt_two_decays_are_refused(tiny_cfg):
    with pytest.raises(ValueError, match=r"'linear_decay' .*'cosine_decay'|'cosine_decay' .*'linear_decay'"):
        gpt_engine(tiny_cfg, [("cosine_decay", CosineDecay(min_lr=0.0)), ("linear_decay", LinearDecay())]).fit()


# ------------------------------------------------------------------ every evaluation gets its row


class EpochScore:
    """An evaluator that reports in after_epoch, outside any step's after_step."""

    @hookimpl
    def after_epoch(self, engine):
        engine.publish_evaluation({"epoch_score": float(engine.state.epoch)})


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_every_evaluators_results_get_a_metrics_row_in_every_order(tmp_path):
    for i, order in enumerate(permutations(range(3))):  # EpochScore reports outside the step: its place is moot
        chosen = [
            ("tracker", LossTracker(eval_freq=3, out_dir=tmp_path / str(i))),
            ("perplexity", Evaluator({2: 7.0, 3: 8.0, 4: 9.0}, name="perplexity")),
            ("early", EarlyStopping(monitor="perplexity", patience=5)),
            ("epoch_score", EpochScore()),
        ]
        run = drive([chosen[j] for j in order] + [chosen[3]], steps_per_epoch=6)
        tracker = run.engine.plugins["tracker"]
        rows = rows_of(tmp_path / str(i))
        assert rows == tracker.records
        assert [r["step"] for r in rows] == [0, 2, 3, 4, 5]  # tracker at 0, 3; perplexity 2, 3, 4; epoch end
        by_step = {r["step"]: r for r in rows}
        assert by_step[2]["perplexity"] == 7.0 and by_step[4]["perplexity_best"] == 7.0
        assert {"train_loss", "val_loss", "perplexity"} <= set(by_step[3])  # two evaluators, one row
        assert by_step[5]["epoch_score"] == 0.0
        assert len(tracker.train_losses) == len(tracker.tokens_seen) == 2  # LossTracker's own evaluations


def test_tiny_gpt_book_rows_are_unchanged_and_another_evaluators_rows_are_added(tiny_cfg, tmp_path):
    class Perplexity:
        """Of the step's training loss: it draws no random numbers (a loader's iterator would)."""

        @hookimpl
        def after_step(self, engine, loss):
            if engine.state.step in (1, 2):
                engine.publish_evaluation({"perplexity": math.exp(loss.item())})

    alone = gpt_engine(tiny_cfg, [LossTracker(eval_freq=2, out_dir=tmp_path / "alone")])
    alone.fit(max_steps=5)
    for order in ([0, 1], [1, 0]):
        out = tmp_path / f"with{order[0]}"
        both = gpt_engine(tiny_cfg, [[LossTracker(eval_freq=2, out_dir=out), Perplexity()][j] for j in order])
        both.fit(max_steps=5)
        rows = rows_of(out)
        assert [r["step"] for r in rows] == [0, 1, 2, 4]
        assert "perplexity" in rows[1] and "perplexity" in rows[2] and "train_loss" in rows[2]
        # LossTracker's own rows are the ones it writes alone (plus the other's numbers)
        own = [{k: v for k, v in r.items() if k != "perplexity"} for r in rows if "train_loss" in r]
        assert own == rows_of(tmp_path / "alone")


# ------------------------------------------------------------------ one epoch convention in messages


def test_messages_name_the_epoch_as_the_book_prints_it(capsys):
    from enginekit import NonFiniteLossError, describe_error

    class FailsInSecondEpoch:
        @hookimpl
        def after_step(self, engine, loss):
            if engine.state.epoch == 1:
                raise KeyError("boom")

    with pytest.raises(KeyError) as info:
        drive(FailsInSecondEpoch(), epochs=2, steps_per_epoch=3)
    assert "at step 3 (epoch 2)" in describe_error(info.value)  # state.epoch == 1: the second epoch
    with pytest.raises(NonFiniteLossError, match=r"at step 1 \(epoch 1, batch 2 of the epoch\)"):
        drive([], steps_per_epoch=3, losses=[1.0, math.nan, 1.0])
