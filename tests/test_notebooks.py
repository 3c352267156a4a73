"""The notebooks, as a specification: each one runs top to bottom in a fresh kernel in fast mode
(UNINEXT_FAST=1: tiny data and epochs, the same code paths) without an error, and each committed notebook
carries the outputs of a full run, a Colab badge and a first cell that works on Colab and locally.

The executed copies are thrown away: the committed .ipynb files keep their full-run outputs. Together the
four fast runs take a few minutes at most on two CPU cores."""

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
MAX_BYTES = 2_000_000


def read(path):
    return nbformat.read(path, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_four_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_tour.ipynb", "02_train.ipynb", "03_attention.ipynb",
                                           "04_mixer_comparison.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_in_fast_mode(path, monkeypatch):
    monkeypatch.setenv("UNINEXT_FAST", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures inline, whatever CI sets
    nb = read(path)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, with the cell and the traceback, at the first error
    outputs = [o for c in code_cells(nb) for o in c.outputs]
    assert any(o.get("name") == "stdout" and "fast mode: True" in o.get("text", "") for o in outputs), \
        "the first cell must read UNINEXT_FAST"
    assert any("image/png" in o.get("data", {}) for o in outputs), "a notebook without a figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_carries_the_outputs_of_a_full_run(path):
    nb = read(path)
    cells = code_cells(nb)
    assert all(c.execution_count is not None for c in cells), "some cells were not run"
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), "not run top to bottom once"
    outputs = [o for c in cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any(o.get("name") == "stdout" and "fast mode: False" in o.get("text", "") for o in outputs), \
        "committed with the outputs of a fast run"
    assert path.stat().st_size < MAX_BYTES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_with_a_colab_badge_and_a_setup_cell_for_colab_and_local_runs(path):
    nb = read(path)
    badge = re.search(rf"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/notebooks/{path.name}",
                      nb.cells[0].source)
    assert badge, "no Colab badge for this notebook in the first cell"
    setup = code_cells(nb)[0].source
    assert f'REPO = "{badge.group(1)}"' in setup, "the badge and the REPO that the first cell clones differ"
    for needle in ('"google.colab" in sys.modules', "git", "clone", "sys.path.insert", "UNINEXT_FAST"):
        assert needle in setup


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_on_colab_the_placeholder_repository_stops_the_first_cell_with_what_to_set(path, monkeypatch):
    setup = code_cells(read(path))[0].source
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a[0]} with the placeholder"))
    with pytest.raises(SystemExit, match="REPO is still the placeholder"):
        exec(setup, {"__name__": "setup"})
