"""docs/hooks.md lists every hook (tests/test_docs.py runs its Python blocks, as every page's)."""

from __future__ import annotations

import re

from enginekit.registry import HOOK_NAMES

from conftest import ROOT

PAGE = (ROOT / "docs" / "hooks.md").read_text()


def test_the_table_has_one_row_per_hook_in_order():
    rows = re.findall(r"^\| `(\w+)\(", PAGE, re.M)
    assert rows == list(HOOK_NAMES)
