"""The layout enforces the design: plugins talk through the engine, never through each other.

The import contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them on
the installed layout, where plugins/ is the package enginekit.plugins.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytest.importorskip("importlinter")
tomllib = pytest.importorskip("tomllib")


def installed_layout(tmp_path: Path) -> Path:
    """enginekit/ with plugins/ inside it, as a wheel installs them, plus the contracts."""
    shutil.copytree(ROOT / "enginekit", tmp_path / "enginekit", ignore=shutil.ignore_patterns("__pycache__", "_data"))
    shutil.copytree(ROOT / "plugins", tmp_path / "enginekit" / "plugins", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def lint_imports(layout: Path) -> subprocess.CompletedProcess:
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", script, "--config", "pyproject.toml", "--no-cache"],
        cwd=layout,
        env={"PYTHONPATH": str(layout), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_contracts_are_kept(tmp_path):
    proc = lint_imports(installed_layout(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize(
    "where, source, broken",
    [
        ("plugins/grad_clip.py", "from . import lr_warmup", "No plugin module imports another plugin module"),
        ("enginekit/engine.py", "import enginekit.plugins.checkpoint", "No core module imports a plugin"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path, where, source, broken):
    layout = installed_layout(tmp_path)
    target = (
        layout / where.replace("plugins/", "enginekit/plugins/", 1) if where.startswith("plugins/") else layout / where
    )
    target.write_text(target.read_text() + f"\n{source}  # noqa\n")
    proc = lint_imports(layout)
    assert proc.returncode != 0
    assert f"{broken} BROKEN" in proc.stdout


def test_every_core_module_is_under_the_forbidden_contract():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    forbidden = next(c for c in config["contracts"] if c["type"] == "forbidden")
    core = {f"enginekit.{p.stem}" for p in (ROOT / "enginekit").glob("*.py") if p.stem != "__init__"}
    assert core == set(forbidden["source_modules"]), "add new core modules to the contract in pyproject.toml"
