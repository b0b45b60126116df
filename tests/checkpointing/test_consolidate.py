"""A checkpoint to one book-compatible model.pt, from Python and from the command line."""

from __future__ import annotations

import shutil

import pytest
import torch

from enginekit import Engine
from enginekit.checkpointing import CheckpointError, consolidate
from enginekit.cli import main
from enginekit.gpt import GPTModel
from enginekit.plugins import Checkpoint

from conftest import TINY_CFG, gpt_loader


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = GPTModel(TINY_CFG)
    engine = Engine(
        model,
        torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1),
        gpt_loader(TINY_CFG, 6, 2),
        plugins=[Checkpoint(folder, every_steps=1, keep_last=2, async_write=False)],
        device="cpu",
    )
    engine.fit(epochs=1)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def test_the_model_pt_loads_into_the_books_model_as_the_book_does(gpt_run, tmp_path):
    folder, final = gpt_run
    out = tmp_path / "model.pt"
    consolidate(folder / "ckpt-00000003", out)
    model = GPTModel(TINY_CFG)
    model.load_state_dict(torch.load(out, weights_only=True))  # the book's own two lines
    assert all(torch.equal(model.state_dict()[k], final[k]) for k in final)


def test_a_run_folder_means_its_newest_good_checkpoint(gpt_run, tmp_path, capsys):
    folder, final = gpt_run
    copy = tmp_path / "run"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(".enginekit.lock"))
    (copy / "ckpt-00000003" / "state.pt").write_bytes(b"broken")
    assert main(["consolidate", str(copy), str(tmp_path / "model.pt")]) == 0
    out = capsys.readouterr().out
    assert "skipping ckpt-00000003: state.pt is 6 bytes" in out and "model.pt: " in out and " tensors, " in out
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(weights) == set(final) and not torch.equal(weights["out_head.weight"], final["out_head.weight"])


def test_a_corrupt_shard_or_no_checkpoint_is_an_error_in_one_line(gpt_run, tmp_path, capsys):
    folder, _ = gpt_run
    copy = tmp_path / "one"
    shutil.copytree(folder / "ckpt-00000003", copy / "ckpt-00000003")
    data = bytearray((copy / "ckpt-00000003" / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 1
    (copy / "ckpt-00000003" / "__0_0.distcp").write_bytes(bytes(data))
    assert main(["consolidate", str(copy / "ckpt-00000003"), str(tmp_path / "m.pt")]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("enginekit consolidate: error: ckpt-00000003: __0_0.distcp: sha256 mismatch")
        and err.count("\n") == 1
    )
    assert not (tmp_path / "m.pt").exists()
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        consolidate(tmp_path / "nowhere", tmp_path / "m.pt")
