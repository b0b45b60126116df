"""The main job, examples/pretrain_verdict.py, end to end in a subprocess (tiny model)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from book_reference import RefGPT
from conftest import ROOT

SCRIPT = ROOT / "examples" / "pretrain_verdict.py"


def _example_module():
    spec = importlib.util.spec_from_file_location("pretrain_verdict", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = _example_module().CONFIGS["tiny"]


def run_example(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def start_example(*args: str) -> subprocess.Popen:
    """The main job in a subprocess whose lines arrive as printed (to signal it at a chosen one)."""
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    proc = run_example("--model", "tiny", "--epochs", "2", "--max-steps", "50", "--eval-freq", "10", "--out", str(out))
    return proc, out


def test_tiny_run_exits_0_with_book_style_lines(tiny_run):
    proc, _ = tiny_run
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    evals = [line for line in lines if line.startswith("Ep ")]
    assert evals[0].startswith("Ep 1 (Iter 000000): Train loss 10.") and len(evals) == 5
    assert all(re.fullmatch(r"Ep [12] \(Iter \d{6}\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}", e) for e in evals)
    assert sum(line.startswith("Every effort moves you") for line in lines) == 2  # one sample per epoch
    assert "50 steps" in lines[-1]


def test_tiny_run_writes_weights_metrics_plots_and_checkpoints(tiny_run):
    _, out = tiny_run
    ref = RefGPT(TINY)
    ref.load_state_dict(torch.load(out / "model.pt", weights_only=True))  # the book's model loads it, strict
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 10, 20, 30, 40]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    for png in ("losses.png", "lr.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt-*")) == ["ckpt-00000036", "ckpt-00000050"]


def test_plot_lr_reproduces_the_books_demo_schedule_without_training(tmp_path):
    proc = run_example(
        "--plot-lr",
        "--initial-lr",
        "1e-4",
        "--peak-lr",
        "1e-2",
        "--warmup-steps",
        "20",
        "--min-lr",
        "1e-5",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "135 steps" in proc.stdout
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "model.pt").exists()


def test_help_explains_every_flag():
    proc = run_example("--help", timeout=60)
    assert proc.returncode == 0
    for flag in (
        "--model",
        "--epochs",
        "--max-steps",
        "--device",
        "--precision",
        "--seed",
        "--batch-size",
        "--peak-lr",
        "--initial-lr",
        "--min-lr",
        "--warmup-steps",
        "--warmup-fraction",
        "--max-norm",
        "--eval-freq",
        "--eval-iter",
        "--out",
        "--plot-lr",
        "--no-clip",
        "--no-cosine",
        "--save-every",
        "--resume",
    ):
        assert flag in proc.stdout


def test_bad_setting_is_a_clear_error_not_a_traceback(tmp_path):
    proc = run_example("--model", "tiny", "--epochs", "1", "--warmup-steps", "500", "--out", str(tmp_path))
    assert proc.returncode == 1
    assert "warmup_steps (500) must be smaller than the run's total_steps (36)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_checkpoints_the_last_finished_step_and_resume_equals_uninterrupted(tiny_run, tmp_path):
    import signal

    from enginekit.plugins import Checkpoint

    _, reference = tiny_run
    out = tmp_path / "run"
    args = ["--model", "tiny", "--epochs", "2", "--max-steps", "50", "--eval-freq", "10", "--out", str(out)]
    proc = start_example(*args)
    for line in proc.stdout:
        if line.startswith("Ep 1 (Iter 000010)"):
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    finished = int(re.search(r"interrupted by SIGTERM after (\d+) completed step", stderr).group(1))
    assert 11 <= finished < 36  # mid-epoch
    ckpt = Checkpoint(out / "checkpoints")
    newest = ckpt.checkpoints()[0]
    assert newest.name == f"ckpt-{finished:08d}" and ckpt.verify(newest) is None

    resumed = run_example(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from ckpt-{finished:08d}" in resumed.stdout
    ours, theirs = (
        torch.load(out / "model.pt", weights_only=True),
        torch.load(reference / "model.pt", weights_only=True),
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def test_installed_plugins_are_enabled_by_name(tmp_path):
    proc = run_example("--model", "tiny", "--max-steps", "3", "--plugin", "nope", "--out", str(tmp_path))
    assert proc.returncode == 1 and "no enginekit plugin named 'nope'" in proc.stderr
    pytest.importorskip("enginekit_ema")
    proc = run_example(
        "--model", "tiny", "--max-steps", "6", "--plugin", "ema", "--no-progress", "--out", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    from enginekit.plugins import Checkpoint

    from checkpoint_helpers import read_checkpoint

    payload = read_checkpoint(Checkpoint(tmp_path / "checkpoints").checkpoints()[0])
    assert payload["plugins"]["ema"]["updates"] == 6


def test_plugins_by_name_take_settings_and_the_run_lists_what_is_active(tmp_path):
    argv = ["--model", "tiny", "--max-steps", "3", "--no-progress", "--no-sample", "--warmup-steps", "1"]
    argv += ["--plugin", "early_stopping:patience=2,min_delta=0.05,monitor=train_loss", "--out", str(tmp_path)]
    proc = run_example(*argv)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    listed = lines[lines.index("plugins:") + 1 :]
    assert any(
        line.split()
        == ["early_stopping", "EarlyStopping(monitor='train_loss',", "patience=2,", "min_delta=0.05,", "mode='min')"]
        for line in listed
    )
    assert any(line.split()[:2] == ["lr_warmup", "LRWarmup(warmup_steps=1,"] for line in listed)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("early_stopping", ("early_stopping", {})),
        ("early_stopping:patience=2,min_delta=0.05", ("early_stopping", {"patience": 2, "min_delta": 0.05})),
        ("x:monitor=val_loss,flag=True,pair=(1, 2)", None),
    ],
)
def test_plugin_specs_parse_python_literals(spec, expected):
    parse = _example_module().plugin_spec
    if expected is None:  # a comma inside a value splits it: the spec is refused, not guessed
        with pytest.raises(argparse.ArgumentTypeError, match="is not SETTING=VALUE"):
            parse(spec)
    else:
        assert parse(spec) == expected
    assert parse("x:monitor=val_loss,flag=True") == ("x", {"monitor": "val_loss", "flag": True})


def test_rerunning_into_an_earlier_runs_folder_needs_resume_or_overwrite(tiny_run, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(tiny_run[1], out)
    args = ["--model", "tiny", "--max-steps", "6", "--no-progress", "--out", str(out)]
    proc = run_example(*args)
    assert proc.returncode == 1 and "already holds 2 checkpoint(s) of another run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert run_example(*args, "--overwrite").returncode == 0


def test_two_quick_sigterms_end_with_143_named_sigterm_and_leave_no_temporary_file(tmp_path):
    import signal
    import time

    from enginekit.plugins import Checkpoint

    out = tmp_path / "run"
    args = ["--model", "tiny", "--epochs", "2", "--max-steps", "50", "--eval-freq", "10", "--save-every", "1"]
    args.append("--no-progress")
    proc = start_example(*args, "--out", str(out))
    for line in proc.stdout:
        if line.startswith("Ep 1 (Iter 000010)"):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)  # the second one while the first's save point runs
            proc.send_signal(signal.SIGTERM)
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "SIGTERM" in stderr and "Ctrl-C" not in stderr and "Traceback" not in stderr
    assert not [p for p in out.rglob("*.tmp")]
    ckpt = Checkpoint(out / "checkpoints")
    assert ckpt.verify(ckpt.checkpoints()[0]) is None


def test_resuming_a_finished_run_says_so_in_one_line_and_exits_0(tmp_path):
    args = ["--model", "tiny", "--epochs", "1", "--max-steps", "3", "--no-warmup", "--no-progress"]
    args += ["--out", str(tmp_path)]
    assert run_example(*args).returncode == 0
    again = run_example(*args, "--resume")
    assert again.returncode == 0, again.stderr
    assert "already finished: 3 of 3 steps were done before, none was left to run" in again.stdout
    assert "done: 3 steps" not in again.stdout


def test_an_empty_out_is_one_line_not_a_run_in_the_current_folder(capsys):
    with pytest.raises(SystemExit) as info:
        _example_module().parse_args(["--out", ""])
    assert info.value.code == 2
    assert "--out: an empty path" in capsys.readouterr().err
