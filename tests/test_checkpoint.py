"""Checkpoint: exact resume, crash safety, corruption, hostile files, plugin state, policies."""

from __future__ import annotations

import hashlib
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
from enginekit.plugins import Checkpoint, CheckpointError, LossTracker, LRWarmup, warmup_lr
from enginekit.plugins.checkpoint import sha256_file
from enginekit.testing import HookRecorder, drive, make_engine

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
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == [
        "ckpt-00000008.pt",
        "ckpt-00000012.pt",
        "ckpt-00000016.pt",
    ]
    return out


def resumed_copy(killed: Path, tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    proc = job(out, "--resume", *flags)
    assert "resumed from ckpt-00000016.pt (step " in proc.stdout
    return load_result(out)


def test_killed_then_resumed_in_a_fresh_process_equals_uninterrupted(uninterrupted, killed, tmp_path):
    ckpt = Checkpoint(killed / "checkpoints")
    newest = ckpt.checkpoints()[0]
    assert ckpt.verify(newest) is None  # kill -9 during training left a checkpoint whose hash matches
    state = ckpt.load(newest)["engine"]
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
    leftovers = list(folder.glob(".ckpt-*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the interrupted write
    ckpt = Checkpoint(folder)
    assert [p.name for p in ckpt.checkpoints()][0] == "ckpt-00000012.pt"
    assert ckpt.verify(ckpt.checkpoints()[0]) is None
    proc2 = job(out, "--resume")
    assert "resumed from ckpt-00000012.pt" in proc2.stdout
    assert not list(folder.glob(".ckpt-*.tmp"))  # cleaned up
    assert_identical(load_result(out), uninterrupted)


# ---------------------------------------------------------------- corruption and hostile files


@pytest.fixture
def two_checkpoints(tmp_path) -> Path:
    folder = tmp_path / "ck"
    drive([LossTracker(eval_freq=2), Checkpoint(folder, every_steps=3)], steps_per_epoch=6)
    assert [p.name for p in Checkpoint(folder).checkpoints()] == ["ckpt-00000006.pt", "ckpt-00000003.pt"]
    return folder


def resume_engine(folder: Path):
    engine = make_engine([LossTracker(eval_freq=2), Checkpoint(folder, every_steps=3, resume=True)], steps_per_epoch=6)
    engine.fit(max_steps=7, epochs=2)
    return engine


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(two_checkpoints, capsys):
    newest = two_checkpoints / "ckpt-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    engine = resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert "skipping ckpt-00000006.pt: sha256 mismatch" in out and "truncated or corrupted" in out
    assert "resumed from ckpt-00000003.pt (step 3" in out
    assert engine.state.step == 7


def test_bit_flipped_checkpoint_is_detected(two_checkpoints, capsys):
    newest = two_checkpoints / "ckpt-00000006.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "skipping" in line] == [
        next(line for line in out.splitlines() if "ckpt-00000006.pt: sha256 mismatch" in line)
    ]
    assert "resumed from ckpt-00000003.pt" in out


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("rehash", [False, True], ids=["hash-mismatch", "attacker-rewrote-the-hash"])
def test_malicious_pickle_is_refused_and_never_runs(two_checkpoints, tmp_path, capsys, rehash):
    marker = tmp_path / "pwned"
    newest = two_checkpoints / "ckpt-00000006.pt"
    newest.write_bytes(pickle.dumps({"model": Exploit(marker)}))
    if rehash:
        digest = hashlib.sha256(newest.read_bytes()).hexdigest()
        (two_checkpoints / "ckpt-00000006.pt.sha256").write_text(f"{digest}  ckpt-00000006.pt\n")
    resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert not marker.exists()
    reason = "refused by the safe loader" if rehash else "sha256 mismatch"
    assert f"skipping ckpt-00000006.pt: {reason}" in out
    assert "resumed from ckpt-00000003.pt" in out


def test_loading_uses_weights_only(two_checkpoints, monkeypatch):
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    Checkpoint(two_checkpoints).load_latest()
    assert calls and all(k.get("weights_only") is True for k in calls)


def test_no_valid_checkpoint_at_all_is_an_error_not_a_fresh_start(two_checkpoints):
    for p in two_checkpoints.glob("ckpt-*.pt"):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no valid checkpoint.*2 found, none verifies"):
        resume_engine(two_checkpoints)


def test_empty_folder_starts_fresh(tmp_path, capsys):
    engine = resume_engine(tmp_path / "nothing")
    assert "no checkpoint in" in capsys.readouterr().out and engine.state.step == 7


def test_leftover_temporary_file_is_ignored_and_removed(two_checkpoints):
    leftover = two_checkpoints / ".ckpt-00000009.pt.4242.tmp"
    leftover.write_bytes(b"half a checkpoint")
    engine = resume_engine(two_checkpoints)
    assert not leftover.exists() and engine.state.step == 7


def test_missing_hash_file_means_unfinished_and_is_skipped(two_checkpoints, capsys):
    (two_checkpoints / "ckpt-00000006.pt.sha256").unlink()
    resume_engine(two_checkpoints)
    assert "no .sha256 file beside it" in capsys.readouterr().out


def test_keep_last_prunes_only_older_checkpoints(tmp_path):
    folder = tmp_path / "ck"
    drive(Checkpoint(folder, every_steps=1, keep_last=2), steps_per_epoch=5)
    assert sorted(p.name for p in folder.iterdir()) == [
        ".enginekit.lock",  # the run lock: released when fit ends, the file stays
        "ckpt-00000004.pt",
        "ckpt-00000004.pt.sha256",
        "ckpt-00000005.pt",
        "ckpt-00000005.pt.sha256",
    ]
    assert all(Checkpoint(folder).verify(p) is None for p in Checkpoint(folder).checkpoints())
    line = (folder / "ckpt-00000005.pt.sha256").read_text()
    assert line == f"{sha256_file(folder / 'ckpt-00000005.pt')}  ckpt-00000005.pt\n"  # sha256sum format


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
    assert names[0] == "ckpt-00000005.pt"  # after steps 0-4; nothing for step 5 or later
    payload = Checkpoint(folder).load(folder / names[0])
    assert all(torch.isfinite(v).all() for v in payload["model"].values())


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
    assert [p.name for p in Checkpoint(folder).checkpoints()][0] == "ckpt-00000007.pt"


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
    assert [p.name for p in Checkpoint(folder).checkpoints()] == ["ckpt-00000003.pt"]


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
    assert [p.name for p in Checkpoint(two_checkpoints).checkpoints()] == ["ckpt-00000002.pt"]


def test_after_falling_back_newer_bad_files_are_set_aside_and_never_kept_over_good_ones(two_checkpoints):
    newest = two_checkpoints / "ckpt-00000006.pt"
    newest.write_bytes(b"torn")
    engine = make_engine(
        [LossTracker(eval_freq=2), Checkpoint(two_checkpoints, every_steps=1, keep_last=1, resume=True)],
        steps_per_epoch=6,
    )
    engine.fit(max_steps=5)
    assert [p.name for p in Checkpoint(two_checkpoints).checkpoints()] == ["ckpt-00000005.pt"]
    assert (two_checkpoints / "ckpt-00000006.pt.corrupt").exists()


def test_resuming_with_another_run_length_is_an_error_naming_both(tmp_path):
    from enginekit.plugins import CosineDecay

    drive([CosineDecay(min_lr=0.0), Checkpoint(tmp_path, every_steps=2)], steps_per_epoch=4, max_steps=4)
    engine = make_engine([CosineDecay(min_lr=0.0), Checkpoint(tmp_path, resume=True)], steps_per_epoch=4)
    with pytest.raises(
        CheckpointError, match="other settings \\(1 difference\\(s\\)\\): plan.total_steps: 4 in the checkpoint, 8 now"
    ):
        engine.fit(epochs=2)


def test_unreadable_checkpoint_is_reported_and_the_previous_one_used(two_checkpoints, capsys):
    newest = two_checkpoints / "ckpt-00000006.pt"
    newest.unlink()
    newest.mkdir()  # something that exists but cannot be read as a file
    resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert "skipping ckpt-00000006.pt: not a regular file" in out
    assert "resumed from ckpt-00000003.pt" in out


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
    (folder / ".ckpt-00000026.pt.999.tmp").write_bytes(b"the running job's write")
    (folder / "ckpt-00000024.pt").write_bytes(b"x" * 100)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    for kwargs in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(CheckpointError, match=f"in use by another run's Checkpoint \\(pid {holder.pid}\\)"):
            drive(Checkpoint(folder, **kwargs), steps_per_epoch=2)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before
    holder.kill()  # kill -9: the kernel drops the lock, no stale lock is left behind
    holder.wait(timeout=30)
    drive(Checkpoint(folder, overwrite=True), steps_per_epoch=2)
    assert [p.name for p in Checkpoint(folder).checkpoints()] == ["ckpt-00000002.pt"]


def failing_save(message: str):
    def save(*args, **kwargs):
        raise RuntimeError(message)

    return save


def test_a_full_disk_is_said_in_plain_words_and_never_reported_as_saved(tmp_path, monkeypatch):
    from enginekit.plugins import CheckpointWriteError
    from enginekit.plugins import checkpoint as ckpt_module

    engine = make_engine([Checkpoint(tmp_path, every_steps=2)], steps_per_epoch=6)
    engine.fit(max_steps=2)
    size = (tmp_path / "ckpt-00000002.pt").stat().st_size
    monkeypatch.setattr(
        ckpt_module.torch, "save", failing_save("[enforce fail at inline_container.cc:672] unexpected pos")
    )
    monkeypatch.setattr(ckpt_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, size // 2))
    with pytest.raises(CheckpointWriteError) as info:
        engine.fit(max_steps=4)
    message = str(info.value)
    assert "could not write ckpt-00000004.pt: no space left on device (needs ~" in message
    assert "inline_container" not in message and "the newest checkpoint on disk is ckpt-00000002.pt" in message
    assert not list(tmp_path.glob(".ckpt-*.tmp")) and not (tmp_path / "ckpt-00000004.pt").exists()


def test_a_failed_save_on_sigterm_ends_with_the_failure_not_with_saved(tmp_path, monkeypatch):
    from enginekit.plugins import CheckpointWriteError
    from enginekit.plugins import checkpoint as ckpt_module

    class Term:
        @hookimpl
        def after_backward(self, engine):
            if engine.state.step == 1:
                signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(ckpt_module.torch, "save", failing_save("Permission denied"))
    with pytest.raises(CheckpointWriteError, match="could not write ckpt-00000002.pt: RuntimeError: Permission denied"):
        drive([Term(), Checkpoint(tmp_path)], steps_per_epoch=6)


def test_a_second_signal_during_a_save_abandons_it_and_says_so(tmp_path, monkeypatch):
    from enginekit.plugins import CheckpointWriteError
    from enginekit.plugins import checkpoint as ckpt_module

    def interrupted(self, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_module._HashingWriter, "write", interrupted)
    with pytest.raises(CheckpointWriteError, match="could not write ckpt-00000003.pt: interrupted by a second signal"):
        drive(Checkpoint(tmp_path), steps_per_epoch=3)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob(".ckpt-*.tmp"))


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
    assert "refusing to write ckpt-00000004.pt: the model's weights hold NaN or inf after step 4" in message
    assert "the newest checkpoint on disk is ckpt-00000002.pt" in message
    assert [p.name for p in Checkpoint(tmp_path).checkpoints()] == ["ckpt-00000002.pt"]


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
    expected = [] if steps == 0 else [f"ckpt-{steps:08d}.pt"]  # the last finished step, saved on the signal
    assert [p.name for p in Checkpoint(tmp_path).checkpoints()] == expected


def test_a_symlink_to_a_device_is_skipped_with_a_line_not_read(tmp_path, capsys):
    drive(Checkpoint(tmp_path, every_steps=2), steps_per_epoch=4)
    (tmp_path / "ckpt-00000099.pt").symlink_to("/dev/zero")
    (tmp_path / "ckpt-00000099.pt.sha256").write_text("0" * 64 + "  ckpt-00000099.pt\n")
    start = time.perf_counter()
    engine = make_engine([Checkpoint(tmp_path, resume=True)], steps_per_epoch=4)
    engine.fit(epochs=2)
    assert time.perf_counter() - start < 30
    out = capsys.readouterr().out
    assert "skipping ckpt-00000099.pt: not a regular file" in out and "resumed from ckpt-00000004.pt" in out


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
    for f in (tmp_path / "b").glob("ckpt-00000004.pt*"):
        shutil.copy(f, tmp_path / "c" / f.name)
    cut = make_engine([Checkpoint(tmp_path / "c", resume=True)], steps_per_epoch=4, lr=0.05)
    cut.fit(epochs=2, max_steps=6)  # stops mid-epoch: a pending position for a later fit in this engine
    cut.plugins["checkpoint"].resume = True  # ...but the next fit resumes from the epoch-end checkpoint
    for f in (tmp_path / "c").glob("ckpt-0000000[56].pt*"):
        f.unlink()
    cut.fit(epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(cut.model.parameters(), reference.model.parameters()))


# ---------------------------------------------------------------- background writes (issue 15)


class SlowWrites:
    """Holds every checkpoint write 0.3 s before its rename and records how many overlap."""

    def __init__(self) -> None:
        self.running = self.most = 0
        self.finished: list[tuple[str, float]] = []

    def __call__(self, tmp: Path) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        time.sleep(0.3)
        self.running -= 1
        self.finished.append((tmp.name, time.perf_counter()))


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
    first_ckpt_done = next(t for name, t in slow.finished if name.startswith(".ckpt-00000002.pt."))
    assert any(
        step == 2 and t < first_ckpt_done for step, t in steps_done
    )  # step 2 ran while step 2's ckpt was written
    assert slow.most == 1  # never two writes at once: the next save waited
    names = [p.name for p in Checkpoint(tmp_path).checkpoints()]
    assert names == ["ckpt-00000006.pt", "ckpt-00000004.pt", "ckpt-00000002.pt"]  # all on disk when fit returned
    assert all(Checkpoint(tmp_path).verify(p) is None for p in Checkpoint(tmp_path).checkpoints())


@pytest.mark.parametrize("device", DEVICES)
def test_background_and_synchronous_checkpoints_hold_the_same_state(tmp_path, device):
    # saves after steps 4 and 8 are written in the background (the second into the first's
    # reused buffers; on CUDA pinned, copied without blocking); the last one, after step 12, in
    # the foreground
    for mode in (True, False):
        torch.manual_seed(0)
        checkpoint = Checkpoint(tmp_path / str(mode), async_write=mode, keep_last=5)
        drive([LossTracker(eval_freq=2), checkpoint], epochs=3, steps_per_epoch=4, device=device)
    for name in ("ckpt-00000004.pt", "ckpt-00000008.pt", "ckpt-00000012.pt"):
        a = Checkpoint(tmp_path / "True").load(tmp_path / "True" / name)
        b = Checkpoint(tmp_path / "False").load(tmp_path / "False" / name)
        assert a["plugins"] == b["plugins"] and a["settings"] == b["settings"]
        assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
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
    for f in (tmp_path / "a").glob("ckpt-00000006.pt*"):  # mid-epoch 1, written in the background
        shutil.copy(f, tmp_path / "b" / f.name)
    resumed, steps_run = run(tmp_path / "b", resume=True)
    assert steps_run == list(range(6, 12))  # only the steps after the checkpoint ran
    assert resumed.plugins["loss_tracker"].state_dict() == reference.plugins["loss_tracker"].state_dict()
    for a, b in zip(resumed.model.parameters(), reference.model.parameters()):
        assert a.device.type == device and torch.equal(a, b)


def test_background_saves_copy_into_the_same_host_buffers_and_the_last_save_needs_no_copy(tmp_path, monkeypatch):
    from enginekit.plugins import checkpoint as ckpt_module

    started = []

    class CountingThread(threading.Thread):
        def start(self) -> None:
            started.append(self.name)
            super().start()

    monkeypatch.setattr(ckpt_module.threading, "Thread", CountingThread)
    checkpoint = Checkpoint(tmp_path, every_steps=2, every_epoch=False, keep_last=5)
    buffers = []

    class Watch:
        @hookimpl
        def after_step(self, engine, loss):
            buffers.append([b.data_ptr() for b in checkpoint._host_copy._buffers])

    drive([Watch(), checkpoint], steps_per_epoch=6)
    # steps 0..5: saves after steps 2 and 4 in the background, after step 6 (the last) in the foreground
    # the host buffers are allocated ahead, after the first step, in a thread of their own
    assert started == ["enginekit-host-buffers", "enginekit-ckpt-00000002.pt", "enginekit-ckpt-00000004.pt"]
    assert buffers[2] and buffers[4] == buffers[2]  # the second copy went into the first one's buffers
    assert checkpoint._host_copy._buffers == []  # freed at the end of fit
    assert [p.name for p in checkpoint.checkpoints()] == ["ckpt-00000006.pt", "ckpt-00000004.pt", "ckpt-00000002.pt"]


def test_checkpoints_carry_no_crc32_and_leave_torchs_own_setting_alone(tmp_path):
    import zipfile

    drive([Checkpoint(tmp_path, every_steps=1, every_epoch=False)], steps_per_epoch=3)
    path = tmp_path / "ckpt-00000002.pt"
    with zipfile.ZipFile(path) as archive:
        records = [info for info in archive.infolist() if "/data/" in info.filename]
    assert records and all(info.CRC == 0 for info in records)  # the sha256 guards the file instead
    assert Checkpoint(tmp_path).verify(path) is None
    assert torch.serialization.get_crc32_options() is True  # the user's own torch.save still writes them


def test_a_failed_background_write_surfaces_at_the_next_step(tmp_path, monkeypatch):
    from enginekit.plugins import CheckpointWriteError
    from enginekit.plugins import checkpoint as ckpt_module

    monkeypatch.setattr(ckpt_module.torch, "save", failing_save("Read-only file system"))
    seen = []

    class Steps:
        @hookimpl
        def after_step(self, engine, loss):
            seen.append(engine.state.step)
            time.sleep(0.05)  # leave the background write time to fail

    with pytest.raises(CheckpointWriteError, match="could not write ckpt-00000002.pt: RuntimeError: Read-only"):
        drive([Steps(), Checkpoint(tmp_path, every_steps=2, every_epoch=False)], steps_per_epoch=10)
    assert seen[-1] <= 3  # at the step after the failed write, not at the end of the run


def _priorities_seen_by_writes(tmp_path, monkeypatch) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(scheduling policy, nice) of the thread at each file replace of a 4-step run saving every
    2 steps, and the main thread's before it."""
    from enginekit import files

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread scheduling is a Linux feature")

    def now():
        return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen = []
    monkeypatch.setattr(files, "before_replace", lambda tmp: seen.append(now()))
    main_before = now()
    drive([Checkpoint(tmp_path, every_steps=2, every_epoch=False)], steps_per_epoch=4)
    assert now() == main_before
    return seen, main_before


def _needs_idle_scheduling() -> None:
    """Skip where this process may not put a thread at SCHED_IDLE (some containers refuse it)."""
    allowed = []

    def probe():
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            allowed.append(True)
        except (OSError, AttributeError):
            pass

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    if not allowed:
        pytest.skip("SCHED_IDLE is refused here")


def test_background_writes_run_at_idle_priority_and_training_keeps_its_own(tmp_path, monkeypatch):
    _needs_idle_scheduling()
    seen, main = _priorities_seen_by_writes(tmp_path, monkeypatch)
    # two writes of ckpt-2 (the file, then its hash) in the background, two of ckpt-4 in the foreground
    assert [policy for policy, _ in seen] == [os.SCHED_IDLE, os.SCHED_IDLE, main[0], main[0]]


def test_where_idle_scheduling_is_refused_the_writer_runs_at_nice_19(tmp_path, monkeypatch):
    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    seen, main = _priorities_seen_by_writes(tmp_path, monkeypatch)
    assert seen == [(main[0], 19), (main[0], 19), main, main]


def _host_buffers_made(tmp_path, monkeypatch, **checkpoint_kwargs) -> list[tuple[str, int, torch.dtype]]:
    """(thread name, scheduling policy, dtype) of each host buffer a 6-step run with 3 weights allocates."""
    from enginekit.plugins import checkpoint as ckpt_module

    made = []
    real = ckpt_module._host_buffer

    def host_buffer(shape, dtype):
        made.append((threading.current_thread().name, os.sched_getscheduler(0), dtype))
        return real(shape, dtype)

    monkeypatch.setattr(ckpt_module, "_host_buffer", host_buffer)
    checkpoint = Checkpoint(tmp_path, **checkpoint_kwargs)
    drive([checkpoint], steps_per_epoch=6, param_groups=3)
    assert checkpoint.verify(tmp_path / "ckpt-00000006.pt") is None
    return made


def test_the_weights_host_buffers_are_allocated_ahead_at_idle_priority(tmp_path, monkeypatch):
    _needs_idle_scheduling()
    made = _host_buffers_made(tmp_path, monkeypatch, every_steps=2, every_epoch=False)
    ahead = ("enginekit-host-buffers", os.SCHED_IDLE, torch.float32)
    # the 3 weights' buffers before the first save; that save adds only the engine's own tensors
    # (RNG states, counters: no float weights), and the second save (step 4) reuses them all;
    # step 6 is written without a copy
    assert made[:3] == [ahead] * 3
    assert made[3:] and all(name == "MainThread" and dtype != torch.float32 for name, _, dtype in made[3:])


@pytest.mark.parametrize(
    "kwargs", [{"every_steps": 2, "async_write": False}, {"every_epoch": True}], ids=["synchronous", "last-save-only"]
)
def test_no_host_buffers_are_allocated_where_no_background_save_lies_ahead(tmp_path, monkeypatch, kwargs):
    assert _host_buffers_made(tmp_path, monkeypatch, **kwargs) == []


def test_a_wait_cut_short_by_a_second_signal_still_leaves_the_write_to_be_waited_for(tmp_path):
    checkpoint = Checkpoint(tmp_path)
    joins = []

    class Writer:  # a background write whose first join a second Ctrl-C interrupts
        def join(self):
            joins.append(1)
            if len(joins) == 1:
                raise KeyboardInterrupt

    checkpoint._writer = Writer()
    with pytest.raises(KeyboardInterrupt):
        checkpoint.wait()
    checkpoint.wait()  # as on_exception does next: the write in flight is joined again
    assert len(joins) == 2 and checkpoint._writer is None


def test_the_non_finite_weight_check_is_not_fooled_by_a_sum_that_overflows():
    from enginekit.plugins.checkpoint import _first_nonfinite

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


def test_a_checkpoint_goes_to_disk_slice_by_slice_and_still_verifies(tmp_path, monkeypatch):
    from enginekit.plugins import checkpoint as ckpt_module

    synced = []
    monkeypatch.setattr(ckpt_module, "_set_direct", lambda fd, on: False)  # a filesystem without O_DIRECT
    monkeypatch.setattr(ckpt_module._HashingWriter, "SLICE", 512)
    monkeypatch.setattr(
        ckpt_module, "_fdatasync", lambda fd: synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name[:18])
    )
    checkpoint = Checkpoint(tmp_path, every_steps=2, every_epoch=False)
    drive([checkpoint], steps_per_epoch=4)
    path = tmp_path / "ckpt-00000004.pt"
    # both checkpoints (22 KB each), the background one and the last (foreground) one, slice after
    # slice before their final fsync
    assert synced.count(".ckpt-00000002.pt.") >= 2 and synced.count(".ckpt-00000004.pt.") >= 2
    assert checkpoint.verify(path) is None and checkpoint.verify(tmp_path / "ckpt-00000002.pt") is None
    assert checkpoint.load(path)["engine"]["step"] == 4


@pytest.fixture
def direct_writes(tmp_path, monkeypatch):
    """Where tmp_path takes O_DIRECT: 8 KB blocks (a 22 KB checkpoint spans several), and a
    function that puts a fake in place of the writer's direct ``os.write``."""
    from enginekit.plugins import checkpoint as ckpt_module

    with open(tmp_path / "probe", "wb") as f:
        if not ckpt_module._set_direct(f.fileno(), True):
            pytest.skip("this filesystem has no O_DIRECT")
    monkeypatch.setattr(ckpt_module._HashingWriter, "BLOCK", 8192)
    return lambda write: monkeypatch.setattr(ckpt_module, "_os_write", write)


def test_a_checkpoint_written_past_the_page_cache_is_cut_to_its_length_and_verifies(tmp_path, direct_writes):
    blocks: list[int] = []

    def write(fd, data):
        blocks.append(len(data))
        return os.write(fd, data)

    direct_writes(write)
    checkpoint = Checkpoint(tmp_path / "ckpts", every_steps=2, every_epoch=False)
    drive([checkpoint], steps_per_epoch=4)
    for name in ("ckpt-00000002.pt", "ckpt-00000004.pt"):  # one background write, one foreground
        path = tmp_path / "ckpts" / name
        assert checkpoint.verify(path) is None
        assert path.stat().st_size % 4096 != 0  # the padding of the last block was cut off
        assert checkpoint.load(path)["engine"]["step"] == int(name[5:13])
    assert blocks and all(n % 4096 == 0 for n in blocks)  # only whole aligned blocks reached the file
    assert blocks.count(8192) >= 4


@pytest.mark.parametrize("tail_only", [False, True], ids=["refused-at-once", "refused-at-the-padded-tail"])
def test_a_device_that_refuses_a_direct_write_gets_the_rest_through_the_page_cache(
    tmp_path, monkeypatch, direct_writes, tail_only
):
    import errno

    from enginekit.plugins import checkpoint as ckpt_module

    refused = []
    real_finish = ckpt_module._HashingWriter.finish
    finishing = [False]

    def finish(self):
        finishing[0] = True
        try:
            real_finish(self)
        finally:
            finishing[0] = False

    def write(fd, data):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and (finishing[0] or not tail_only):
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return os.write(fd, data)

    monkeypatch.setattr(ckpt_module._HashingWriter, "finish", finish)
    direct_writes(write)
    checkpoint = Checkpoint(tmp_path, every_steps=2, every_epoch=False)
    drive([checkpoint], steps_per_epoch=4)
    assert len(refused) == 2  # each save tried once, then wrote the rest through the page cache
    assert all(checkpoint.verify(p) is None for p in checkpoint.checkpoints())
    assert checkpoint.load(tmp_path / "ckpt-00000004.pt")["engine"]["step"] == 4


def test_a_short_direct_write_is_finished_through_the_page_cache(tmp_path, direct_writes):
    calls = []

    def write(fd, data):
        calls.append(len(data))
        return os.write(fd, data[: len(data) // 2 if len(calls) == 2 else len(data)])  # the 2nd block: half

    direct_writes(write)
    checkpoint = Checkpoint(tmp_path, every_steps=4, every_epoch=False, async_write=False)
    drive([checkpoint], steps_per_epoch=4)
    assert calls[:2] == [8192, 8192] and len(calls) == 2  # then buffered: no more direct writes
    path = tmp_path / "ckpt-00000004.pt"
    assert checkpoint.verify(path) is None and checkpoint.load(path)["engine"]["step"] == 4


class Table:
    """A plugin whose state is one 80 KB tensor, counting the steps: a record big enough to be
    written from its own memory once ``FROM_SOURCE_MIN`` is 16 KB."""

    def __init__(self) -> None:
        self.table = torch.zeros(20_000)

    @hookimpl
    def after_step(self, engine, loss):
        self.table += 1

    def state_dict(self):
        return {"table": self.table}

    def load_state_dict(self, state):
        self.table = state["table"].clone()


def _from_source(data) -> bool:
    """A write that comes from the record's own memory, not from the writer's mmap block."""
    import mmap

    return not isinstance(memoryview(data).obj, mmap.mmap)


@pytest.fixture
def big_records(monkeypatch, direct_writes):
    from enginekit.plugins import checkpoint as ckpt_module

    monkeypatch.setattr(ckpt_module._HashingWriter, "FROM_SOURCE_MIN", 16384)
    return direct_writes


def _table_at(checkpoint, path):
    assert checkpoint.verify(path) is None
    return checkpoint.load(path)["plugins"]["table"]["table"]


def test_a_background_save_writes_big_records_from_the_host_copy_itself(tmp_path, big_records):
    import fcntl

    writes: list[tuple[int, bool, bool]] = []

    def write(fd, data):
        done = os.write(fd, data)  # an attempt the device refuses raises here and is not counted
        if ".ckpt-00000002.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            writes.append((done, _from_source(data), bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)))
        return done

    big_records(write)
    checkpoint = Checkpoint(tmp_path, every_steps=2, every_epoch=False, async_write=True)
    drive([checkpoint, Table()], steps_per_epoch=4)
    assert torch.equal(_table_at(checkpoint, tmp_path / "ckpt-00000002.pt"), torch.full((20_000,), 2.0))
    assert torch.equal(_table_at(checkpoint, tmp_path / "ckpt-00000004.pt"), torch.full((20_000,), 4.0))
    # the background save: the table's aligned bulk went out whole from the host copy, past the page cache
    assert (20_000 * 4 // 4096 * 4096, True, True) in writes
    assert all(n % 4096 == 0 and direct for n, _, direct in writes)


def test_memory_the_device_refuses_goes_through_the_block_and_writes_stay_direct(tmp_path, big_records):
    import errno
    import fcntl

    refused, blocks_after = [], []

    def write(fd, data):
        if _from_source(data):
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")  # as for memory not aligned as the device wants
        if refused:
            blocks_after.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        return os.write(fd, data)

    big_records(write)
    checkpoint = Checkpoint(tmp_path, every_steps=2, every_epoch=False)
    drive([checkpoint, Table()], steps_per_epoch=4)
    assert refused and blocks_after and all(blocks_after)
    assert torch.equal(_table_at(checkpoint, tmp_path / "ckpt-00000002.pt"), torch.full((20_000,), 2.0))
    assert torch.equal(_table_at(checkpoint, tmp_path / "ckpt-00000004.pt"), torch.full((20_000,), 4.0))


def test_a_short_write_from_a_record_is_finished_through_the_page_cache(tmp_path, big_records):
    calls = []  # of the background save at step 4

    def write(fd, data):
        if ".ckpt-00000004.pt." not in os.readlink(f"/proc/self/fd/{fd}"):
            return os.write(fd, data)
        calls.append(_from_source(data))
        # the first write from a record's memory stops after 16 KB, as a nearly full disk might
        return os.write(fd, data[:16384] if calls[-1] and calls.count(True) == 1 else data)

    big_records(write)
    checkpoint = Checkpoint(tmp_path, every_steps=4, every_epoch=False)
    drive([checkpoint, Table()], steps_per_epoch=4, epochs=2)
    assert calls.count(True) == 1 and calls[-1] is True  # then no direct write at all
    assert torch.equal(_table_at(checkpoint, tmp_path / "ckpt-00000004.pt"), torch.full((20_000,), 4.0))


def test_a_big_records_hash_runs_beside_its_write_at_the_writers_priority_and_in_file_order(tmp_path, monkeypatch):
    import hashlib

    from enginekit.plugins import checkpoint as ckpt_module

    updates = []  # (thread, scheduling policy, bytes) of each sha256 update of a checkpoint file
    real_sha256 = hashlib.sha256

    class SlowSha:
        """sha256 whose big updates take long: a writer that did not wait for them would hash
        the next bytes first, and the file would not verify."""

        def __init__(self):
            self._sha = real_sha256()

        def update(self, data):
            updates.append((threading.current_thread().name, os.sched_getscheduler(0), len(data)))
            if len(data) >= 16384:
                time.sleep(0.05)
            self._sha.update(data)

        def hexdigest(self):
            return self._sha.hexdigest()

    _needs_idle_scheduling()
    monkeypatch.setattr(ckpt_module.hashlib, "sha256", SlowSha)
    monkeypatch.setattr(ckpt_module._HashingWriter, "HASH_BESIDE_MIN", 16384)
    checkpoint = Checkpoint(tmp_path, every_steps=2, every_epoch=False)
    drive([checkpoint, Table()], steps_per_epoch=4)
    monkeypatch.undo()  # verify with the real sha256
    assert torch.equal(_table_at(checkpoint, tmp_path / "ckpt-00000002.pt"), torch.full((20_000,), 2.0))
    assert torch.equal(_table_at(checkpoint, tmp_path / "ckpt-00000004.pt"), torch.full((20_000,), 4.0))
    beside = [(policy, n) for name, policy, n in updates if name.startswith("enginekit-sha256")]
    # the table, once per save: the background one's hash at idle priority, the last save's at the main thread's
    assert beside == [(os.SCHED_IDLE, 80_000), (os.sched_getscheduler(0), 80_000)]
    assert all(n < 16384 for name, _, n in updates if not name.startswith("enginekit-sha256"))


def test_a_full_disk_under_direct_writes_is_said_in_plain_words(tmp_path, direct_writes):
    import errno

    from enginekit.plugins import CheckpointWriteError

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    direct_writes(full)
    with pytest.raises(CheckpointWriteError, match=r"could not write ckpt-00000004.pt: no space left on device"):
        drive([Checkpoint(tmp_path, every_steps=4, every_epoch=False)], steps_per_epoch=4)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob(".ckpt-*.tmp"))


# ---------------------------------------------------------------- trust no file name, lock path or side file (issue 29)


def test_a_renamed_checkpoint_is_taken_for_the_step_it_holds_not_its_name(two_checkpoints, capsys):
    # an older checkpoint (and its hash) under a newer name: resuming from it would drop steps 3-6
    for suffix in ("", ".sha256"):
        shutil.copy(two_checkpoints / f"ckpt-00000003.pt{suffix}", two_checkpoints / f"ckpt-00000099.pt{suffix}")
    engine = resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert "skipping ckpt-00000099.pt: it holds step 3, not step 99 as its name says" in out
    assert "resumed from ckpt-00000006.pt (step 6" in out and engine.state.step == 7
    # set aside, so pruning keeps exactly keep_last and the next resume does not go back to it
    assert [p.name for p in Checkpoint(two_checkpoints).checkpoints()] == [
        "ckpt-00000007.pt",
        "ckpt-00000006.pt",
        "ckpt-00000003.pt",
    ]


def test_a_symlinked_candidate_or_hash_is_never_followed(two_checkpoints, capsys):
    (two_checkpoints / "ckpt-00000099.pt").symlink_to(two_checkpoints / "ckpt-00000003.pt")
    (two_checkpoints / "ckpt-00000099.pt.sha256").symlink_to(two_checkpoints / "ckpt-00000003.pt.sha256")
    engine = resume_engine(two_checkpoints)
    out = capsys.readouterr().out
    assert "skipping ckpt-00000099.pt: not a regular file (a symbolic link" in out
    assert "resumed from ckpt-00000006.pt (step 6" in out and engine.state.step == 7


_RESUME_IN_A_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a hash file read without end fails, not the machine
from enginekit.plugins import Checkpoint
path, _ = Checkpoint(sys.argv[1]).load_latest()
print("chose", path.name)
"""


@pytest.mark.parametrize("odd", ["fifo", "dev-zero"])
def test_an_odd_hash_file_beside_a_good_checkpoint_is_skipped_not_read(two_checkpoints, odd):
    sha = two_checkpoints / "ckpt-00000006.pt.sha256"
    sha.unlink()
    if odd == "fifo":
        os.mkfifo(sha)  # opened for reading, it blocks until a writer comes: forever
    else:
        sha.symlink_to("/dev/zero")  # read to its end, it grows memory without end
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
        pytest.fail("choosing a checkpoint hung on the odd .sha256 file (no answer in 120 s)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping ckpt-00000006.pt: its .sha256 file is not a regular file" in proc.stdout
    assert "chose ckpt-00000003.pt" in proc.stdout


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
    assert "Checkpoint: stopped by a second SIGTERM; the newest checkpoint on disk is ckpt-00000002.pt" in out
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_second_sigterm_during_a_save_abandons_it_says_so_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    from enginekit import TrainingAborted
    from enginekit.plugins import checkpoint as ckpt_module

    real_write = ckpt_module._HashingWriter.write
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
                monkeypatch.setattr(ckpt_module._HashingWriter, "write", write)
                signal.raise_signal(signal.SIGTERM)

    with pytest.raises(TrainingAborted) as info:
        drive([Term(), Checkpoint(tmp_path, every_steps=2, async_write=False)], steps_per_epoch=6)
    assert info.value.exit_code == 143
    out = capsys.readouterr().out
    assert (
        "Checkpoint: stopped by a second SIGTERM; abandoned the save of ckpt-00000004.pt; "
        "the newest checkpoint on disk is ckpt-00000002.pt" in out
    )
    assert [p.name for p in Checkpoint(tmp_path).checkpoints()] == ["ckpt-00000002.pt"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_second_sigterm_abandons_a_background_save_and_removes_its_temporary_file(tmp_path, monkeypatch, capsys):
    from enginekit import TrainingAborted
    from enginekit.plugins import checkpoint as ckpt_module

    real_write = ckpt_module._HashingWriter.write

    def write(self, data):
        if threading.current_thread().name.startswith("enginekit-ckpt"):
            self.abandon.wait(timeout=30)  # held until the signals come: a write in flight
        return real_write(self, data)

    monkeypatch.setattr(ckpt_module._HashingWriter, "write", write)
    with pytest.raises(TrainingAborted):
        drive([_two_sigterms_in("after_backward", 3), Checkpoint(tmp_path, every_steps=2)], steps_per_epoch=6)
    out = capsys.readouterr().out
    assert "Checkpoint: stopped by a second SIGTERM; abandoned the save of ckpt-00000002.pt" in out
    assert "no checkpoint is on disk yet" in out
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("ckpt-*"))


# ---------------------------------------------------------------- resume at an epoch boundary, the last step, finished


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
        "Checkpoint: ckpt-00000012.pt is the end of this run's plan (step 12 of 12): the run is already finished, "
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
