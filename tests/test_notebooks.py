"""The notebooks run top to bottom, use only the public API, and are committed without outputs.

Each notebook's sizes live in its first code cell, tagged ``parameters`` (papermill's convention);
the run test injects a cell after it with tiny sizes (``TINY``): the notebooks' own SMALL
settings took ~4 minutes of the suite, and what is checked here is that every cell runs."""

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TINY = {
    "01_edge_of_stability.ipynb": "TOY_STEPS, MLP_STEPS = 200, 200",
    "02_adam_rod_flow.ipynb": "STEPS, STEPS_ADAMW = 250, 150",
    "03_sweeps.ipynb": "NUM_RATES = 3",
    "04_differentiating_through_flows.ipynb": (
        "GRID_RATES, MLP_RATES, REFERENCE_RUNS, ES_PAIRS, TUNE_ITERATIONS, MLP_STEPS = 3, 1, 5, 2, 1, 200"),
}


def _parameters_cell(nb):
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "one cell tagged 'parameters'"
    return tagged[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_sizes_are_parameters_the_tiny_run_overrides(path):
    """The override names exist in the parameters cell (so the tiny run really is tiny) and the
    cell comes before any other code."""
    nb = nbformat.read(path, as_version=4)
    i = _parameters_cell(nb)
    assert all(c.cell_type != "code" for c in nb.cells[:i])
    names = TINY[path.name].split("=")[0].replace(" ", "").split(",")
    for name in names:
        assert re.search(rf"^{name} = ", nb.cells[i].source, re.M), f"{path.name}: {name} is not a parameter"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs_and_private_imports(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip the outputs"
            assert not re.search(r"rodflow_jax\._|from rodflow_jax\.\w+ import|rf\._", cell.source), (
                f"{path.name} uses a private name"
            )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(_parameters_cell(nb) + 1, nbformat.v4.new_code_cell(TINY[path.name]))
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
