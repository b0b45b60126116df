"""Randomized fault injection: kill -9 the example at random moments, resume, compare with an
uninterrupted run; then the same with hostile files (renamed and symlinked candidates, odd
manifests, a file for a folder, deleted locks) and double SIGTERMs. Seeded (the same moments every run).

Time budgets come from the reference run measured on the same machine, so a loaded machine makes
the test slower, not red; a run that still overstays its budget is reported as a time-out."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

CHAOS = ROOT / "tests" / "chaos_example.py"
ARGS = ["--model", "tiny", "--epochs", "2", "--save-every", "1", "--keep-last", "2", "--no-progress"]
REFERENCE_CAP_S = 1800.0  # only the reference run has no measure to scale from: a cap, generous
KILLS = 3


def budget(ref_time: float) -> float:
    """How long any one run may take: ten times the reference run, and never under two minutes."""
    return max(120.0, 10.0 * ref_time)


def wait(proc: subprocess.Popen, timeout: float, what: str) -> int:
    """``proc``'s exit status; past ``timeout``, the test fails saying it timed out (never a wrong result)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{what} timed out after {timeout:.0f} s: the machine is too slow or the run hangs")


def start(out, *extra, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    # One thread per run: resuming from each of 38 checkpoints of this job in turn, one resumed run
    # in 38 ended a few ulps off, in a grad norm, and the same resume run again was bit-exact. So
    # two-thread CPU kernels vary in their last bits now and then, which is not what this test is
    # about (resume; my reading, not proven, is thread timing). One-thread kernels leave it no room.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(CHAOS), *ARGS, "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, float]:
    """The uninterrupted run's folder and how long it took here."""
    out = tmp_path_factory.mktemp("ref")
    t0 = time.monotonic()
    proc = start(out)
    assert wait(proc, REFERENCE_CAP_S, "the uninterrupted reference run") == 0, proc.stderr.read()
    return out, time.monotonic() - t0


def assert_same_result(out: Path, ref: Path) -> None:
    ref_model = torch.load(ref / "model.pt", weights_only=True)
    model = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(model[k], v) for k, v in ref_model.items())
    assert (out / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()


def test_a_run_past_its_budget_is_reported_as_a_time_out_not_a_wrong_result():
    assert budget(1.0) == 120.0 and budget(60.0) == 600.0  # scales with the machine, never tight
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(pytest.fail.Exception, match="a sleeper timed out after 0 s"):
        wait(proc, 0.2, "a sleeper")
    assert proc.returncode is not None  # killed, not left running


def test_random_kills_inside_steps_and_writes_resume_to_the_uninterrupted_result(tmp_path, reference):
    ref, ref_time = reference
    t0 = time.monotonic()
    rng = random.Random(20261129)
    out = tmp_path / "chaos"
    kills = in_writes = 0
    first = True
    while True:
        proc = start(out, *([] if first else ["--resume"]))
        first = False
        if kills < KILLS and time.monotonic() - t0 < 3 * budget(ref_time):
            try:  # a moment anywhere in the run: start-up, a step, an evaluation, a checkpoint write
                proc.wait(timeout=rng.uniform(0.3, 1.0) * ref_time)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                wait(proc, budget(ref_time), "a killed run's exit")
                kills += 1
                in_writes += any(  # killed inside a write: a checkpoint folder without its manifest yet
                    p.is_dir() and not (p / "manifest.json").exists() for p in (out / "checkpoints").glob("ckpt-*")
                )
                continue
        assert wait(proc, budget(ref_time), "the last resumed run") == 0, proc.stderr.read()
        break
    assert kills >= 1, "no kill landed: the run was faster than every chosen moment"
    print(f"{kills} kills, {in_writes} inside a checkpoint write")
    assert_same_result(out, ref)


# ---------------------------------------------------------------- hostile files and double SIGTERMs (issue 29)

_FAKE = 99999990  # names far past any real step: each claims to be the newest checkpoint


def _genuine(folder: Path) -> list[int]:
    """Steps of the complete checkpoints the job itself wrote (a real folder with its manifest), newest first."""
    steps = []
    for p in folder.glob("ckpt-*"):
        m = re.fullmatch(r"ckpt-(\d{8})", p.name)
        if m and int(m.group(1)) < _FAKE and not p.is_symlink() and p.is_dir() and (p / "manifest.json").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps, reverse=True)


def _plant(folder: Path, kind: str) -> None:
    """A hostile entry claiming to be newer than every real checkpoint, made from the oldest one."""
    oldest = folder / f"ckpt-{_genuine(folder)[-1]:08d}"
    fake = folder / f"ckpt-{_FAKE + len(list(folder.glob('ckpt-9999999*'))):08d}"
    if kind == "symlinked":
        fake.symlink_to(oldest)
        return
    if kind == "a-file":  # a file where a checkpoint folder is expected
        fake.write_bytes((oldest / "state.pt").read_bytes())
        return
    shutil.copytree(oldest, fake)  # "renamed": an older checkpoint, its manifest too, under a newer name
    manifest = fake / "manifest.json"
    if kind == "fifo":
        manifest.unlink()
        os.mkfifo(manifest)
    elif kind == "dev-zero":
        manifest.unlink()
        manifest.symlink_to("/dev/zero")


def _resumed_from(stdout: str) -> int | None:
    """The step a run resumed at, from its lines (also when it found the run already finished)."""
    found = re.search(r"resumed from ckpt-(\d{8})\b|ckpt-(\d{8}) is the end of this run's plan", stdout)
    return int(found.group(1) or found.group(2)) if found else None


def test_hostile_files_deleted_locks_and_double_sigterms_lose_nothing(tmp_path, reference):
    ref, ref_time = reference
    rng = random.Random(29)
    out = tmp_path / "hostile"
    ckpts = out / "checkpoints"
    limit = budget(ref_time)

    # 1. a double SIGTERM at a random moment: exit 143 naming SIGTERM, no temporary file left
    proc = start(out)
    time.sleep(rng.uniform(0.2, 0.5) * ref_time)
    proc.send_signal(signal.SIGTERM)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGTERM)
    code = wait(proc, limit, "a run stopped by two SIGTERMs")
    stderr = proc.stderr.read()
    assert code in (143, 0), stderr  # 0: it had finished before the first one
    assert "Ctrl-C" not in stderr and "Traceback" not in stderr
    assert not list(out.rglob("*.tmp"))
    if code == 0 or not _genuine(ckpts):
        pytest.skip("the signals came too late or too early for this machine's speed")

    # 2. renamed and symlinked candidates: resume from the true newest, never the impostors
    for round_, kinds in enumerate([("renamed", "symlinked"), ("fifo", "dev-zero", "a-file")]):
        for kind in kinds:
            _plant(ckpts, kind)
        newest = _genuine(ckpts)[0]
        proc = start(out, "--resume", stdout=subprocess.PIPE)
        if round_ == 0:
            # 3. a deleted lock while it runs: a second run with --overwrite is refused, nothing of the first lost
            seen = ""
            for line in proc.stdout:  # it holds its locks from here on
                seen += line
                if _resumed_from(line) is not None:
                    break
            for lock in (out / ".enginekit.lock", ckpts / ".enginekit.lock"):
                lock.unlink(missing_ok=True)
            proc.send_signal(signal.SIGSTOP)  # alive and holding the locks however long the intruder takes
            try:
                intruder = start(out, "--overwrite")
                assert wait(intruder, limit, "the refused second run") == 1
                assert "in use by another run" in intruder.stderr.read()
            finally:
                proc.send_signal(signal.SIGCONT)
            time.sleep(rng.uniform(0.0, 0.3) * ref_time)
            proc.send_signal(signal.SIGKILL)
            wait(proc, limit, "a killed run's exit")
            resumed = _resumed_from(seen + proc.stdout.read())
        else:
            code = wait(proc, limit, "the last resumed run")
            stdout = proc.stdout.read()
            assert code == 0, proc.stderr.read()
            resumed = _resumed_from(stdout)
        assert resumed == newest, f"round {round_}: resumed from {resumed}, the newest checkpoint was {newest}"
    assert_same_result(out, ref)
