"""The manifest: the commit marker, and every check a file passes before it is read."""

from __future__ import annotations

import json
import os

import pytest

from enginekit.checkpointing.format import (
    MANIFEST,
    STATE,
    CheckpointError,
    Manifest,
    read_manifest,
    unsafe_value,
    verify_files,
    write_manifest,
)

from ckpt_helpers import tiny_run


def make(folder, files: dict[str, bytes], step: int = 7):
    import hashlib

    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    entries = {name: (hashlib.sha256(data).hexdigest(), len(data)) for name, data in files.items()}
    write_manifest(folder, Manifest(step, 1, "ddp", entries))
    return folder


def test_a_manifest_round_trips_and_vouches_for_every_file(tmp_path):
    folder = make(tmp_path / "ckpt-00000007", {".metadata": b"m", STATE: b"s", "__0_0.distcp": b"tensors"})
    manifest = read_manifest(folder)
    assert (
        manifest.step == 7 and manifest.world_size == 1 and set(manifest.files) == {".metadata", STATE, "__0_0.distcp"}
    )
    verify_files(folder, manifest, hash=True)
    (folder / "__0_0.distcp").write_bytes(b"tensorz")  # same size, other bytes
    verify_files(folder, manifest)  # the cheap check reads nothing
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: sha256 mismatch .*truncated or corrupted"):
        verify_files(folder, manifest, hash=True)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: (f / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
        (lambda f: (f / "__0_0.distcp").write_bytes(b"short"), "is 5 bytes, the manifest says 7"),
        (lambda f: ((f / STATE).unlink(), os.symlink(f / ".metadata", f / STATE)), "is a symbolic link"),
    ],
)
def test_a_missing_short_or_linked_file_is_named(tmp_path, change, message):
    folder = make(tmp_path / "ckpt-00000007", {".metadata": b"m", STATE: b"s", "__0_0.distcp": b"tensors"})
    change(folder)
    with pytest.raises(CheckpointError, match=message):
        verify_files(folder, read_manifest(folder))


def edit_manifest(folder, edit):
    body = json.loads((folder / MANIFEST).read_text())
    edit(body)
    (folder / MANIFEST).write_text(json.dumps(body))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: b["files"].update({"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}), "not a checkpoint file"),
        (lambda b: b.update(version=1), "checkpoint format version 1, expected 2"),
        (lambda b: b.update(format="other"), "not a valid manifest"),
        (lambda b: b["files"].pop(STATE), "does not list state.pt"),
        (lambda b: b.update(step=9), "it holds step 9, not step 7 as its name says"),
        (lambda b: b.pop("files"), "not a valid manifest"),
    ],
)
def test_a_manifest_that_lies_or_escapes_is_refused(tmp_path, edit, message):
    folder = make(tmp_path / "ckpt-00000007", {".metadata": b"m", STATE: b"s"})
    edit_manifest(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        read_manifest(folder)


def test_no_manifest_is_an_unfinished_save_and_a_huge_one_is_not_read(tmp_path):
    folder = tmp_path / "ckpt-00000007"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="no manifest.json .its save did not finish"):
        read_manifest(folder)
    (folder / MANIFEST).write_bytes(b" " * (2 << 20))
    with pytest.raises(CheckpointError, match="over 1048576 bytes"):
        read_manifest(folder)
    (folder / MANIFEST).unlink()
    os.mkfifo(folder / MANIFEST)  # a FIFO must not block the reader
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_manifest(folder)


def test_a_real_checkpoint_lists_each_file_it_holds(tmp_path):
    ckpt, _ = tiny_run(tmp_path / "run")
    newest = ckpt.checkpoints()[0]
    manifest = read_manifest(newest)
    on_disk = {p.name for p in newest.iterdir()} - {MANIFEST}
    assert set(manifest.files) == on_disk and {".metadata", STATE, "__0_0.distcp"} <= on_disk
    assert ckpt.verify(newest) is None


def test_unsafe_values_are_found_where_they_are():
    from fractions import Fraction

    assert unsafe_value({"a": [1, 2.0, "x", None, (True,)]}, "p") is None
    assert unsafe_value({"a": [1, Fraction(1, 2)]}, "p") == "a fractions.Fraction at p['a'][1]"
