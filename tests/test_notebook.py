"""notebooks/tinyfast.ipynb runs end to end, as a user would run it, and is kept without outputs.

The kernel runs in a scratch folder with no network to the official zip, so the notebook takes its own
no-network path: the generated demo set. For the suite's time, the run is shortened the way papermill
parameterises a notebook: one injected cell after the cell tagged "parameters" (1 epoch, 12-step range tests)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the test extra is not installed: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="the test extra is not installed: pip install -e '.[test]'")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "tinyfast.ipynb"


def test_the_notebook_is_kept_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_the_notebook_runs_end_to_end_on_the_demo_set(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures inline, as in Jupyter
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # papermill's way of overriding a notebook's parameters: a cell after the one tagged "parameters"
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(
        "EPOCHS, NUM_IT = 1, 12  # the suite's time: one epoch, short range tests", metadata={"tags": ["injected-parameters"]}))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # a cell error raises CellExecutionError, with the cell and its traceback
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert "the generated demo set instead" in text
    assert "Smith's pick" in text and "pointing game" in text
    assert len(images) >= 6  # the batch, both range tests, top losses, confusion, Grad-CAM
    assert any("text/html" in o.get("data", {}) and "progress" in o["data"]["text/html"] for o in outputs)
    assert (tmp_path / "models" / "tinyfast.pkl").stat().st_size > 0
    assert (tmp_path / "data" / "demo" / "tiny-imagenet-200").is_dir()
