from __future__ import annotations

import traceback

import pytest
import torch

from enginekit.plugins import LossTracker, ProgressBar
from enginekit.testing import drive


def test_bar_counts_every_optimizer_step(capsys):
    bar = ProgressBar(refresh_every=4)
    seen = []
    original = bar.after_step

    def spy(engine, loss):
        original(engine, loss)
        seen.append(bar.bar.n)

    bar.after_step = spy  # still found by name, as an undecorated hook
    drive(bar, epochs=2, steps_per_epoch=5, grad_accum_steps=2)
    assert seen == list(range(1, 11))
    err = capsys.readouterr().err
    assert "10/10" in err and "loss=" in err and "tok/s=" in err
    assert bar.bar is None  # closed at the end


def test_reads_the_loss_only_when_it_refreshes(monkeypatch):
    reads = []
    real_float = torch.Tensor.__float__
    real_item = torch.Tensor.item

    def by_the_bar() -> bool:  # the engine's own one read per step (the finite check) is not the bar's
        return any(frame.filename.endswith("plugins/progress_bar.py") for frame in traceback.extract_stack())

    def item(self):
        if by_the_bar():
            reads.append(1)
        return real_item(self)

    def as_float(self):
        if by_the_bar():
            reads.append(1)
        return real_float(self)

    monkeypatch.setattr(torch.Tensor, "__float__", as_float)
    monkeypatch.setattr(torch.Tensor, "item", item)
    drive(ProgressBar(refresh_every=5), steps_per_epoch=20)
    assert len(reads) == 4  # steps 5, 10, 15, 20 only: no read of the loss in the other steps


def test_printed_lines_stay_whole_above_the_bar(capsys):
    drive([LossTracker(eval_freq=2), ProgressBar(refresh_every=1)], steps_per_epoch=6)
    out = capsys.readouterr().out.splitlines()
    assert [line[:18] for line in out] == ["Ep 1 (Iter 000000)", "Ep 1 (Iter 000002)", "Ep 1 (Iter 000004)"]


def test_invalid_setting():
    with pytest.raises(ValueError, match="ProgressBar: refresh_every"):
        ProgressBar(refresh_every=0)


def test_tqdm_keywords_pass_through_including_disable():
    bar = ProgressBar(disable=True, desc="pretrain")
    drive(bar, steps_per_epoch=3)
    assert bar.bar is None  # ran and closed without a duplicate-keyword error
