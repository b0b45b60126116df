"""docs/hooks.md is executed: its Python blocks run top to bottom in one namespace."""

from __future__ import annotations

import re

from enginekit.registry import HOOK_NAMES

from conftest import ROOT

PAGE = (ROOT / "docs" / "hooks.md").read_text()


def test_the_pages_python_blocks_run_as_written():
    blocks = re.findall(r"```python\n(.*?)```", PAGE, re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(ROOT / "docs" / "hooks.md"), "exec"), namespace)


def test_the_table_has_one_row_per_hook_in_order():
    rows = re.findall(r"^\| `(\w+)\(", PAGE, re.M)
    assert rows == list(HOOK_NAMES)
