"""Opening a checkpoint to resume from: every file verified as it is read, state.pt loaded safely."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch

from enginekit import hookimpl
from enginekit.checkpointing import CheckpointError, Folder
from enginekit.checkpointing.format import MANIFEST, STATE
from enginekit.checkpointing.loading import open_checkpoint, resume_newest
from enginekit.plugins import LossTracker
from enginekit.testing import make_engine

from checkpoint_helpers import flip_a_byte
from ckpt_helpers import tiny_run


def rewrite(folder, name: str, data: bytes) -> None:
    """Replace a file and forge the manifest to match: only the safe loader stands in the way."""
    (folder / name).write_bytes(data)
    body = json.loads((folder / MANIFEST).read_text())
    body["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / MANIFEST).write_text(json.dumps(body))


class Boom:
    def __reduce__(self):
        return (print, ("ran arbitrary code",))


def test_opening_reads_the_state_and_the_metadata(tmp_path):
    ckpt, engine = tiny_run(tmp_path)
    opened = open_checkpoint(Folder(tmp_path), ckpt.checkpoints()[0])
    assert opened.engine["step"] == 4 and opened.manifest.step == 4
    assert set(opened.state) >= {"engine", "plugins", "settings", "param_groups"}


def test_a_pickle_in_state_pt_is_refused_even_with_a_forged_manifest(tmp_path, capsys):
    ckpt, _ = tiny_run(tmp_path)
    newest = ckpt.checkpoints()[0]
    rewrite(newest, STATE, pickle.dumps(Boom(), protocol=2))
    with pytest.raises(CheckpointError, match=r"state.pt refused by the safe loader"):
        open_checkpoint(Folder(tmp_path), newest)
    assert "ran arbitrary code" not in capsys.readouterr().out


def test_a_state_pt_of_another_step_is_refused(tmp_path):
    ckpt, _ = tiny_run(tmp_path)
    older, newest = ckpt.checkpoints()[1], ckpt.checkpoints()[0]
    rewrite(newest, STATE, (older / STATE).read_bytes())
    with pytest.raises(CheckpointError, match="holds another step than its manifest"):
        open_checkpoint(Folder(tmp_path), newest)
    buf = __import__("io").BytesIO()
    torch.save({"format": "enginekit-checkpoint", "version": 1}, buf)
    rewrite(newest, STATE, buf.getvalue())
    with pytest.raises(CheckpointError, match="not an enginekit checkpoint state of version 2"):
        open_checkpoint(Folder(tmp_path), newest)


class Probe:
    """Calls ``resume_newest`` where Checkpoint does, in ``before_fit``, and keeps what it gave."""

    def __init__(self, folder, allow_changes: bool = False) -> None:
        self.folder, self.allow_changes = Folder(folder), allow_changes
        self.found = self.error = self.weights = None

    @hookimpl
    def before_fit(self, engine) -> None:
        try:
            self.found = resume_newest(engine, self.folder, self, True, self.allow_changes, None)
        except CheckpointError as exc:
            self.error = str(exc)
        self.weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
        self.step = engine.state.step


def resumed(folder, plugins=(), lr=1e-3, steps=4, **kwargs) -> Probe:
    torch.manual_seed(1)  # other initial weights than the saved ones
    probe = Probe(folder, **kwargs)
    make_engine([*plugins, probe], steps_per_epoch=steps, lr=lr).fit(epochs=1)
    return probe


def test_resume_newest_loads_the_saved_weights(tmp_path):
    _, trained = tiny_run(tmp_path)
    probe = resumed(tmp_path)
    opened, changes = probe.found
    assert opened.path.name == "ckpt-00000004" and changes == []
    for (name, saved), loaded in zip(trained.model.state_dict().items(), probe.weights.values()):
        assert torch.equal(saved, loaded), name
    assert probe.step == 0  # the engine's own state is the caller's to restore


def test_resume_newest_falls_back_past_a_shard_that_fails_its_hash_saying_each_skip_once(tmp_path, capsys):
    tiny_run(tmp_path, steps=6)
    flip_a_byte(tmp_path / "ckpt-00000006" / "__0_0.distcp")  # found only when its tensors are read
    (tmp_path / "ckpt-00000002" / "__0_0.distcp").write_bytes(b"cut")  # the cheap check finds it
    opened, _ = resumed(tmp_path, steps=6).found
    assert opened.path.name == "ckpt-00000004"
    out = capsys.readouterr().out
    assert out.count("Checkpoint: skipping ckpt-00000006: __0_0.distcp") == 1
    assert out.count("Checkpoint: skipping ckpt-00000002: __0_0.distcp is 3 bytes") == 1
    assert (tmp_path / "ckpt-00000006.corrupt").is_dir() and not (tmp_path / "ckpt-00000006").exists()


def test_resume_newest_is_none_for_an_empty_folder(tmp_path):
    probe = resumed(tmp_path)
    assert probe.found is None and probe.error is None


def test_resume_newest_refuses_other_plugins_and_settings_unless_allowed(tmp_path):
    tiny_run(tmp_path)
    probe = resumed(tmp_path, plugins=[LossTracker(eval_freq=2)])
    assert probe.error.startswith("ckpt-00000004: it has no state for registered plugin(s) ['")
    probe = resumed(tmp_path, lr=2e-3)
    assert "written by a run with other settings (2 difference(s)): " in probe.error and probe.found is None
    opened, changes = resumed(tmp_path, lr=2e-3, allow_changes=True).found
    assert opened.path.name == "ckpt-00000004" and len(changes) == 2 and all("0.002" in c for c in changes)
