"""The distribution: a wheel holds enginekit, enginekit.plugins, the data files and py.typed,
and nothing installs a top-level module called ``plugins``."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--quiet", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("enginekit-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_contents(wheel):
    names = set(wheel.namelist())
    for required in (
        "enginekit/__init__.py",
        "enginekit/py.typed",
        "enginekit/plugins/__init__.py",
        "enginekit/plugins/lr_warmup.py",
        "enginekit/plugins/checkpoint.py",
        "enginekit/_data/the-verdict.txt",
        "enginekit/_data/ATTRIBUTION.md",
        "enginekit/_data/gpt2/encoder.json",
        "enginekit/_data/gpt2/vocab.bpe",
    ):
        assert required in names, required
    assert not any(n.startswith(("plugins/", "tests/", "examples/", "benchmarks/")) for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = wheel.read(meta).decode()
    for dep in ("torch>=2.13", "tiktoken", "pluggy", "tqdm"):
        assert f"Requires-Dist: {dep}" in text
    entry_points = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "enginekit = enginekit.cli:main" in entry_points


def test_the_wheel_installs_and_imports_outside_the_source_tree(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), wheel.filename],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    code = (
        "import enginekit, enginekit.plugins as p; from enginekit.data import gpt2_tokenizer, load_verdict; "
        "print(enginekit.__file__); print(p.LRWarmup.__module__); print(len(gpt2_tokenizer().encode(load_verdict())))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(target)}
    )
    assert out.returncode == 0, out.stderr
    file, module, n_tokens = out.stdout.split()
    assert file.startswith(str(target)) and module == "enginekit.plugins.lr_warmup" and n_tokens == "5145"


def test_the_lowest_torch_promised_is_the_one_the_tests_run():
    import re

    import torch

    project = (ROOT / "pyproject.toml").read_text()
    lowest = tuple(int(x) for x in re.search(r'"torch>=(\d+)\.(\d+)"', project).groups())
    makefile = (ROOT / "Makefile").read_text()
    pinned = tuple(int(x) for x in re.search(r"TORCH \?= torch==(\d+)\.(\d+)", makefile).groups())
    running = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert lowest == pinned == running, "raise the requirement to what the tests run, or run them on the lowest"
