"""The layout enforces the design: plugins talk through the engine, never through each other,
and plugins and examples use the public API only.

The import contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them on
the installed layout, where plugins/ is the package enginekit.plugins. What import-linter cannot
see (the examples are no package; attribute access to private names) an AST scan checks.
"""

from __future__ import annotations

import ast
import json
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
    assert "4 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize(
    "where, source, broken",
    [
        ("plugins/grad_clip.py", "from . import lr_warmup", "No plugin module imports another plugin module"),
        ("enginekit/engine.py", "import enginekit.plugins.checkpoint", "No core module imports a plugin"),
        ("plugins/grad_clip.py", "from enginekit.files import atomic_write", "Plugins use the public API only"),
        ("plugins/lr_warmup.py", "import enginekit.registry", "Plugins use the public API only"),
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


def contract(name: str) -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return next(c for c in config["contracts"] if c["name"] == name)


CORE = {f"enginekit.{p.stem}" for p in (ROOT / "enginekit").glob("*.py") if p.stem != "__init__"}
#: the core's packages, each module of which is a core module too (tests/<package>/test_<module>.py)
PACKAGES = sorted(p.parent.name for p in (ROOT / "enginekit").glob("*/__init__.py"))
CORE |= {f"enginekit.{pkg}" for pkg in PACKAGES}
for pkg in PACKAGES:
    CORE |= {f"enginekit.{pkg}.{p.stem}" for p in (ROOT / "enginekit" / pkg).glob("*.py") if p.stem != "__init__"}
#: what plugins and examples may import (enginekit.testing too, in their tests)
PUBLIC = {"enginekit", "enginekit.plugins", "enginekit.plugin_api", "enginekit.hookspec", "enginekit.log"}
PUBLIC |= {"enginekit.gpt", "enginekit.data", "enginekit.fast"}
#: the checkpoint machinery: Checkpoint's own parts, and what a custom checkpoint plugin builds on
PUBLIC |= {m for m in CORE if m.startswith("enginekit.checkpointing")}


def test_every_core_module_is_under_the_forbidden_contract():
    forbidden = contract("No core module imports a plugin")
    assert CORE == set(forbidden["source_modules"]), "add new core modules to the contract in pyproject.toml"


def test_every_core_module_is_public_or_kept_from_plugins():
    private = set(contract("Plugins use the public API only")["forbidden_modules"])
    assert private.isdisjoint(PUBLIC)
    assert CORE == (PUBLIC - {"enginekit", "enginekit.plugins"}) | private, (
        "a new core module is public (PUBLIC here, documented) or forbidden to plugins in pyproject.toml"
    )


def sources() -> list[tuple[str, str]]:
    """(name, code) of every Python file under plugins/ and examples/, notebooks' code cells included."""
    found = []
    for folder in ("plugins", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found.append((path.relative_to(ROOT).as_posix(), path.read_text()))
        for path in sorted((ROOT / folder).rglob("*.ipynb")):
            cells = json.loads(path.read_text())["cells"]
            code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
            found.append((path.relative_to(ROOT).as_posix(), code))
    return found


def private_uses(name: str, code: str) -> list[str]:
    """Imports of enginekit modules outside the public API, imports of ``_`` names from
    enginekit, and attribute access to ``_`` names of anything but ``self``/``cls`` and torch."""
    in_tests = "/tests/" in f"/{name}"
    allowed = PUBLIC | ({"enginekit.testing"} if in_tests else set())
    found = []
    for node in ast.walk(ast.parse(code, name)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "enginekit":
            if node.module not in allowed:
                found.append(f"{name}:{node.lineno}: from {node.module} import ...")
            found += [f"{name}:{node.lineno}: imports {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [
                f"{name}:{node.lineno}: import {a.name}"
                for a in node.names
                if a.name.split(".")[0] == "enginekit" and a.name not in allowed
            ]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            # self and cls are the code's own; torch and os (os._exit) are not enginekit
            if not (isinstance(base, ast.Name) and base.id in ("self", "cls", "torch", "os")):
                found.append(f"{name}:{node.lineno}: .{node.attr}")
    return found


def test_plugins_and_examples_use_no_private_name_of_enginekit():
    uses = [use for name, code in sources() for use in private_uses(name, code)]
    assert uses == []


@pytest.mark.parametrize(
    "code, use",
    [
        ("engine._precision.scaler", "._precision"),
        ("engine.metrics._put('x', 1, 0)", "._put"),
        ("from enginekit.files import atomic_write", "from enginekit.files import ..."),
        ("from enginekit.testing import drive", "from enginekit.testing import ..."),
        ("import enginekit.registry", "import enginekit.registry"),
        ("from enginekit.plugin_api import _Weights", "imports _Weights"),
    ],
)
def test_the_scan_finds_each_kind_of_private_use(code, use):
    assert [found.split(": ", 1)[1] for found in private_uses("examples/x.py", code)] == [use]
    assert private_uses("examples/pkg/tests/test_x.py", "from enginekit.testing import drive") == []


def test_every_core_module_has_its_test_file():
    def test_file(module: str) -> Path:
        parts = module.split(".")[1:]
        if len(parts) == 1 and parts[0] in PACKAGES:  # a package: its folder of tests
            return ROOT / "tests" / parts[0]
        return ROOT / "tests" / Path(*parts[:-1]) / f"test_{parts[-1]}.py"

    missing = sorted(m for m in CORE if not test_file(m).exists())
    assert missing == [], "tests mirror the source: add tests/test_<module>.py"
