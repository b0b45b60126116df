"""Writing one checkpoint: committed last, and failures in plain words."""

from __future__ import annotations

import errno
import io

import pytest
import torch

from enginekit import hookimpl
from enginekit.checkpointing import CheckpointWriteError, Folder
from enginekit.checkpointing.format import MANIFEST
from enginekit.checkpointing.saving import prepare, serialize, settle, stateful_plugins, write_error

from ckpt_helpers import tiny_run


def test_the_manifest_is_written_after_every_file_it_lists(tmp_path):
    ckpt, _ = tiny_run(tmp_path)
    newest = ckpt.checkpoints()[0]
    manifest_time = (newest / MANIFEST).stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= manifest_time for p in newest.iterdir())


def test_the_small_state_is_fixed_when_it_is_serialized():
    state = {"t": torch.zeros(3), "n": [1]}
    data = serialize(state)
    state["t"].add_(1)
    state["n"].append(2)
    assert torch.load(io.BytesIO(data), weights_only=True)["n"] == [1]


def test_failures_are_plain_words_naming_the_newest_checkpoint(tmp_path):
    path = tmp_path / "ckpt-00000004"
    full = write_error(
        path,
        OSError(errno.ENOSPC, "No space left on device"),
        10 << 20,
        "the newest checkpoint on disk is ckpt-00000002",
    )
    assert str(full).startswith("could not write ckpt-00000004: no space left on device (needs ~10.0 MB, ")
    assert str(full).endswith("; the newest checkpoint on disk is ckpt-00000002")
    denied = write_error(path, PermissionError(errno.EACCES, "Permission denied"), 0, "no checkpoint is on disk yet")
    assert (
        str(denied)
        == "could not write ckpt-00000004: Permission denied (PermissionError); no checkpoint is on disk yet"
    )


class Ranks:
    """A stand-in for the engine's agreement between ranks: another rank's answer is ``others``."""

    def __init__(self, engine, others: bool) -> None:
        self.state, self.others, self.printed = engine.state, others, []

    def all_true(self, ok: bool) -> bool:
        return ok and self.others


class Counter:
    def __init__(self) -> None:
        self.n = 3

    @hookimpl
    def after_step(self, engine) -> None:
        self.n += 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_prepare_fixes_the_state_of_the_save_point(tmp_path):
    ckpt, engine = tiny_run(tmp_path / "run")
    counter = engine.register(Counter(), name="counter")
    path, manifest, tensors, small = prepare(engine, Folder(tmp_path / "new"), skip=ckpt)
    counter.n = 99  # after the save point: not in this save
    assert path == tmp_path / "new" / "ckpt-00000004" and manifest.step == 4 and manifest.files == {}
    first, weight = next(iter(engine.model.state_dict().items()))
    assert set(tensors) == {"model", "optimizer"} and torch.equal(tensors["model"][first], weight)
    saved = torch.load(io.BytesIO(small), weights_only=True)
    assert saved["engine"]["step"] == 4 and saved["plugins"] == {"counter": {"n": 3}}
    assert saved["param_groups"][0]["lr"] == engine.optimizer.param_groups[0]["lr"]


def test_prepare_refuses_weights_holding_nan_and_writes_nothing(tmp_path):
    _, engine = tiny_run(tmp_path / "run")
    name, param = next(iter(engine.model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(CheckpointWriteError, match=f"refusing to write ckpt-00000004: .* \\(first: {name}\\)"):
        prepare(engine, Folder(tmp_path / "new"), skip=None)
    assert not (tmp_path / "new").exists()


def test_prepare_names_the_plugin_whose_state_dict_fails(tmp_path):
    _, engine = tiny_run(tmp_path / "run")

    class Broken(Counter):
        def state_dict(self):
            raise RuntimeError("no state today")

    engine.register(Broken(), name="broken")
    with pytest.raises(RuntimeError, match="no state today") as info:
        prepare(engine, Folder(tmp_path / "new"), skip=None)
    assert "broken" in "".join(getattr(info.value, "__notes__", [])) + str(info.value)


def test_stateful_plugins_are_those_with_both_methods_except_the_one_skipped(tmp_path):
    ckpt, engine = tiny_run(tmp_path)

    class SaveOnly(Counter):
        load_state_dict = None

    engine.register(SaveOnly(), name="save_only")
    stateful = stateful_plugins(engine, skip=ckpt)
    assert ckpt not in stateful.values() and "save_only" not in stateful
    assert all(callable(p.load_state_dict) for p in stateful.values())


def test_settle_raises_on_every_rank_when_any_rank_failed(tmp_path):
    ckpt, engine = tiny_run(tmp_path)
    (tmp_path / "ckpt-00000009").mkdir()  # a save cut short on this rank's side
    settle(Ranks(engine, others=True), ckpt.folder, None)  # every rank wrote its part
    assert (tmp_path / "ckpt-00000009").exists()
    mine = CheckpointWriteError("could not write ckpt-00000009: disk full")
    with pytest.raises(CheckpointWriteError, match="disk full"):
        settle(Ranks(engine, others=True), ckpt.folder, mine)
    with pytest.raises(CheckpointWriteError, match="^another rank failed to write a checkpoint; .*ckpt-00000004"):
        settle(Ranks(engine, others=False), ckpt.folder, None)
    assert not (tmp_path / "ckpt-00000009").exists()  # rank 0 cleared the half-written folder
