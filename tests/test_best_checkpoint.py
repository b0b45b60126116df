"""BestCheckpoint: the weights of the best evaluation, consistent with the step they claim."""

from __future__ import annotations

import pytest
import torch

from enginekit import files, hookimpl
from enginekit.plugins import BestCheckpoint, Checkpoint
from enginekit.testing import drive, make_engine


class WeightsAfterEachStep:
    """Copies of the weights in after_step, where LossTracker and evaluators measure them."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    @hookimpl
    def after_step(self, engine, loss):
        self.by_step[engine.state.step] = {k: v.clone() for k, v in engine.model.state_dict().items()}


VALUES = {0: 3.0, 1: 2.0, 2: 2.5, 3: 1.5, 4: 1.6}


@pytest.mark.parametrize("mode, best_step", [("min", 3), ("max", 0)])
def test_the_file_holds_the_weights_of_the_step_it_claims(tmp_path, mode, best_step):
    path = tmp_path / "best" / "best.pt"
    spy, best = WeightsAfterEachStep(), BestCheckpoint(path, mode=mode)
    evaluations = {s: {"val_loss": v} for s, v in VALUES.items()}
    for plugins in ([spy, best], [best, spy]):  # either order: the file is written inside the evaluated step
        drive(plugins, steps_per_epoch=6, evaluations=evaluations)
        saved = BestCheckpoint.load(path)
        assert saved["step"] == best_step == best.best_step and saved["value"] == VALUES[best_step]
        assert saved["monitor"] == "val_loss" and saved["mode"] == mode
        for name, tensor in saved["model"].items():
            assert torch.equal(tensor, spy.by_step[best_step][name])
        best.best = best.best_step = None
    assert not list(path.parent.glob(".*.tmp"))  # no leftover temporary file


def test_min_delta_and_other_evaluators(tmp_path):
    best = BestCheckpoint(tmp_path / "b.pt", monitor="accuracy", mode="max", min_delta=0.1)
    evaluations = {0: {"accuracy": 0.5}, 1: {"val_loss": 0.1}, 2: {"accuracy": 0.55}, 3: {"accuracy": 0.7}}
    drive(best, steps_per_epoch=4, evaluations=evaluations)
    assert best.best_step == 3 and best.saves == 2  # 0.55 is not better by more than 0.1


def test_a_failed_write_keeps_the_previous_best(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    best = BestCheckpoint(path)
    drive(best, steps_per_epoch=2, evaluations={0: {"val_loss": 2.0}})
    before = path.read_bytes()

    def crash(tmp):
        raise OSError("disk full")

    monkeypatch.setattr(files, "before_replace", crash)
    with pytest.raises(OSError, match="disk full"):
        drive(BestCheckpoint(path), steps_per_epoch=2, evaluations={0: {"val_loss": 1.0}})
    assert path.read_bytes() == before and BestCheckpoint.load(path)["value"] == 2.0


def test_best_so_far_travels_with_checkpoints(tmp_path):
    evaluations = {0: {"val_loss": 2.0}, 1: {"val_loss": 1.0}, 3: {"val_loss": 1.5}}
    first = BestCheckpoint(tmp_path / "best.pt")
    drive([first, Checkpoint(tmp_path / "ck", async_write=False)], steps_per_epoch=4, evaluations=evaluations)
    second = BestCheckpoint(tmp_path / "best.pt")
    engine = make_engine([second, Checkpoint(tmp_path / "ck", resume=True)], steps_per_epoch=4)
    engine.fit()  # already complete: restores and ends
    assert (second.best, second.best_step) == (1.0, 1)


def test_settings_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="BestCheckpoint: mode must be one of"):
        BestCheckpoint(tmp_path / "b.pt", mode="lowest")
    with pytest.raises(ValueError, match="BestCheckpoint: min_delta must be a finite number >= 0"):
        BestCheckpoint(tmp_path / "b.pt", min_delta=-1)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a best-weights file"):
        BestCheckpoint.load(tmp_path / "other.pt")
