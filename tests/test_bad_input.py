"""Every bad input gets one clear line naming what to fix: a growing list of cases.

Command line: argv -> exit status and the line on stderr. API: the call -> the exception and
its message. Add a case here when a user finds a new way in.
"""

from __future__ import annotations

import importlib.util
import math
import signal

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from enginekit import Engine, hookimpl
from enginekit.plugins import Checkpoint, CheckpointError, CosineDecay, EarlyStopping, GradClip, LRWarmup
from enginekit.testing import drive, make_engine

from conftest import ROOT


def example():
    spec = importlib.util.spec_from_file_location(
        "pretrain_verdict_bad_input", ROOT / "examples" / "pretrain_verdict.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli():
    return example()


CLI_CASES = [
    (["--min-lr", "nan"], 2, "argument --min-lr: must be a finite number >= 0, got nan"),
    (["--initial-lr", "nan"], 2, "argument --initial-lr: must be a finite number >= 0, got nan"),
    (["--peak-lr", "inf"], 2, "argument --peak-lr: must be a finite number > 0, got inf"),
    (["--peak-lr", "0"], 2, "argument --peak-lr: must be a finite number > 0, got 0"),
    (["--max-norm", "-1"], 2, "argument --max-norm: must be a finite number > 0, got -1"),
    (["--weight-decay", "-0.1"], 2, "argument --weight-decay: must be a finite number >= 0"),
    (["--warmup-fraction", "1.5"], 2, "argument --warmup-fraction: must be a finite number > 0 and < 1, got 1.5"),
    (["--warmup-fraction", "nan"], 2, "argument --warmup-fraction: must be a finite number > 0 and < 1"),
    (["--seed", "99999999999999999999999"], 2, "argument --seed: must be >= 0 and <= 18446744073709551615"),
    (["--max-steps", "0"], 2, "argument --max-steps: must be >= 1, got 0"),
    (["--max-steps", "-3"], 2, "argument --max-steps: must be >= 1, got -3"),
    (["--epochs", "1.5"], 2, "argument --epochs: expected a whole number, got '1.5'"),
    (["--batch-size", "0"], 2, "argument --batch-size: must be >= 1, got 0"),
    (["--device", "cuda"], 2, "--device: device 'cuda' is not available on this machine; it has: cpu"),
    (["--device", "cuda:7"], 2, "--device: device 'cuda:7' is not available on this machine; it has: cpu"),
    (["--device", "mps"], 2, "--device: device 'mps' is not available on this machine; it has: cpu"),
    (["--device", "tpu9"], 2, "--device: device 'tpu9' is not a device torch knows"),
]


@pytest.mark.parametrize("argv, status, line", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_command_line(cli, tmp_path, capsys, argv, status, line):
    if torch.cuda.is_available() and "--device" in argv:
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", "tiny", "--out", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert line in err
    assert "Traceback" not in err and err.count("error:") == 1


def test_an_out_that_is_a_file_is_refused_before_training(cli, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    assert cli.main(["--model", "tiny", "--no-checkpoint", "--out", str(out)]) == 2
    assert f"--out {out}: cannot write there" in capsys.readouterr().err


def test_ctrl_c_during_start_up_is_one_line_and_130(cli, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "verdict_loaders", interrupted)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    assert cli.main(["--model", "tiny", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted (Ctrl-C)"
    assert signal.getsignal(signal.SIGINT) is before


def tiny_loader() -> DataLoader:
    x = torch.randint(0, 10, (8, 4))
    return DataLoader(TensorDataset(x, x), batch_size=2)


def engine_with(**kwargs) -> Engine:
    model = torch.nn.Linear(4, 4)
    return Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), tiny_loader(), device="cpu", **kwargs)


def stand_in_fit(**fit_kwargs):
    return lambda: make_engine(steps_per_epoch=4).fit(**fit_kwargs)


def optimizer_lr(lr):
    def build():
        engine = make_engine(steps_per_epoch=2)
        engine.optimizer.param_groups[0]["lr"] = lr
        engine.fit()

    return build


class NearMiss:
    @hookimpl
    def after_step(self, engine, loss):
        pass

    def after_backwards(self, engine):  # undecorated typo: never called
        pass


API_CASES = [
    ("fit(epochs=nan)", stand_in_fit(epochs=math.nan), ValueError, "fit: epochs must be an int >= 1, got nan"),
    ("fit(epochs=1.5)", stand_in_fit(epochs=1.5), ValueError, "fit: epochs must be an int >= 1, got 1.5"),
    ("fit(max_steps=-3)", stand_in_fit(max_steps=-3), ValueError, "fit: max_steps must be an int >= 1, got -3"),
    ("fit(epochs=True)", stand_in_fit(epochs=True), ValueError, "fit: epochs must be an int >= 1, got True"),
    ("lr=inf", optimizer_lr(math.inf), ValueError, "optimizer: param group 0's lr must be a finite number >= 0"),
    ("lr=nan", optimizer_lr(math.nan), ValueError, "optimizer: param group 0's lr must be a finite number >= 0"),
    ("max_skips=nan", lambda: make_engine(max_skips=math.nan), ValueError, "max_skips must be an int >= 1, got nan"),
    ("grad_accum=2.0", lambda: engine_with(grad_accum_steps=2.0), ValueError, "grad_accum_steps must be an int >= 1"),
    ("min_lr=nan", lambda: CosineDecay(min_lr=math.nan), ValueError, "CosineDecay: min_lr must be a finite number"),
    ("peak_lr=inf", lambda: LRWarmup(2, peak_lr=math.inf), ValueError, "LRWarmup: peak_lr must be a finite number > 0"),
    ("initial_lr=nan", lambda: LRWarmup(2, initial_lr=math.nan), ValueError, "LRWarmup: initial_lr must be a finite"),
    ("fraction=nan", lambda: LRWarmup(warmup_fraction=math.nan), ValueError, "warmup_fraction must be between 0"),
    ("max_norm=inf", lambda: GradClip(max_norm=math.inf), ValueError, "GradClip: max_norm must be a finite number > 0"),
    ("min_delta=inf", lambda: EarlyStopping(min_delta=math.inf), ValueError, "EarlyStopping: min_delta must be a"),
    ("device=cuda", lambda: make_engine(device="cuda"), ValueError, "device 'cuda' is not available on this machine"),
    ("plugins=[None]", lambda: make_engine([None]), ValueError, "plugin 'none_type' (None) implements no hook"),
    ("plugins=[42]", lambda: make_engine([42]), ValueError, "plugin 'int' (42) implements no hook"),
    ("plugins=[object()]", lambda: make_engine([("thing", object())]), ValueError, "plugin 'thing' (<object"),
]


@pytest.mark.parametrize("what, call, error, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_api(what, call, error, message):
    if torch.cuda.is_available() and "cuda" in what:
        pytest.skip("this machine has a GPU")
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_an_undecorated_near_miss_of_a_hook_name_is_a_warning_with_the_fix():
    with pytest.warns(
        UserWarning,
        match="method 'after_backwards' is not a hook, so it is never called \\(did you mean 'after_backward'\\?\\)",
    ):
        make_engine([NearMiss()])


def test_a_checkpoint_of_another_model_is_one_line_with_details_on_request(tmp_path, tiny_cfg):
    from enginekit.gpt import GPTModel

    def engine_for(cfg, resume):
        torch.manual_seed(0)
        model = GPTModel(cfg)
        x = torch.randint(0, cfg["vocab_size"], (4, cfg["context_length"]))
        loader = DataLoader(TensorDataset(x, x), batch_size=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return Engine(model, opt, loader, plugins=[Checkpoint(tmp_path, resume=resume)], device="cpu")

    engine_for(tiny_cfg, False).fit()
    wider = engine_for({**tiny_cfg, "emb_dim": 32}, True)
    with pytest.raises(CheckpointError) as info:
        wider.fit(epochs=2)
    message = str(info.value)
    assert "\n" not in message
    assert (
        "ckpt-00000002 holds another model (" in message
        and "tok_emb.weight: (50257, 16) in the checkpoint" in message
    )
    assert len(info.value.details) > 10 and any("out_head.weight" in d for d in info.value.details)


def test_the_stand_in_kit_still_drives_a_good_plugin():
    # the refusals above must not catch ordinary plugins
    assert drive(LRWarmup(2), steps_per_epoch=4).engine.state.step == 4


def test_a_second_run_on_the_same_out_refuses_at_once_naming_the_holder(cli, tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "run"
    code = (
        "import time; from enginekit.files import lock_folder; "
        f"lock_folder({str(out)!r}); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli.main(["--model", "tiny", "--overwrite", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"error: {out} is in use by another run (pid {holder.pid})" in err and err.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == [".enginekit.lock"]  # nothing else touched or made
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_checkpoint_that_cannot_be_written_exits_4_saying_why(cli, tmp_path, capsys, monkeypatch):
    import shutil

    from enginekit.checkpointing import dcp, saving

    def full(self, data):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 0")

    monkeypatch.setattr(dcp._HashingStream, "write", full)  # every file DCP writes
    monkeypatch.setattr(saving.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    argv = ["--model", "tiny", "--max-steps", "2", "--warmup-steps", "1", "--no-progress", "--no-sample"]
    argv += ["--out", str(tmp_path / "run")]
    assert cli.main(argv) == 4
    err = capsys.readouterr().err
    assert "could not write ckpt-00000002: no space left on device" in err and "inline_container" not in err
    assert "no checkpoint is on disk yet" in err
