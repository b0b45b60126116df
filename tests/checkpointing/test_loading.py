"""Opening a checkpoint to resume from: every file verified as it is read, state.pt loaded safely."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch

from enginekit.checkpointing import CheckpointError, Folder
from enginekit.checkpointing.format import MANIFEST, STATE
from enginekit.checkpointing.loading import open_checkpoint

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
