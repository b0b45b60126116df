"""Writing one checkpoint: committed last, and failures in plain words."""

from __future__ import annotations

import errno

import torch

from enginekit.checkpointing.format import MANIFEST
from enginekit.checkpointing.saving import serialize, write_error

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
    import io

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
