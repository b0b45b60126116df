"""Data-parallel training under torchrun: 2 CPU processes with gloo (runs in CI on 2 cores)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT

JOB = ROOT / "tests" / "ddp_job.py"
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def torchrun(out: Path, *args: str, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(JOB)]
    proc = subprocess.run([*cmd, str(out), *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def single(out: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(JOB), str(out), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def results(out: Path) -> list[dict]:
    return [torch.load(p, weights_only=True) for p in sorted(out.glob("result-rank*.pt"))]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun(out, "--per-rank-dirs")
    return out, proc


def test_weights_are_identical_on_both_ranks(two_ranks):
    out, _ = two_ranks
    r0, r1 = results(out)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["steps"] == r1["steps"] > 5
    assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])
    assert r0["train_losses"] == r1["train_losses"]  # losses are averaged over ranks


def test_only_rank_0_writes_files_and_prints(two_ranks):
    out, proc = two_ranks
    assert (out / "rank0" / "metrics" / "metrics.jsonl").exists()
    assert list((out / "rank0" / "checkpoints").glob("ckpt-*"))
    assert not (out / "rank1").exists()
    assert proc.stdout.count("Ep 1 (Iter 000000)") == 1


def test_tokens_are_counted_over_ranks(two_ranks):
    out, _ = two_ranks
    r0, _ = results(out)
    # per rank: steps x batch 2 x context 16; the run counts both ranks
    assert r0["tokens_seen"] == r0["steps"] * 2 * 2 * 16


def test_each_epoch_shards_one_shuffle_across_ranks_and_reshuffles(two_ranks):
    out, _ = two_ranks
    r0, r1 = results(out)
    for epoch in (0, 1):
        mine = [tuple(s) for e, rows in r0["seen"] if e == epoch for s in rows]
        theirs = [tuple(s) for e, rows in r1["seen"] if e == epoch for s in rows]
        assert mine and not set(mine) & set(theirs)  # disjoint shards of one permutation
    epoch0 = [rows for e, rows in r0["seen"] if e == 0]
    epoch1 = [rows for e, rows in r0["seen"] if e == 1]
    assert epoch0 != epoch1  # set_epoch changed the shuffle


def test_accumulation_under_ddp_equals_one_big_batch(tmp_path):
    # one epoch, 10 steps: the per-rank shards end unevenly, so later steps would not line up
    same = ["--no-dropout", "--no-shuffle", "--epochs", "1", "--max-steps", "10"]
    torchrun(tmp_path / "ddp", "--batch-size", "1", "--grad-accum", "2", *same)
    single(tmp_path / "one", "--batch-size", "4", *same)
    (ddp, _), (one,) = results(tmp_path / "ddp"), results(tmp_path / "one")
    assert ddp["steps"] == one["steps"] and ddp["lrs"] == one["lrs"]
    for key, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5)


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    torchrun(tmp_path / "ddp", "--batch-size", "1", "--no-dropout", "--no-shuffle")
    single(tmp_path / "one", "--batch-size", "2", "--no-dropout", "--no-shuffle")
    (ddp, _), (one,) = results(tmp_path / "ddp"), results(tmp_path / "one")
    assert ddp["steps"] == one["steps"] and ddp["lrs"] == one["lrs"]
    for key, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5)


def test_compiled_ddp_reading_every_3_steps_equals_eager_ddp_and_stops_all_ranks_together(tmp_path):
    same = ["--batch-size", "1", "--no-dropout", "--no-shuffle", "--epochs", "1"]
    torchrun(tmp_path / "eager", *same)
    # compile wraps DDP (as PyTorch documents); rank 1 alone asks to stop after step 4, between reads
    torchrun(tmp_path / "compiled", *same, "--compile", "aot_eager", "--sync-every", "3", "--stop-on-rank1-at", "4")
    (eager, _), (r0, r1) = results(tmp_path / "eager"), results(tmp_path / "compiled")
    assert r0["steps"] == r1["steps"] == 6  # both ranks left after the next read, at 6 finished steps
    assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])
    assert r0["lrs"] == eager["lrs"][:6]
    assert r0["train_losses"] == pytest.approx(eager["train_losses"][: len(r0["train_losses"])], rel=1e-5)


def test_interrupted_and_resumed_under_two_ranks_equals_uninterrupted(two_ranks, tmp_path):
    reference, _ = two_ranks
    out = tmp_path / "run"
    proc = torchrun(out, "--kill-at", "13", check=False)
    assert proc.returncode != 0
    names = sorted(p.name for p in (out / "checkpoints").glob("ckpt-*"))
    assert names[-1] == "ckpt-00000010"  # mid-epoch: 11 steps per epoch per rank
    torchrun(out, "--resume")
    ref0 = torch.load(reference / "result-rank0.pt", weights_only=True)
    for res in results(out):
        assert (
            res["steps"] == ref0["steps"] and res["lrs"] == ref0["lrs"] and res["train_losses"] == ref0["train_losses"]
        )
        assert all(torch.equal(res["model"][k], ref0["model"][k]) for k in ref0["model"])
    shutil.rmtree(out)


def test_the_example_runs_unchanged_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = ["--model", "tiny", "--epochs", "1", "--max-steps", "8", "--eval-freq", "4", "--out", str(tmp_path)]
    proc = subprocess.run(
        [*cmd, str(ROOT / "examples" / "pretrain_verdict.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        proc.stdout.count("Ep 1 (Iter 000000)") == 1
        and sum(line.startswith("Every effort moves you") for line in proc.stdout.splitlines()) == 1
    )
    assert "8 steps" in proc.stdout and (tmp_path / "model.pt").exists()


def test_every_rank_resumes_from_the_file_rank_0_chose_or_all_say_why_not(two_ranks, tmp_path):
    reference, _ = two_ranks
    shutil.copytree(reference / "rank0", tmp_path / "rank0")  # rank 1 gets its own, empty folder
    proc = torchrun(tmp_path, "--per-rank-dirs", "--resume", check=False)
    assert proc.returncode != 0
    newest = sorted(p.name for p in (tmp_path / "rank0" / "checkpoints").glob("ckpt-*"))[-1]
    said = f"rank 0 chose {newest} to resume from, but"
    assert proc.stderr.count(said) >= 2, proc.stderr  # both ranks raise the same clear error
    assert f"rank 1: cannot load {tmp_path / 'rank1' / 'checkpoints' / newest}" in proc.stderr
    assert not list((tmp_path / "rank0" / "checkpoints").glob("*.corrupt"))  # nothing renamed


def test_another_process_count_is_refused_by_the_documented_check(two_ranks, tmp_path):
    reference, _ = two_ranks
    shutil.copytree(reference / "rank0", tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, str(JOB), str(tmp_path / "run"), "--resume"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "was written by 2 process(es) but this run has 1; resume with the same number of processes" in proc.stderr


def test_background_checkpoint_writes_under_two_ranks(two_ranks, tmp_path):
    reference, _ = two_ranks
    torchrun(tmp_path, "--async-writes")
    from enginekit.plugins import Checkpoint

    ckpt = Checkpoint(tmp_path / "checkpoints")
    assert ckpt.checkpoints() and all(ckpt.verify(p) is None for p in ckpt.checkpoints())
    ref0 = torch.load(reference / "result-rank0.pt", weights_only=True)
    for res in results(tmp_path):
        assert all(torch.equal(res["model"][k], ref0["model"][k]) for k in ref0["model"])


@pytest.mark.parametrize("device", ["meta", "xla"])
def test_a_device_that_cannot_train_is_one_line_naming_it(device):
    from enginekit.distributed import resolve_device

    with pytest.raises(ValueError, match=f"device '{device}'") as info:
        resolve_device(device)
    assert "\n" not in str(info.value) and "auto" in str(info.value)
