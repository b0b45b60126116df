"""A run's checkpoint folder: candidates, leftovers, pruning, setting failed ones aside."""

from __future__ import annotations

import os

import pytest

from enginekit.checkpointing import Folder
from enginekit.checkpointing.format import MANIFEST, CheckpointError

from ckpt_helpers import tiny_run


def test_candidates_skip_what_fails_the_cheap_checks_and_say_why(tmp_path):
    ckpt, _ = tiny_run(tmp_path, steps=6, every=2)
    folder = Folder(tmp_path)
    assert [p.name for p in folder.checkpoints()] == ["ckpt-00000006", "ckpt-00000004", "ckpt-00000002"]
    (tmp_path / "ckpt-00000006" / "__0_0.distcp").unlink()
    os.symlink(tmp_path / "ckpt-00000002", tmp_path / "ckpt-00000008")  # a link is never a candidate
    (tmp_path / "ckpt-00000009").write_bytes(b"x")
    lines: list[str] = []
    found = folder.candidates(lines.append)
    assert [p.name for p, _ in found] == ["ckpt-00000004", "ckpt-00000002"]
    assert lines == [
        "Checkpoint: skipping ckpt-00000009: not a checkpoint folder (a file); trying the previous one",
        "Checkpoint: skipping ckpt-00000008: not a folder (a symbolic link: only real folders are candidates); "
        "trying the previous one",
        "Checkpoint: skipping ckpt-00000006: __0_0.distcp is missing; trying the previous one",
    ]
    assert folder.newest_line() == "the newest checkpoint on disk is ckpt-00000004"


def test_some_checkpoints_and_none_good_is_an_error_not_a_fresh_start(tmp_path):
    tiny_run(tmp_path, steps=2, every=2)
    (tmp_path / "ckpt-00000002" / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no valid checkpoint in .* \(1 found, none verifies\): ckpt-00000002: "):
        Folder(tmp_path).candidates(lambda line: None)
    assert Folder(tmp_path / "empty").candidates(lambda line: None) == []


def test_leftovers_go_and_committed_checkpoints_stay(tmp_path):
    tiny_run(tmp_path, steps=4, every=2)
    unfinished = tmp_path / "ckpt-00000006"
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"half")
    (tmp_path / ".ckpt-00000008.123.tmp").write_bytes(b"")
    folder = Folder(tmp_path)
    assert folder.clear_leftovers() == ["ckpt-00000006"]
    assert [p.name for p in folder.checkpoints()] == ["ckpt-00000004", "ckpt-00000002"]
    assert not list(tmp_path.glob(".ckpt-*.tmp"))


def test_pruning_keeps_the_newest_up_to_the_one_just_written(tmp_path):
    tiny_run(tmp_path, steps=8, every=2, keep_last=10)
    folder = Folder(tmp_path)
    folder.prune(tmp_path / "ckpt-00000006", keep_last=2)  # a resumed run rewrote 6: 8 is not its own
    assert [p.name for p in folder.checkpoints()] == ["ckpt-00000008", "ckpt-00000006", "ckpt-00000004"]


def test_failed_newer_checkpoints_are_set_aside_not_deleted(tmp_path):
    tiny_run(tmp_path, steps=6, every=2)
    Folder(tmp_path).set_aside(newer_than="ckpt-00000002")
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt"))
    assert names == ["ckpt-00000002", "ckpt-00000004.corrupt", "ckpt-00000006.corrupt"]
    assert (tmp_path / "ckpt-00000006.corrupt" / MANIFEST).is_file()


def test_starting_a_run_refuses_or_removes_another_runs_checkpoints(tmp_path):
    tiny_run(tmp_path, steps=4, every=2)
    (tmp_path / "ckpt-00000006").mkdir()  # a save a crash cut short
    folder = Folder(tmp_path)
    problem = folder.start_run(foreign=True, overwrite=False)
    assert problem is not None and problem.startswith(f"{tmp_path} already holds 2 checkpoint(s) of another run")
    assert "(newest ckpt-00000004)" in problem and "--overwrite" in problem
    assert not (tmp_path / "ckpt-00000006").exists()  # the leftover went all the same
    assert folder.start_run(foreign=False, overwrite=False) is None and len(folder.checkpoints()) == 2
    assert folder.start_run(foreign=True, overwrite=True) is None and folder.checkpoints() == []
    fresh = Folder(tmp_path / "a" / "b")
    assert fresh.start_run(foreign=True, overwrite=False) is None and (tmp_path / "a" / "b").is_dir()
