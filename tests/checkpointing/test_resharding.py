"""Checkpoints across strategies and world sizes (DCP reshards on load), a crash in the middle of a
sharded save and damaged shards: 2 CPU processes under torchrun (gloo), the tiny GPT of
tests/fsdp_job.py (dropout off, no shuffling; 10 steps per epoch on 2 ranks, 21 in one process).

One chain of four jobs (torchrun's start-up is paid twice), each case a ``--case`` of the job:

1. one process: ``one`` (a whole epoch, checkpoint at its end), ``one_mid`` (5 steps: a checkpoint
   in the middle of the epoch);
2. torchrun: ``fsdp`` (a checkpoint every 2 steps and at the epoch's end), ``ddp`` (at the end);
   resumes of copies of their checkpoints: ``one_to_fsdp``, ``ddp_to_fsdp``, ``fsdp_to_ddp``,
   ``mid_to_2`` (one_mid's, refused); last ``kill``: fsdp's run again, with rank 0 SIGKILLed on its
   2nd write into ckpt-00000006 (a background save), which ends the job;
3. one process: ``fsdp_to_one``, ``mid_to_1`` (kill's mid-epoch ckpt-00000004, refused);
4. torchrun: ``kill`` resumed in its own folder; ``damaged``, a copy of fsdp's checkpoints with the
   newest's rank-1 shard flipped and the one before's deleted.

"Exact" is ``torch.equal``: the whole model and every parameter's AdamW state (step, exp_avg,
exp_avg_sq, by parameter name, gathered from the shards) right after the resume against what the
writing run held at the save; and, after the crash and the damaged shards, the final weights against
the uninterrupted ``fsdp`` run's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from enginekit.checkpointing import Folder, read_manifest

from conftest import ROOT

JOB = ROOT / "tests" / "fsdp_job.py"
TIMEOUT = 300  # a hang fails the test instead of blocking the suite


def _job(out: Path, cases: list[list[str]], ranks: int) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    args = [str(out), "--steps", "0"] + [arg for case in cases for arg in ("--case", *case)]
    return subprocess.run([sys.executable, *launcher, str(JOB), *args], capture_output=True, text=True, timeout=TIMEOUT)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _committed(folder: Path) -> dict[str, bool]:
    return {p.name: (p / "manifest.json").is_file() for p in sorted(folder.iterdir()) if p.name.startswith("ckpt-")}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    out = tmp_path_factory.mktemp("resharding")
    seconds: dict[str, float] = {}
    procs: dict[str, subprocess.CompletedProcess] = {}

    start = time.monotonic()
    procs["one"] = _ok(_job(out, [["one", "fsdp", "dump"], ["one_mid", "fsdp", "steps=5"]], ranks=1))
    seconds["one process"] = time.monotonic() - start

    start = time.monotonic()
    two = _job(
        out,
        [
            ["fsdp", "fsdp", "every=2", "dump"],
            ["ddp", "ddp", "dump"],
            ["one_to_fsdp", "fsdp", "from=one", "allow", "dump"],
            ["ddp_to_fsdp", "fsdp", "from=ddp", "allow", "dump"],
            ["fsdp_to_ddp", "ddp", "from=fsdp", "allow", "dump"],
            ["mid_to_2", "fsdp", "from=one_mid", "allow"],
            ["kill", "fsdp", "every=2", "resume", "kill=ckpt-00000006:2"],  # last: it ends the job
        ],
        ranks=2,
    )
    seconds["torchrun"] = time.monotonic() - start
    if "== case kill" not in two.stdout or two.returncode == 0:
        pytest.fail("the 2-rank job did not reach its kill case or was not killed:\n" + two.stdout[-3000:] + two.stderr)
    procs["two"] = two
    after_kill = _committed(out / "kill" / "checkpoints")

    start = time.monotonic()
    back = [["fsdp_to_one", "fsdp", "from=fsdp", "allow", "dump"], ["mid_to_1", "fsdp", "from=kill", "allow"]]
    procs["back to one"] = _ok(_job(out, back, ranks=1))
    seconds["one process again"] = time.monotonic() - start

    damaged = out / "damaged" / "checkpoints"
    shutil.copytree(out / "fsdp" / "checkpoints", damaged)
    shard = damaged / "ckpt-00000010" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])  # same size: only the hash tells
    shard.write_bytes(bytes(data))
    (damaged / "ckpt-00000008" / "__1_0.distcp").unlink()

    start = time.monotonic()
    resumes = [["kill", "fsdp", "every=2", "resume"], ["damaged", "fsdp", "every=2", "resume"]]
    procs["resumed"] = _ok(_job(out, resumes, ranks=2))
    seconds["torchrun again"] = time.monotonic() - start
    print("resharding chain, seconds:", {k: round(v, 1) for k, v in seconds.items()})
    return {"out": out, "procs": procs, "after_kill": after_kill}


def case_output(proc: subprocess.CompletedProcess, name: str) -> str:
    """What rank 0 printed during one case of a job."""
    parts = re.split(r"^== case (\S+)$", proc.stdout, flags=re.M)
    found = [text for case, text in zip(parts[1::2], parts[2::2]) if case == name]
    assert len(found) == 1, f"case {name} not in the output:\n{proc.stdout[-3000:]}"
    return found[0]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_exact(saved: dict, resumed: dict) -> None:
    """The whole model and the AdamW state of every parameter, bit for bit, and a trained state at that."""
    assert resumed["step"] == saved["step"] and resumed["batches_in_epoch"] == saved["batches_in_epoch"] == 0
    assert saved["model"].keys() == resumed["model"].keys() and len(saved["model"]) == 33
    for key, value in saved["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert saved["optim"].keys() == resumed["optim"].keys() and len(saved["optim"]) == 31  # by parameter name
    for name, state in saved["optim"].items():
        assert state.keys() == resumed["optim"][name].keys() == {"step", "exp_avg", "exp_avg_sq"}, name
        for key, value in state.items():
            assert torch.equal(resumed["optim"][name][key], value), f"{name}.{key}"
        assert float(state["step"]) == saved["step"] and bool(state["exp_avg_sq"].any()), name  # not a fresh state


def test_a_2_rank_fsdp_checkpoint_resumes_in_one_process_exactly(chain):
    out = chain["out"]
    manifest = read_manifest(out / "fsdp_to_one" / "checkpoints" / "ckpt-00000010")  # the copy resumed from
    assert (manifest.world_size, manifest.strategy) == (2, "fsdp")
    assert {"__0_0.distcp", "__1_0.distcp"} <= manifest.files.keys()  # each rank wrote its shards
    assert load(out / "fsdp" / "result-rank0.pt")["sharded"] == "FSDPGPTModel"  # fully_shard really ran
    saved, resumed = load(out / "fsdp" / "saved-00000010.pt"), load(out / "fsdp_to_one" / "resumed.pt")
    assert (saved["world_size"], saved["strategy"], resumed["world_size"]) == (2, "fsdp", 1)
    assert resumed["resumed_from"] == "ckpt-00000010"
    assert_exact(saved, resumed)
    printed = case_output(chain["procs"]["back to one"], "fsdp_to_one")
    assert "engine.world_size: 2 in the checkpoint, 1 now" in printed  # allow_changes applies it, said


def test_a_one_process_checkpoint_resumes_on_2_fsdp_ranks_exactly(chain):
    out = chain["out"]
    saved, resumed = load(out / "one" / "saved-00000021.pt"), load(out / "one_to_fsdp" / "resumed.pt")
    assert (saved["world_size"], resumed["world_size"], resumed["strategy"]) == (1, 2, "fsdp")
    assert resumed["resumed_from"] == "ckpt-00000021"
    assert_exact(saved, resumed)
    printed = case_output(chain["procs"]["two"], "one_to_fsdp")
    assert "engine.train batches per epoch: 21 in the checkpoint, 10 now" in printed
    assert "engine.world_size: 1 in the checkpoint, 2 now" in printed


@pytest.mark.parametrize(("writer", "reader"), [("ddp", "ddp_to_fsdp"), ("fsdp", "fsdp_to_ddp")])
def test_ddp_and_fsdp_checkpoints_resume_under_the_other_strategy_exactly(chain, writer, reader):
    out = chain["out"]
    saved, resumed = load(out / writer / "saved-00000010.pt"), load(out / reader / "resumed.pt")
    assert saved["strategy"] == writer and resumed["strategy"] != writer
    assert saved["world_size"] == resumed["world_size"] == 2
    assert_exact(saved, resumed)


def test_kill_9_in_a_sharded_save_resumes_from_the_previous_checkpoint_to_the_uninterrupted_weights(chain):
    out, procs = chain["out"], chain["procs"]
    killed = procs["two"].stdout + procs["two"].stderr
    assert "exitcode  : -9" in killed and "Signal 9 (SIGKILL)" in killed  # rank 0 died, no clean-up ran
    # the save cut short has shards but no manifest: never a checkpoint
    assert chain["after_kill"] == {"ckpt-00000002": True, "ckpt-00000004": True, "ckpt-00000006": False}
    printed = case_output(procs["resumed"], "kill")
    assert "Checkpoint: resumed from ckpt-00000004 (step 4, epoch 1)" in printed
    assert "skipping" not in printed  # the unfinished save was cleared, not tried
    reference = load(out / "fsdp" / "result-rank0.pt")
    for rank in (0, 1):
        result = load(out / "kill" / f"result-rank{rank}.pt")
        assert result["steps"] == 10 and result["losses"] == reference["losses"][4:]  # steps 5 to 10
        for key, value in reference["model"].items():
            assert torch.equal(result["model"][key], value), key
    folder = Folder(out / "kill" / "checkpoints")
    assert [p.name for p in folder.checkpoints()] == ["ckpt-00000010", "ckpt-00000008", "ckpt-00000006"]
    for path in folder.checkpoints():
        folder.check(path, hash=True)  # the new ckpt-00000006 is a whole one


def test_a_flipped_shard_and_a_missing_shard_are_refused_in_one_line_each_and_the_previous_one_resumes(chain):
    out = chain["out"]
    printed = case_output(chain["procs"]["resumed"], "damaged")
    lines = printed.splitlines()
    flipped = [line for line in lines if "ckpt-00000010" in line and "sha256 mismatch" in line]
    assert len(flipped) == 1, printed
    one_line = r"Checkpoint: skipping ckpt-00000010: __1_0\.distcp: sha256 mismatch \(recorded \w+\.\.\., "
    assert re.fullmatch(one_line + r"file has \w+\.\.\.\): truncated or corrupted; trying the previous one", flipped[0])
    assert "Checkpoint: skipping ckpt-00000008: __1_0.distcp is missing; trying the previous one" in lines
    assert "Checkpoint: resumed from ckpt-00000006 (step 6, epoch 1)" in lines
    assert "Traceback" not in printed
    names = {p.name for p in (out / "damaged" / "checkpoints").iterdir()}
    assert {"ckpt-00000010.corrupt", "ckpt-00000008.corrupt"} <= names  # set aside, kept for a look
    reference = load(out / "fsdp" / "result-rank0.pt")
    for rank in (0, 1):
        result = load(out / "damaged" / f"result-rank{rank}.pt")
        assert result["losses"] == reference["losses"][6:]
        for key, value in reference["model"].items():
            assert torch.equal(result["model"][key], value), key


@pytest.mark.parametrize(
    ("case", "name", "written", "now", "batch"),
    [("mid_to_2", "ckpt-00000005", 1, 2, 5), ("mid_to_1", "ckpt-00000004", 2, 1, 4)],
)
def test_a_world_size_change_in_the_middle_of_an_epoch_is_refused_even_with_allow_changes(
    chain, case, name, written, now, batch
):
    out = chain["out"]
    message = (out / case / "error.txt").read_text()
    assert message == (
        f"{name} was written by {written} process(es) in the middle of epoch 1 (micro-batch {batch}) and this run "
        f"has {now}: the rest of that epoch's data order cannot be replayed on another number of processes; "
        f"resume with {written}, or from a checkpoint at an epoch's end"
    )
    assert not list((out / case).glob("result-rank*.pt"))  # refused before any step
    folder = Folder(out / case / "checkpoints")
    assert _committed(folder.path)[name]  # a refusal, not a damaged checkpoint: left as it is
    folder.check(folder.path / name, hash=True)
