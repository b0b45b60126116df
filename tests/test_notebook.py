"""examples/appendix_d.ipynb is executed, so the notebook can't rot."""

from __future__ import annotations

import pytest

from conftest import ROOT


def test_the_appendix_d_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(ROOT / "examples" / "appendix_d.ipynb", as_version=4)
    assert "SMALL = True" in notebook.cells[1].source  # the test runs the small variant, in seconds
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "Ep 1 (Iter 000000)" in text and "steps, warmup" in text
    assert sum(1 for o in outputs if "image/png" in o.get("data", {})) == 2  # the LR plot and the loss plot
