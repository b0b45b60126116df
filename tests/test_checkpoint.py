"""Checkpoint: exact resume, crash safety, corruption, hostile files, plugin state, policies."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from enginekit import NonFiniteLossError, hookimpl
from enginekit.checkpointing import saving
from enginekit.checkpointing.dcp import _HashingStream
from enginekit.plugins import Checkpoint, CheckpointError, LossTracker, LRWarmup, warmup_lr
from enginekit.testing import HookRecorder, drive, make_engine

from checkpoint_helpers import FILES, flip_a_byte, read_checkpoint, rewrite_manifest
from conftest import DEVICES, ROOT

JOB = ROOT / "tests" / "resume_job.py"


def job(out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(JOB), str(out), *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def load_result(out: Path) -> dict:
    return torch.load(out / "result.pt", weights_only=True)


def assert_identical(a: dict, b: dict) -> None:
    assert a["steps"] == b["steps"] == 36
    assert a["lrs"] == b["lrs"]
    for key in ("train_losses", "val_losses", "tokens_seen"):
        assert a[key] == b[key], key
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pid, st in a["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    job(out)
    return load_result(out)


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A run SIGKILLed at the start of step 18: its newest checkpoint is after 16 steps, mid-epoch 1."""
    out = tmp_path_factory.mktemp("killed")
    proc = job(out, "--kill-at", "18", check=False)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt-*")) == [
        "ckpt-00000008",
        "ckpt-00000012",
        "ckpt-00000016",
    ]
    return out


def resumed_copy(killed: Path, tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    proc = job(out, "--resume", *flags)
    assert "resumed from ckpt-00000016 (step " in proc.stdout
    return load_result(out)


def test_killed_then_resumed_in_a_fresh_process_equals_uninterrupted(uninterrupted, killed, tmp_path):
    ckpt = Checkpoint(killed / "checkpoints")
    newest = ckpt.checkpoints()[0]
    assert ckpt.verify(newest) is None  # kill -9 during training left a checkpoint whose hashes match
    state = read_checkpoint(newest)["engine"]
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (16, 1, 4)  # mid-epoch
    resumed = resumed_copy(killed, tmp_path)
    assert_identical(resumed, uninterrupted)
    # the metrics file was rewritten from the restored tracker: no duplicated rows of lost steps
    lines = (tmp_path / "run" / "metrics" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(uninterrupted["train_losses"]) == 12


@pytest.mark.parametrize("flag", ["--broken-rng", "--broken-schedule"])
def test_negative_controls_resume_without_rng_or_schedule_state_differs(uninterrupted, killed, tmp_path, flag):
    broken = resumed_copy(killed, tmp_path, flag)
    with pytest.raises(AssertionError):
        assert_identical(broken, uninterrupted)


@pytest.mark.parametrize("mode", [[], ["--async-writes"]], ids=["synchronous", "background"])
def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(uninterrupted, tmp_path, mode):
    out = tmp_path / "run"
    cmd = [sys.executable, str(JOB), str(out), "--pause-write-at", "16", *mode]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "paused").exists():
            assert proc.poll() is None and time.time() < deadline, "job ended before pausing"
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    folder = out / "checkpoints"
    unfinished = folder / "ckpt-00000016"  # killed before its commit: every file but the manifest
    assert not (unfinished / "manifest.json").exists()
    assert (unfinished / "__0_0.distcp").stat().st_size > 0 and list(unfinished.glob(".manifest.json.*.tmp"))
    ckpt = Checkpoint(folder)
    assert ckpt.verify(unfinished) == "ckpt-00000016: no manifest.json (its save did not finish)"
    assert ckpt.verify(folder / "ckpt-00000012") is None
    proc2 = job(out, "--resume")
    assert "resumed from ckpt-00000012" in proc2.stdout and "skipping" not in proc2.stdout
    assert not list(folder.rglob("*.tmp"))  # cleaned up
    assert_identical(load_result(out), uninterrupted)


# ---------------------------------------------------------------- corruption and hostile files


@pytest.fixture
def two_checkpoints(tmp_path) -> Path:
    folder = tmp_path / "ck"
    drive([LossTracker(eval_freq=2), Checkpoint(folder, every_steps=3)], steps_per_epoch=6)
    assert [p.name for p in Checkpoint(folder).checkpoints()] == ["ckpt-00000006", "ckpt-00000003"]
    return folder


def resume_engine(folder: Path):
    engine = make_engine([LossTracker(eval_freq=2), Checkpoint(folder, every_steps=3, resume=True)], steps_per_epoch=6)
    engine.fit(max_steps=7, epochs=2)
    return engine


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(two_checkpoints, capsys):
    newest = two_checkpoints / "ckpt-00000006" / "__0_0.distcp"
    size = newest.stat().st_size
    newest.write_bytes(newest.read_bytes()[:1000])
    engine = resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert (
        f"skipping ckpt-00000006: __0_0.distcp is 1000 bytes, the manifest says {size}: truncated or corrupted" in out
    )
    assert "resumed from ckpt-00000003 (step 3" in out
    assert engine.state.step == 7


@pytest.mark.parametrize("name", ["__0_0.distcp", "state.pt", ".metadata"])
def test_bit_flipped_checkpoint_is_detected(two_checkpoints, capsys, name):
    flip_a_byte(two_checkpoints / "ckpt-00000006" / name)
    resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "skipping" in line]
    assert len(skipped) == 1 and f"skipping ckpt-00000006: {name}: sha256 mismatch (recorded " in skipped[0]
    assert "truncated or corrupted" in skipped[0]
    assert "resumed from ckpt-00000003" in out


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", ["state.pt", ".metadata"])
@pytest.mark.parametrize("rehash", [False, True], ids=["hash-mismatch", "attacker-rewrote-the-hash"])
def test_malicious_pickle_is_refused_and_never_runs(two_checkpoints, tmp_path, capsys, rehash, name):
    marker = tmp_path / "pwned"
    newest = two_checkpoints / "ckpt-00000006"
    exploit = pickle.dumps({"model": Exploit(marker)})
    if rehash:  # the manifest vouches for it: the safe loader alone stands in the way
        rewrite_manifest(newest, **{name: exploit})
    else:
        size = (newest / name).stat().st_size
        (newest / name).write_bytes(exploit.ljust(size, b" "))  # the size recorded, other bytes
    resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert not marker.exists()
    safe = "refused by the safe loader" if name == "state.pt" else "refused by the safe reader"
    reason = f"{name} {safe}" if rehash else f"{name}: sha256 mismatch"
    assert f"skipping ckpt-00000006: {reason}" in out
    assert "resumed from ckpt-00000003" in out


def test_loading_uses_weights_only(two_checkpoints, monkeypatch):
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    assert resume_engine(two_checkpoints).plugins["checkpoint"].resumed_from.name == "ckpt-00000006"
    assert calls and all(k.get("weights_only") is True for k in calls)


def test_no_valid_checkpoint_at_all_is_an_error_not_a_fresh_start(two_checkpoints):
    for p in two_checkpoints.glob("ckpt-*/__0_0.distcp"):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no valid checkpoint.*2 found, none verifies"):
        resume_engine(two_checkpoints)


def test_empty_folder_starts_fresh(tmp_path, capsys):
    engine = resume_engine(tmp_path / "nothing")
    assert "no checkpoint in" in capsys.readouterr().out and engine.state.step == 7


def test_a_checkpoint_without_its_manifest_is_unfinished_removed_and_the_previous_one_resumed(two_checkpoints, capsys):
    (two_checkpoints / "ckpt-00000006" / "manifest.json").unlink()
    assert Checkpoint(two_checkpoints).verify(two_checkpoints / "ckpt-00000006") == (
        "ckpt-00000006: no manifest.json (its save did not finish)"
    )
    engine = resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert "resumed from ckpt-00000003 (step 3" in out and engine.state.step == 7
    assert "skipping" not in out  # a save that did not finish is not a checkpoint: removed, not reported


def test_leftover_temporary_files_and_unfinished_saves_are_ignored_and_removed(two_checkpoints, capsys):
    leftover = two_checkpoints / ".ckpt-00000009.4242.tmp"
    leftover.write_bytes(b"half a file")
    unfinished = two_checkpoints / "ckpt-00000009"  # a save cut short: no manifest
    shutil.copytree(two_checkpoints / "ckpt-00000006", unfinished)
    (unfinished / "manifest.json").unlink()
    (unfinished / ".manifest.json.4242.tmp").write_bytes(b"{")
    engine = resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert not leftover.exists() and not unfinished.exists() and engine.state.step == 7
    assert "resumed from ckpt-00000006" in out and "skipping" not in out


def test_keep_last_prunes_only_older_checkpoints(tmp_path):
    folder = tmp_path / "ck"
    drive(Checkpoint(folder, every_steps=1, keep_last=2), steps_per_epoch=5)
    assert sorted(p.name for p in folder.iterdir()) == [
        ".enginekit.lock",  # the run lock: released when fit ends, the file stays
        "ckpt-00000004",
        "ckpt-00000005",
    ]
    assert all(Checkpoint(folder).verify(p) is None for p in Checkpoint(folder).checkpoints())
    newest = folder / "ckpt-00000005"
    assert {p.name for p in newest.iterdir()} == FILES
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["step"] == 5 and set(manifest["files"]) == FILES - {"manifest.json"}
    for name, entry in manifest["files"].items():  # what sha256sum says of each file
        data = (newest / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


# ---------------------------------------------------------------- plugin state


def test_plugin_state_round_trips(tmp_path):
    folder = tmp_path / "ck"
    first = LossTracker(eval_freq=2)
    drive([first, LRWarmup(warmup_steps=3), Checkpoint(folder, every_steps=4)], steps_per_epoch=4)
    second = LossTracker(eval_freq=2)
    engine = make_engine([second, LRWarmup(warmup_steps=3), Checkpoint(folder, resume=True)], steps_per_epoch=4)
    engine.fit(epochs=1)  # already complete: restores and ends
    assert second.records == first.records and second.lrs == first.lrs


def test_state_for_an_unregistered_plugin_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "ck"
    drive([LossTracker(), ("extra_tracker", LossTracker()), Checkpoint(folder)], steps_per_epoch=2)
    unknown = r"holds state for plugin\(s\) \['extra_tracker'\] that are not registered.*strict_plugins=False"
    with pytest.raises(CheckpointError, match=unknown):
        make_engine([LossTracker(), Checkpoint(folder, resume=True)], steps_per_epoch=2).fit(epochs=2)


def test_missing_state_for_a_registered_plugin_is_an_error_unless_accepted(tmp_path, capsys):
    folder = tmp_path / "ck"
    drive([Checkpoint(folder)], steps_per_epoch=2)
    with pytest.raises(CheckpointError, match=r"no state for registered plugin\(s\) \['loss_tracker'\]"):
        make_engine([LossTracker(), Checkpoint(folder, resume=True)], steps_per_epoch=2).fit(epochs=2)
    engine = make_engine([LossTracker(), Checkpoint(folder, resume=True, strict_plugins=False)], steps_per_epoch=2)
    engine.fit(epochs=2)
    assert engine.state.step == 4 and "resuming anyway" in capsys.readouterr().out


# ---------------------------------------------------------------- non-finite loss and signals


def test_nan_under_the_error_policy_writes_no_checkpoint_of_the_poisoned_state(tmp_path):
    folder = tmp_path / "ck"
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        drive(Checkpoint(folder, every_steps=1), steps_per_epoch=8, losses=lambda s: float("nan") if s == 5 else 1.0)
    names = [p.name for p in Checkpoint(folder).checkpoints()]
    assert names[0] == "ckpt-00000005"  # after steps 0-4; nothing for step 5 or later
    payload = read_checkpoint(folder / names[0])
    assert payload["model"] and all(torch.isfinite(v).all() for v in payload["model"].values())


def nan_once_at(step: int):
    pending = [True]

    def loss(s: int) -> float:
        if s == step and pending[0]:
            pending[0] = False
            return float("nan")
        return 1.0

    return loss


def test_nan_under_the_skip_policy_leaves_state_and_schedule_unchanged(tmp_path):
    weights = []

    class Watch:
        @hookimpl
        def before_step(self, engine, batch):
            weights.append((engine.state.step, engine.model.weights[0].item()))

    folder = tmp_path / "ck"
    run = drive(
        [Watch(), LRWarmup(warmup_steps=4, initial_lr=0.0), Checkpoint(folder, every_steps=1)],
        steps_per_epoch=8,
        lr=0.1,
        nonfinite="skip",
        losses=nan_once_at(3),
    )
    assert [s.step for s in run.steps] == list(range(7))  # 8 batches, one skipped: step 3 retried
    assert run.lrs[:5] == [warmup_lr(s, 4, 0.0, 0.1) for s in range(4)] + [0.1]  # schedule did not advance on the skip
    attempts_of_3 = [w for s, w in weights if s == 3]
    assert len(attempts_of_3) == 2 and attempts_of_3[0] == attempts_of_3[1]  # weights unchanged by the skip
    assert [p.name for p in Checkpoint(folder).checkpoints()][0] == "ckpt-00000007"


def test_a_second_save_of_the_same_step_replaces_the_checkpoint_never_rewrites_it_in_place(
    tmp_path, monkeypatch, recwarn
):
    folder = tmp_path / "ck"
    removed = []
    real_remove = saving.remove
    monkeypatch.setattr(saving, "remove", lambda path: removed.append(path.name) or real_remove(path))
    # the skipped batch moves the epoch's end: step 7 is saved as a step, then as the epoch's end
    drive(Checkpoint(folder, every_steps=1, keep_last=10), steps_per_epoch=8, nonfinite="skip", losses=nan_once_at(3))
    assert removed == ["ckpt-00000007"]
    assert not [w for w in recwarn if "existing checkpoint" in str(w.message)]  # DCP never wrote over it
    assert Checkpoint(folder).verify(folder / "ckpt-00000007") is None


@pytest.mark.filterwarnings("ignore:Checkpoint. every_epoch=False:UserWarning")  # saving on the signal only
def test_sigterm_saves_the_last_finished_step(tmp_path):
    folder = tmp_path / "ck"

    class Term:
        @hookimpl
        def after_backward(self, engine):
            if engine.state.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    from enginekit import TrainingInterrupted

    with pytest.raises(TrainingInterrupted) as info:
        drive([Term(), Checkpoint(folder, every_epoch=False)], steps_per_epoch=6)
    assert info.value.exit_code == 143
    assert [p.name for p in Checkpoint(folder).checkpoints()] == ["ckpt-00000003"]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"keep_last": 0}, "keep_last must be an int >= 1"), ({"every_steps": 0}, "every_steps must be an int >= 1")],
)
def test_invalid_settings(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=f"Checkpoint: {match}"):
        Checkpoint(tmp_path, **kwargs)


def test_plugin_state_that_could_not_be_loaded_safely_is_refused_at_save(tmp_path):
    from collections import OrderedDict
    from fractions import Fraction

    class Sloppy:
        @hookimpl
        def after_step(self, engine, loss):
            pass

        def state_dict(self):
            return OrderedDict(ratio=[1, {"x": Fraction(1, 3)}])

        def load_state_dict(self, state):
            pass

    with pytest.raises(
        CheckpointError,
        match=r"plugin 'sloppy': state_dict\(\) holds a fractions.Fraction at sloppy\[.ratio.\]\[1\]\[.x.\]",
    ):
        drive([Sloppy(), Checkpoint(tmp_path, every_steps=1)], steps_per_epoch=2)
    assert not list(tmp_path.glob("ckpt-*"))


def test_a_fresh_run_refuses_a_folder_holding_another_runs_checkpoints(two_checkpoints):
    with pytest.raises(CheckpointError, match="already holds 2 checkpoint\\(s\\) of another run.*overwrite=True"):
        drive(Checkpoint(two_checkpoints), steps_per_epoch=2)
    drive(Checkpoint(two_checkpoints, overwrite=True), steps_per_epoch=2)
    assert [p.name for p in Checkpoint(two_checkpoints).checkpoints()] == ["ckpt-00000002"]


def test_after_falling_back_newer_bad_files_are_set_aside_and_never_kept_over_good_ones(two_checkpoints):
    (two_checkpoints / "ckpt-00000006" / "__0_0.distcp").write_bytes(b"torn")
    engine = make_engine(
        [LossTracker(eval_freq=2), Checkpoint(two_checkpoints, every_steps=1, keep_last=1, resume=True)],
        steps_per_epoch=6,
    )
    engine.fit(max_steps=5)
    assert [p.name for p in Checkpoint(two_checkpoints).checkpoints()] == ["ckpt-00000005"]
    assert (two_checkpoints / "ckpt-00000006.corrupt" / "__0_0.distcp").read_bytes() == b"torn"  # kept for a look


def test_a_checkpoint_whose_shard_fails_when_loaded_is_set_aside_as_corrupt(two_checkpoints, capsys):
    flip_a_byte(two_checkpoints / "ckpt-00000006" / "__0_0.distcp")  # the size is right: found when read
    engine = make_engine(
        [LossTracker(eval_freq=2), Checkpoint(two_checkpoints, every_steps=1, keep_last=2, resume=True)],
        steps_per_epoch=6,
    )
    engine.fit(max_steps=4)
    assert "resumed from ckpt-00000003" in capsys.readouterr().out
    assert [p.name for p in Checkpoint(two_checkpoints).checkpoints()] == ["ckpt-00000004", "ckpt-00000003"]
    assert (two_checkpoints / "ckpt-00000006.corrupt").is_dir()


def test_resuming_with_another_run_length_is_an_error_naming_both(tmp_path):
    from enginekit.plugins import CosineDecay

    drive([CosineDecay(min_lr=0.0), Checkpoint(tmp_path, every_steps=2)], steps_per_epoch=4, max_steps=4)
    engine = make_engine([CosineDecay(min_lr=0.0), Checkpoint(tmp_path, resume=True)], steps_per_epoch=4)
    with pytest.raises(
        CheckpointError, match="other settings \\(1 difference\\(s\\)\\): plan.total_steps: 4 in the checkpoint, 8 now"
    ):
        engine.fit(epochs=2)


def test_unreadable_checkpoint_is_reported_and_the_previous_one_used(two_checkpoints, capsys):
    shard = two_checkpoints / "ckpt-00000006" / "__0_0.distcp"
    shard.unlink()
    shard.mkdir()  # something that exists but cannot be read as a file
    resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert "skipping ckpt-00000006: __0_0.distcp is not a regular file" in out
    assert "resumed from ckpt-00000003" in out


def test_a_file_named_like_a_checkpoint_is_skipped_not_read(two_checkpoints, capsys):
    (two_checkpoints / "ckpt-00000099").write_bytes(b"x" * 100)
    resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert "skipping ckpt-00000099: not a checkpoint folder (a file)" in out
    assert "resumed from ckpt-00000006" in out


def test_a_manifest_that_lists_a_path_out_of_the_folder_is_refused(two_checkpoints, tmp_path, capsys):
    outside = tmp_path / "x"
    outside.write_bytes(b"secret")
    manifest = json.loads((two_checkpoints / "ckpt-00000006" / "manifest.json").read_text())
    manifest["files"]["../../x"] = {"sha256": hashlib.sha256(b"secret").hexdigest(), "bytes": 6}
    (two_checkpoints / "ckpt-00000006" / "manifest.json").write_text(json.dumps(manifest))
    resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert "skipping ckpt-00000006: manifest.json lists '../../x', not a checkpoint file" in out
    assert "resumed from ckpt-00000003" in out


def test_skip_policy_leaves_the_optimizer_state_unchanged():
    engine = make_engine([], steps_per_epoch=6, nonfinite="skip", losses=nan_once_at(2))
    engine.optimizer = torch.optim.Adam(engine.model.parameters(), lr=0.01)
    engine.fit()
    adam_steps = [float(s["step"]) for s in engine.optimizer.state.values()]
    assert engine.state.step == 5 and adam_steps == [5.0]  # 6 batches, one skipped: 5 updates, not 6


# ---------------------------------------------------------------- nothing lost, nothing mixed (issue 12)


@pytest.fixture
def lock_holder(tmp_path):
    """Another process holding the folder's run lock, killed -9 at the end."""
    folder = tmp_path / "busy"
    code = (
        "import sys, time; from enginekit.files import lock_folder; "
        f"lock_folder({str(folder)!r}); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield folder, proc
    proc.kill()
    proc.wait(timeout=30)


def test_a_second_run_on_a_locked_folder_refuses_at_once_touching_nothing(lock_holder):
    folder, holder = lock_holder
    (folder / "ckpt-00000026").mkdir()
    (folder / "ckpt-00000026" / "__0_0.distcp").write_bytes(b"the running job's write")
    (folder / "ckpt-00000024").mkdir()
    (folder / "ckpt-00000024" / "manifest.json").write_bytes(b"x" * 100)
    before = sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    for kwargs in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(CheckpointError, match=f"in use by another run's Checkpoint \\(pid {holder.pid}\\)"):
            drive(Checkpoint(folder, **kwargs), steps_per_epoch=2)
    assert sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*")) == before
    holder.kill()  # kill -9: the kernel drops the lock, no stale lock is left behind
    holder.wait(timeout=30)
    drive(Checkpoint(folder, overwrite=True), steps_per_epoch=2)
    assert [p.name for p in Checkpoint(folder).checkpoints()] == ["ckpt-00000002"]


def failing_write(exc: BaseException):
    """A replacement for the writer's ``write`` of every checkpoint file: it raises ``exc``."""

    def write(self, data):
        raise exc

    return write


@pytest.mark.parametrize("cause", ["ENOSPC", "torch-error-on-a-full-disk"])
def test_a_full_disk_is_said_in_plain_words_and_never_reported_as_saved(tmp_path, monkeypatch, cause):
    from enginekit.checkpointing import saving
    from enginekit.plugins import CheckpointWriteError

    engine = make_engine([Checkpoint(tmp_path, every_steps=2)], steps_per_epoch=6)
    engine.fit(max_steps=2)
    size = sum(p.stat().st_size for p in (tmp_path / "ckpt-00000002").iterdir())
    if cause == "ENOSPC":
        error = OSError(errno.ENOSPC, "No space left on device")
    else:  # what the error says matters less than the disk it happened on
        error = RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")
        monkeypatch.setattr(saving.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, size // 2))
    monkeypatch.setattr(_HashingStream, "write", failing_write(error))
    with pytest.raises(CheckpointWriteError) as info:
        engine.fit(max_steps=4)
    message = str(info.value)
    assert "could not write ckpt-00000004: no space left on device (needs ~" in message
    assert "inline_container" not in message and "the newest checkpoint on disk is ckpt-00000002" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [".enginekit.lock", "ckpt-00000002"]  # nothing half-written


def test_a_failed_save_on_sigterm_ends_with_the_failure_not_with_saved(tmp_path, monkeypatch):
    from enginekit.plugins import CheckpointWriteError

    class Term:
        @hookimpl
        def after_backward(self, engine):
            if engine.state.step == 1:
                signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(_HashingStream, "write", failing_write(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(
        CheckpointWriteError, match=r"could not write ckpt-00000002: Permission denied \(PermissionError\)"
    ):
        drive([Term(), Checkpoint(tmp_path)], steps_per_epoch=6)
    assert not list(tmp_path.glob("ckpt-*"))


def test_a_second_signal_during_a_save_abandons_it_and_says_so(tmp_path, monkeypatch):
    from enginekit.checkpointing.dcp import Abandoned
    from enginekit.plugins import CheckpointWriteError

    monkeypatch.setattr(_HashingStream, "write", failing_write(Abandoned("abandoned after a second signal")))
    with pytest.raises(CheckpointWriteError, match="could not write ckpt-00000003: interrupted by a second signal"):
        drive(Checkpoint(tmp_path), steps_per_epoch=3)
    assert not list(tmp_path.glob("ckpt-*")) and not list(tmp_path.rglob("*.tmp"))


def test_non_finite_weights_are_never_checkpointed_and_the_message_is_true(tmp_path):
    from enginekit.plugins import CheckpointWriteError

    class Poison:  # what lr=nan did: a finite loss, then an update that turns the weights to NaN
        @hookimpl
        def after_step(self, engine, loss):
            if engine.state.step == 3:
                with torch.no_grad():
                    next(engine.model.parameters()).fill_(float("nan"))

    with pytest.raises(CheckpointWriteError) as info:
        drive([Poison(), Checkpoint(tmp_path, every_steps=2)], steps_per_epoch=6)
    message = str(info.value)
    assert "refusing to write ckpt-00000004: the model's weights hold NaN or inf after step 4" in message
    assert "the newest checkpoint on disk is ckpt-00000002" in message
    assert [p.name for p in Checkpoint(tmp_path).checkpoints()] == ["ckpt-00000002"]


def resume_with(tmp_path, plugins, **engine_kwargs):
    engine = make_engine(plugins, steps_per_epoch=4, **engine_kwargs)
    engine.fit(epochs=2)
    return engine


def test_resume_with_other_settings_lists_every_difference_and_refuses(tmp_path):
    from enginekit.plugins import GradClip

    drive([GradClip(max_norm=1.0), Checkpoint(tmp_path)], epochs=2, steps_per_epoch=4, max_steps=4)
    engine = make_engine([GradClip(max_norm=0.5), Checkpoint(tmp_path, resume=True)], steps_per_epoch=4, lr=0.01)
    with pytest.raises(CheckpointError) as info:
        engine.fit(epochs=2)
    message = str(info.value)
    assert "other settings (3 difference(s))" in message
    assert "grad_clip.max_norm: 1.0 in the checkpoint, 0.5 now" in message
    assert "optimizer.group0.initial_lr: 0.001 in the checkpoint, 0.01 now" in message
    assert "plan.peak_lrs: [0.001] in the checkpoint, [0.01] now" in message
    assert "allow_changes=True" in message and "\n" not in message


def test_resume_with_allowed_changes_applies_them_and_says_each_once(tmp_path, capsys):
    from enginekit.plugins import GradClip

    drive([Checkpoint(tmp_path)], epochs=2, steps_per_epoch=4, max_steps=4)
    engine = make_engine([Checkpoint(tmp_path, resume=True, allow_changes=True)], steps_per_epoch=4)
    engine.optimizer.param_groups[0]["weight_decay"] = 0.5
    engine.register(GradClip(max_norm=0.5))
    engine.fit(epochs=2)
    out = capsys.readouterr().out
    assert out.count("resuming with a changed setting, applied from here on: grad_clip.max_norm: '(not set)'") == 1
    assert out.count("optimizer.group0.weight_decay: 0 in the checkpoint, 0.5 now") == 1
    assert engine.optimizer.param_groups[0]["weight_decay"] == 0.5  # this run's value, not the checkpoint's


def test_a_data_position_outside_the_loader_is_a_clear_error(tmp_path):
    drive([Checkpoint(tmp_path, every_steps=3, every_epoch=False)], steps_per_epoch=4, max_steps=3, batch_size=1)
    engine = make_engine([Checkpoint(tmp_path, resume=True, allow_changes=True)], steps_per_epoch=2, batch_size=2)
    with pytest.raises(
        CheckpointError, match="stands at micro-batch 3 of an epoch, but this run's training loader has only 2"
    ):
        engine.fit()


@pytest.mark.filterwarnings("ignore:Checkpoint. every_epoch=False:UserWarning")  # saving on the signal only
@pytest.mark.parametrize("hook", ["before_fit", "after_epoch", "after_fit"])
def test_a_signal_at_any_moment_of_fit_ends_with_143_and_a_checkpoint(tmp_path, hook):
    from enginekit import TrainingInterrupted

    def term(self, engine):
        if hook != "after_epoch" or engine.state.epoch == engine.state.epochs - 1:  # the last epoch's
            signal.raise_signal(signal.SIGTERM)

    Term = type("Term", (), {hook: hookimpl(term)})
    steps = 0 if hook == "before_fit" else 6
    with pytest.raises(TrainingInterrupted) as info:
        drive([Term(), Checkpoint(tmp_path, every_epoch=False)], epochs=2, steps_per_epoch=3)
    assert info.value.code == 143 and info.value.step == steps
    expected = [] if steps == 0 else [f"ckpt-{steps:08d}"]  # the last finished step, saved on the signal
    assert [p.name for p in Checkpoint(tmp_path).checkpoints()] == expected


def test_a_symlink_to_a_device_is_skipped_with_a_line_not_read(tmp_path, capsys):
    drive(Checkpoint(tmp_path, every_steps=2), steps_per_epoch=4)
    (tmp_path / "ckpt-00000099").symlink_to("/dev/zero")
    start = time.perf_counter()
    engine = make_engine([Checkpoint(tmp_path, resume=True)], steps_per_epoch=4)
    engine.fit(epochs=2)
    assert time.perf_counter() - start < 30
    out = capsys.readouterr().out
    assert "skipping ckpt-00000099: not a folder (a symbolic link" in out and "resumed from ckpt-00000004" in out


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "a-good-file"])
def test_a_symlink_or_fifo_in_place_of_a_listed_file_is_skipped_with_a_line_not_read(two_checkpoints, capsys, target):
    shard = two_checkpoints / "ckpt-00000006" / "__0_0.distcp"
    good = shard.read_bytes()
    shard.unlink()
    if target == "fifo":
        os.mkfifo(shard)  # opened for reading, it blocks until a writer comes: forever
    elif target == "a-good-file":  # the same bytes elsewhere: still not read through a link
        (two_checkpoints / "elsewhere").write_bytes(good)
        shard.symlink_to(two_checkpoints / "elsewhere")
    else:
        shard.symlink_to("/dev/zero")  # read to its end, it never ends
    start = time.perf_counter()
    resume_engine(two_checkpoints)
    assert time.perf_counter() - start < 30
    out = capsys.readouterr().out
    kind = "not a regular file" if target == "fifo" else "a symbolic link"
    assert f"skipping ckpt-00000006: __0_0.distcp is {kind}" in out and "resumed from ckpt-00000003" in out


def test_evaluation_and_sampling_restore_train_mode_after_an_error(tiny_cfg):
    from enginekit.gpt import GPTModel
    from enginekit.plugins import SampleText

    engine = make_engine(steps_per_epoch=2)

    def broken(out, targets):
        raise RuntimeError("loss exploded")

    engine.loss_fn = broken
    with pytest.raises(RuntimeError, match="loss exploded"):
        engine.evaluate(engine.train_loader, 1)
    assert engine.model.training
    gpt = GPTModel(tiny_cfg)

    class BrokenTokenizer:
        def encode(self, *args, **kwargs):
            raise RuntimeError("no tokens")

    engine.model = gpt
    with pytest.raises(RuntimeError, match="no tokens"):
        SampleText(tokenizer=BrokenTokenizer()).after_epoch(engine)
    assert gpt.training


def test_a_cut_short_fits_position_does_not_leak_into_a_resumed_one(tmp_path):
    reference = make_engine([Checkpoint(tmp_path / "a", every_epoch=True)], steps_per_epoch=4, lr=0.05)
    reference.fit(epochs=2)
    engine = make_engine([Checkpoint(tmp_path / "b", every_epoch=True)], steps_per_epoch=4, lr=0.05)
    engine.fit(epochs=1)
    (tmp_path / "c").mkdir()
    shutil.copytree(tmp_path / "b" / "ckpt-00000004", tmp_path / "c" / "ckpt-00000004")
    cut = make_engine([Checkpoint(tmp_path / "c", resume=True)], steps_per_epoch=4, lr=0.05)
    cut.fit(epochs=2, max_steps=6)  # stops mid-epoch: a pending position for a later fit in this engine
    cut.plugins["checkpoint"].resume = True  # ...but the next fit resumes from the epoch-end checkpoint
    for name in ("ckpt-00000005", "ckpt-00000006"):
        shutil.rmtree(tmp_path / "c" / name, ignore_errors=True)
    cut.fit(epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(cut.model.parameters(), reference.model.parameters()))


# ---------------------------------------------------------------- background writes (issue 15)


class SlowWrites:
    """Holds every commit of a checkpoint (its state.pt and manifest) 0.3 s before its rename and
    records how many overlap."""

    def __init__(self) -> None:
        self.running = self.most = 0
        self.finished: list[tuple[str, float]] = []

    def __call__(self, tmp: Path) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        time.sleep(0.3)
        self.running -= 1
        self.finished.append((f"{tmp.parent.name}/{tmp.name}", time.perf_counter()))


def test_a_background_write_lets_training_go_on_and_the_end_of_fit_waits_for_it(tmp_path, monkeypatch):
    from enginekit import files

    slow = SlowWrites()
    monkeypatch.setattr(files, "before_replace", slow)
    steps_done: list[tuple[int, float]] = []

    class Clock:
        @hookimpl
        def after_step(self, engine, loss):
            steps_done.append((engine.state.step, time.perf_counter()))

    drive([Clock(), Checkpoint(tmp_path, every_steps=2, every_epoch=False)], steps_per_epoch=6)
    first_ckpt_done = next(t for name, t in slow.finished if name.startswith("ckpt-00000002/.manifest.json."))
    assert any(
        step == 2 and t < first_ckpt_done for step, t in steps_done
    )  # step 2 ran while step 2's ckpt was written
    assert slow.most == 1  # never two writes at once: the next save waited
    names = [p.name for p in Checkpoint(tmp_path).checkpoints()]
    assert names == ["ckpt-00000006", "ckpt-00000004", "ckpt-00000002"]  # all on disk when fit returned
    assert all(Checkpoint(tmp_path).verify(p) is None for p in Checkpoint(tmp_path).checkpoints())


@pytest.mark.parametrize("device", DEVICES)
def test_background_and_synchronous_checkpoints_hold_the_same_state(tmp_path, device):
    # saves after steps 4 and 8 are written in the background (the second from the first's
    # reused host buffers); the last one, after step 12, in the foreground
    for mode in (True, False):
        torch.manual_seed(0)
        checkpoint = Checkpoint(tmp_path / str(mode), async_write=mode, keep_last=5)
        drive([LossTracker(eval_freq=2), checkpoint], epochs=3, steps_per_epoch=4, device=device)
    for name in ("ckpt-00000004", "ckpt-00000008", "ckpt-00000012"):
        a = read_checkpoint(tmp_path / "True" / name)
        b = read_checkpoint(tmp_path / "False" / name)
        assert a["plugins"] == b["plugins"] and a["settings"] == b["settings"]
        assert b["model"] and all(torch.equal(a["model"][k], v) for k, v in b["model"].items())
        assert a["optimizer"].keys() == b["optimizer"].keys()
        assert all(torch.equal(a["optimizer"][k], v) for k, v in b["optimizer"].items())
        assert a["param_groups"] == b["param_groups"]
        assert a["engine"]["step"] == b["engine"]["step"] and torch.equal(
            a["engine"]["rng"][0]["torch"], b["engine"]["rng"][0]["torch"]
        )


@pytest.mark.parametrize("device", DEVICES)
def test_a_resume_from_a_background_checkpoint_continues_bit_exactly(tmp_path, device):
    def run(folder: Path, resume: bool):
        checkpoint = Checkpoint(folder, every_steps=3, every_epoch=False, keep_last=5, resume=resume)
        engine = make_engine([LossTracker(eval_freq=2), checkpoint], steps_per_epoch=4, lr=0.05, device=device)
        recorder = HookRecorder(engine)
        engine.fit(epochs=3)
        return engine, [c.step for c in recorder.calls if c.hook == "after_step"]

    reference, _ = run(tmp_path / "a", resume=False)
    (tmp_path / "b").mkdir()
    # mid-epoch 1, written in the background
    shutil.copytree(tmp_path / "a" / "ckpt-00000006", tmp_path / "b" / "ckpt-00000006")
    resumed, steps_run = run(tmp_path / "b", resume=True)
    assert steps_run == list(range(6, 12))  # only the steps after the checkpoint ran
    assert resumed.plugins["loss_tracker"].state_dict() == reference.plugins["loss_tracker"].state_dict()
    for a, b in zip(resumed.model.parameters(), reference.model.parameters()):
        assert a.device.type == device and torch.equal(a, b)


def test_background_saves_copy_into_the_same_host_buffers_and_the_last_save_needs_no_copy(tmp_path, monkeypatch):
    from enginekit.checkpointing import saving
    from enginekit.checkpointing.dcp import HostCopy

    started, copies = [], []

    class CountingThread(threading.Thread):
        def start(self) -> None:
            started.append(self.name)
            super().start()

    real_copy = HostCopy.copy
    monkeypatch.setattr(saving.threading, "Thread", CountingThread)
    monkeypatch.setattr(HostCopy, "copy", lambda self, obj: copies.append(1) or real_copy(self, obj))
    checkpoint = Checkpoint(tmp_path, every_steps=2, every_epoch=False, keep_last=5)
    buffers = []

    class Watch:
        @hookimpl
        def after_step(self, engine, loss):
            buffers.append([b.data_ptr() for b in checkpoint._host._buffers])

    drive([Watch(), checkpoint], steps_per_epoch=6)
    # steps 0..5: saves after steps 2 and 4 in the background, after step 6 (the last) in the foreground
    ours = [name for name in started if name.startswith("enginekit-")]  # DCP's own executor starts threads too
    assert ours == ["enginekit-ckpt-00000002", "enginekit-ckpt-00000004"] and len(copies) == 2
    assert buffers[2] and buffers[4] == buffers[2]  # the second copy went into the first one's buffers
    assert checkpoint._host._buffers == []  # freed at the end of fit
    assert [p.name for p in checkpoint.checkpoints()] == ["ckpt-00000006", "ckpt-00000004", "ckpt-00000002"]


def test_a_failed_background_write_surfaces_at_the_next_step(tmp_path, monkeypatch):
    from enginekit.plugins import CheckpointWriteError

    monkeypatch.setattr(_HashingStream, "write", failing_write(OSError(errno.EROFS, "Read-only file system")))
    seen = []

    class Steps:
        @hookimpl
        def after_step(self, engine, loss):
            seen.append(engine.state.step)
            time.sleep(0.05)  # leave the background write time to fail

    with pytest.raises(CheckpointWriteError, match=r"could not write ckpt-00000002: Read-only file system \(OSError\)"):
        drive([Steps(), Checkpoint(tmp_path, every_steps=2, every_epoch=False)], steps_per_epoch=10)
    assert seen[-1] <= 4  # at the next save point, not at the end of the run
    assert not list(tmp_path.glob("ckpt-*"))


@pytest.mark.parametrize(
    "kwargs", [{"every_steps": 2, "async_write": False}, {"every_epoch": True}], ids=["synchronous", "last-save-only"]
)
def test_no_host_buffers_are_allocated_where_no_background_save_lies_ahead(tmp_path, kwargs):
    checkpoint = Checkpoint(tmp_path, **kwargs)
    held = []

    class Watch:
        @hookimpl
        def after_step(self, engine, loss):
            held.append(len(checkpoint._host._buffers))

    drive([Watch(), checkpoint], steps_per_epoch=6, param_groups=3)
    assert held == [0] * 6 and checkpoint.verify(tmp_path / "ckpt-00000006") is None


def test_a_wait_cut_short_by_a_second_signal_still_leaves_the_write_to_be_waited_for(tmp_path):
    checkpoint = Checkpoint(tmp_path)
    joins = []

    class Save:  # a background write whose first join a second Ctrl-C interrupts
        path = tmp_path / "ckpt-00000001"

        def wait(self):
            joins.append(1)
            if len(joins) == 1:
                raise KeyboardInterrupt
            return None

    checkpoint._save = Save()
    with pytest.raises(KeyboardInterrupt):
        checkpoint.wait()
    checkpoint.wait()  # as on_exception does next: the write in flight is joined again
    assert len(joins) == 2 and checkpoint._save is None


def test_the_non_finite_weight_check_is_not_fooled_by_a_sum_that_overflows():
    from enginekit.checkpointing.saving import first_nonfinite as _first_nonfinite

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite, but its sum is inf in float32
    assert _first_nonfinite(model) is None
    with torch.no_grad():
        model[1].bias[2] = float("nan")
    assert _first_nonfinite(model) == "1.bias"
    with torch.no_grad():
        model[0].weight[1, 1] = float("-inf")
    assert _first_nonfinite(model) == "0.weight"


# ---------------------------------------------------------------- trust no file name, lock path or side file (issue 29)


def test_a_renamed_checkpoint_is_taken_for_the_step_it_holds_not_its_name(two_checkpoints, capsys):
    # an older checkpoint (and its manifest) under a newer name: resuming from it would drop steps 3-6
    shutil.copytree(two_checkpoints / "ckpt-00000003", two_checkpoints / "ckpt-00000099")
    engine = resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert "skipping ckpt-00000099: it holds step 3, not step 99 as its name says" in out
    assert "resumed from ckpt-00000006 (step 6" in out and engine.state.step == 7
    # set aside, so pruning keeps exactly keep_last and the next resume does not go back to it
    assert [p.name for p in Checkpoint(two_checkpoints).checkpoints()] == [
        "ckpt-00000007",
        "ckpt-00000006",
        "ckpt-00000003",
    ]
    assert (two_checkpoints / "ckpt-00000099.corrupt").is_dir()


def test_a_symlinked_candidate_or_manifest_is_never_followed(two_checkpoints, capsys):
    (two_checkpoints / "ckpt-00000099").symlink_to(two_checkpoints / "ckpt-00000003")
    fake = two_checkpoints / "ckpt-00000098"  # a real folder whose files are all links to a good checkpoint's
    fake.mkdir()
    for f in (two_checkpoints / "ckpt-00000003").iterdir():
        (fake / f.name).symlink_to(f)
    engine = resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert "skipping ckpt-00000099: not a folder (a symbolic link: only real folders are candidates)" in out
    assert "skipping ckpt-00000098: manifest.json unreadable (manifest.json is a symbolic link" in out
    assert "resumed from ckpt-00000006 (step 6" in out and engine.state.step == 7


_RESUME_IN_A_CHILD = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a manifest read without end fails, not the machine
from enginekit.checkpointing import Folder
from enginekit.checkpointing.loading import open_checkpoint
folder = Folder(Path(sys.argv[1]))
path, _ = folder.candidates(print)[0]
open_checkpoint(folder, path)
print("chose", path.name)
"""


@pytest.mark.parametrize("odd", ["fifo", "dev-zero"])
def test_an_odd_manifest_in_a_good_checkpoint_is_skipped_not_read(two_checkpoints, odd):
    manifest = two_checkpoints / "ckpt-00000006" / "manifest.json"
    manifest.unlink()
    if odd == "fifo":
        os.mkfifo(manifest)  # opened for reading, it blocks until a writer comes: forever
    else:
        manifest.symlink_to("/dev/zero")  # read to its end, it grows memory without end
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _RESUME_IN_A_CHILD, str(two_checkpoints)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("choosing a checkpoint hung on the odd manifest.json (no answer in 120 s)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind = "is not a regular file" if odd == "fifo" else "is a symbolic link"
    assert f"skipping ckpt-00000006: manifest.json unreadable (manifest.json {kind}" in proc.stdout
    assert "chose ckpt-00000003" in proc.stdout


def test_deleting_the_lock_files_does_not_let_a_second_run_clobber_a_live_one(two_checkpoints):
    code = (
        "import sys, time; from enginekit.files import lock_folder; "
        f"lock_folder({str(two_checkpoints)!r}); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (two_checkpoints / ".enginekit.lock").unlink()  # the user "cleans up a stale lock"
        before = sorted(p.name for p in two_checkpoints.iterdir())
        with pytest.raises(CheckpointError, match="in use by another run's Checkpoint"):
            drive(Checkpoint(two_checkpoints, overwrite=True), steps_per_epoch=2)
        assert sorted(p.name for p in two_checkpoints.iterdir()) == before  # the live run's checkpoints survive
    finally:
        holder.kill()
        holder.wait(timeout=30)


# ---------------------------------------------------------------- a second signal: named right, nothing left behind


def _two_sigterms_in(hook: str, at_step: int):
    """A plugin that sends SIGTERM twice in ``hook`` of step ``at_step`` (the first handled before the second)."""

    def twice(self, engine, **_):
        if engine.state.step == at_step:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)

    return type("TwoTerms", (), {hook: hookimpl(lambda self, engine: twice(self, engine))})()


def test_two_quick_sigterms_inside_a_step_end_as_sigterm_naming_the_newest_checkpoint(tmp_path, capsys):
    from enginekit import TrainingAborted

    with pytest.raises(TrainingAborted) as info:
        drive(
            [_two_sigterms_in("after_backward", 3), Checkpoint(tmp_path, every_steps=2, async_write=False)],
            steps_per_epoch=6,
        )
    assert isinstance(info.value, KeyboardInterrupt)  # code that catches Ctrl-C still catches it
    assert info.value.exit_code == 143 and "second SIGTERM" in str(info.value) and "Ctrl-C" not in str(info.value)
    out = capsys.readouterr().out
    assert "Checkpoint: stopped by a second SIGTERM; the newest checkpoint on disk is ckpt-00000002" in out
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_second_sigterm_during_a_save_abandons_it_says_so_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    from enginekit import TrainingAborted

    real_write = _HashingStream.write
    sent = []

    def write(self, data):
        if not sent:  # the save of the signal's save point, half written
            sent.append(True)
            signal.raise_signal(signal.SIGTERM)
        return real_write(self, data)

    class Term:
        @hookimpl
        def after_backward(self, engine):
            if engine.state.step == 3:
                monkeypatch.setattr(_HashingStream, "write", write)
                signal.raise_signal(signal.SIGTERM)

    with pytest.raises(TrainingAborted) as info:
        drive([Term(), Checkpoint(tmp_path, every_steps=2, async_write=False)], steps_per_epoch=6)
    assert info.value.exit_code == 143
    out = capsys.readouterr().out
    assert (
        "Checkpoint: stopped by a second SIGTERM; abandoned the save of ckpt-00000004; "
        "the newest checkpoint on disk is ckpt-00000002" in out
    )
    assert [p.name for p in Checkpoint(tmp_path).checkpoints()] == ["ckpt-00000002"]
    assert not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------- resume at an epoch boundary, the last step, finished


def test_a_second_sigterm_abandons_a_background_save_and_removes_its_unfinished_folder(tmp_path, monkeypatch, capsys):
    from enginekit import TrainingAborted

    real_write = _HashingStream.write

    def write(self, data):
        if threading.current_thread() is not threading.main_thread():
            self.abandon.wait(timeout=30)  # held until the signals come: a write in flight
        return real_write(self, data)

    monkeypatch.setattr(_HashingStream, "write", write)
    with pytest.raises(TrainingAborted):
        drive([_two_sigterms_in("after_backward", 3), Checkpoint(tmp_path, every_steps=2)], steps_per_epoch=6)
    out = capsys.readouterr().out
    assert "Checkpoint: stopped by a second SIGTERM; abandoned the save of ckpt-00000002" in out
    assert "no checkpoint is on disk yet" in out
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.glob("ckpt-*"))


def _trained(folder: Path, resume: bool = False, **fit_kwargs):
    tracker = LossTracker(eval_freq=2)
    engine = make_engine([tracker, Checkpoint(folder, every_steps=1, resume=resume)], steps_per_epoch=6)
    engine.fit(**fit_kwargs)
    return engine, tracker


def _same_run(a, b) -> None:
    (ea, ta), (eb, tb) = a, b
    assert ea.state.step == eb.state.step and ea.state.epoch == eb.state.epoch
    assert all(torch.equal(x, y) for x, y in zip(ea.model.state_dict().values(), eb.model.state_dict().values()))
    assert ta.state_dict() == tb.state_dict()


@pytest.mark.parametrize("stopped_at", [6, 11], ids=["epoch-boundary", "before-the-last-step"])
def test_a_resume_at_an_epoch_boundary_or_before_the_last_step_continues_exactly(tmp_path, stopped_at):
    whole = _trained(tmp_path / "whole", epochs=2)
    _trained(tmp_path / "cut", epochs=2, max_steps=stopped_at)
    resumed = _trained(tmp_path / "cut", resume=True, epochs=2)
    assert resumed[0].state.step == 12
    _same_run(whole, resumed)


def test_resuming_a_finished_run_says_it_is_finished_and_trains_nothing(tmp_path, capsys):
    whole = _trained(tmp_path, epochs=2)
    capsys.readouterr()
    again = _trained(tmp_path, resume=True, epochs=2)
    out = capsys.readouterr().out
    assert (
        "Checkpoint: ckpt-00000012 is the end of this run's plan (step 12 of 12): the run is already finished, "
        "nothing left to train" in out
    )
    checkpoint = next(p for p in again[0].plugins.values() if isinstance(p, Checkpoint))
    assert checkpoint.resumed_step == again[0].state.step == 12
    _same_run(whole, again)


# ---------------------------------------------------------------- the right plugin named, save points enforced


class _Stateful:
    def __init__(self, fail_in: str) -> None:
        self._fail_in = fail_in  # not a setting (no attribute of its name): resuming with another is no change

    @hookimpl
    def after_step(self, engine, loss):
        pass

    def state_dict(self):
        if self._fail_in == "state_dict":
            raise RuntimeError("cannot pickle the lambda")
        return {"n": 1}

    def load_state_dict(self, state):
        if self._fail_in == "load_state_dict":
            raise KeyError("n2")


def test_a_plugins_failing_state_dict_is_blamed_on_that_plugin_not_on_checkpoint(tmp_path):
    from enginekit import describe_error, plugin_failure

    with pytest.raises(RuntimeError) as info:
        drive([("tracker", _Stateful("state_dict")), Checkpoint(tmp_path, every_steps=2)], steps_per_epoch=4)
    assert plugin_failure(info.value).plugin_name == "tracker"
    assert describe_error(info.value).startswith("plugin 'tracker' failed in its state_dict()")
    assert "cannot pickle the lambda" in describe_error(info.value)


def test_a_plugins_failing_load_state_dict_is_blamed_on_that_plugin_not_on_checkpoint(tmp_path):
    from enginekit import describe_error, plugin_failure

    drive([("tracker", _Stateful("")), Checkpoint(tmp_path, every_steps=2)], steps_per_epoch=4)
    with pytest.raises(KeyError) as info:
        drive(
            [("tracker", _Stateful("load_state_dict")), Checkpoint(tmp_path, resume=True)], steps_per_epoch=4, epochs=2
        )
    assert plugin_failure(info.value).plugin_name == "tracker"
    assert describe_error(info.value).startswith("plugin 'tracker' failed in its load_state_dict()")


def test_an_empty_dir_is_refused_at_construction_not_run_in_the_current_folder():
    with pytest.raises(ValueError, match="Checkpoint: dir is empty"):
        Checkpoint("")


def test_a_dir_that_is_a_file_is_refused_at_construction_saying_what_to_pass(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="Checkpoint: dir .*a_file' is a file, not a folder; pass a folder"):
        Checkpoint(tmp_path / "a_file")


def test_a_checkpoint_that_would_never_save_says_so_in_one_line(tmp_path):
    with pytest.warns(UserWarning, match="Checkpoint: every_epoch=False and no every_steps: it saves only on"):
        Checkpoint(tmp_path, every_epoch=False)
