"""The quickstart notebook runs headlessly end to end and produces its loss plot."""

from __future__ import annotations

import os
import pathlib

import pytest
from conftest import COMPILE_FLAGS

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    # the kernel inherits this environment: a temp workdir and a short run
    monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("QUICKSTART_STEPS", "2")  # logs, evaluates and saves at its last step
    monkeypatch.setenv("XLA_FLAGS", COMPILE_FLAGS)  # the notebook adds the 8-device flag itself
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    assert (tmp_path / "work" / "loss.png").stat().st_size > 1000
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("assistant:" in o.get("text", "") for o in outputs)
    assert os.listdir(tmp_path / "work" / "checkpoints")
