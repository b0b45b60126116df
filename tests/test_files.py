"""Crash-safe writes and the run lock (enginekit/files.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from enginekit import files
from enginekit.files import LOCK_FILE, FolderBusyError, atomic_write, lock_folder, unlock_folder


def test_atomic_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "out.txt"
    target.write_bytes(b"old")
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_bytes(b"old")

    def half(f):
        f.write(b"ne")
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        atomic_write(target, half)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_the_temporary_file_sits_beside_the_target_until_the_rename(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(files, "before_replace", lambda tmp: seen.append((tmp.parent, tmp.name, tmp.read_bytes())))
    atomic_write(tmp_path / "x.bin", lambda f: f.write(b"data"))
    assert seen == [(tmp_path, f".x.bin.{os.getpid()}.tmp", b"data")]


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    lock_folder(tmp_path)
    try:
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        code = textwrap.dedent(
            f"""
            from enginekit.files import FolderBusyError, lock_folder
            try:
                lock_folder({str(tmp_path)!r})
            except FolderBusyError as exc:
                print(exc)
            """
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
        assert f"is in use by another run (pid {os.getpid()})" in out
    finally:
        unlock_folder(tmp_path)


def test_the_lock_is_reentrant_in_one_process_and_released_by_the_last_holder(tmp_path):
    import fcntl

    lock_folder(tmp_path)
    lock_folder(tmp_path)
    unlock_folder(tmp_path)
    probe = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # the lock is on the folder itself
    try:
        with pytest.raises(OSError):  # still held after one of two unlocks
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        unlock_folder(tmp_path)
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now
    finally:
        os.close(probe)
    assert issubclass(FolderBusyError, RuntimeError)
