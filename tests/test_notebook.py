"""docs/analysis.ipynb runs top to bottom on the workflow's outputs (nbclient); any error fails."""

from __future__ import annotations

import nbformat
import pytest
from _workflow import REPO, shared_small_run
from nbclient import NotebookClient

pytestmark = pytest.mark.slow


def test_analysis_notebook_runs_on_the_demo_outputs(tmp_path_factory):
    run = shared_small_run(tmp_path_factory)
    notebook = nbformat.read(REPO / "docs" / "analysis.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    # the notebook runs where results/ is, as a user would after `snakemake --cores 2`
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(run)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # the track, S_n, transition plots
