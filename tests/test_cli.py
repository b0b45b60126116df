from __future__ import annotations

import re
import shutil
import subprocess
import sys

from enginekit.cli import main


def test_plugins_lists_builtins_with_origin_and_hooks(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^lr_warmup +built-in \(enginekit.plugins.lr_warmup.LRWarmup\)$", out, re.M)
    assert "hooks: before_fit, after_evaluate, after_fit" in out  # early_stopping
    assert "settings: monitor='val_loss', patience=3, min_delta=0.0, mode='min'" in out  # with their defaults
    assert "settings: min_lr, peak_lr=None" in out  # cosine_decay: min_lr is required
    assert "hooks: before_fit, before_optimizer_step" in out  # grad_clip
    assert "run only when named" in out


def test_plugins_lists_installed_ones_with_their_distribution(capsys):
    import pytest

    pytest.importorskip("enginekit_ema")
    main(["plugins"])
    out = capsys.readouterr().out
    assert "ema" in out and "installed: enginekit-ema 0.1.0 (enginekit_ema:EMA)" in out


def test_hooks_prints_the_protocol_in_order(capsys):
    main(["hooks"])
    out = capsys.readouterr().out
    names = [
        line.split()[0]
        for line in out.splitlines()[1:]
        if line.startswith("  ") and not line.strip().startswith("called")
    ]
    expected = ["before_fit", "before_epoch", "before_step", "after_backward", "before_optimizer_step"]
    expected += ["after_step", "after_evaluate"]
    assert names == expected + ["on_save_point", "after_epoch", "after_fit", "on_exception"]


def test_hooks_shows_the_call_order_for_given_plugins(capsys):
    main(["hooks", "lr_warmup", "loss_tracker", "checkpoint"])
    lines = capsys.readouterr().out.splitlines()
    after_step = lines[lines.index(next(x for x in lines if x.strip().startswith("after_step"))) + 1]
    assert after_step.split("called: ")[1] == "loss_tracker(wrapper)"
    before_fit = lines[lines.index(next(x for x in lines if x.strip().startswith("before_fit"))) + 1]
    assert before_fit.split("called: ")[1] == "checkpoint(wrapper) -> loss_tracker -> lr_warmup"
    save_point = lines[lines.index(next(x for x in lines if x.strip().startswith("on_save_point"))) + 1]
    assert save_point.split("called: ")[1] == "checkpoint"


def test_console_script_is_installed():
    exe = shutil.which("enginekit") or [sys.executable, "-m", "enginekit.cli"]
    cmd = [exe, "hooks"] if isinstance(exe, str) else [*exe, "hooks"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "after_backward" in proc.stdout


def test_unknown_plugin_name_in_hooks_lists_known_ones(capsys):
    import pytest

    with pytest.raises(SystemExit, match="unknown plugin 'nope'; known: .*lr_warmup"):
        main(["hooks", "nope"])


def test_a_plugin_named_twice_in_hooks_is_one_line_not_a_traceback(capsys):
    import pytest

    with pytest.raises(SystemExit) as info:
        main(["hooks", "lr_warmup", "lr_warmup"])
    message = str(info.value.code)
    assert message.startswith("enginekit: plugin 'lr_warmup' is named twice") and "\n" not in message
