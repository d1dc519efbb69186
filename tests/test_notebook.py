"""The fine-tuning notebook runs top to bottom on CPU (real kernel, nbclient)."""

from __future__ import annotations

import signal
from pathlib import Path

import nbformat
import pytest
from helpers import synthetic_dataset
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_notebook_trains_plots_predicts_and_links_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    notebook = nbformat.read(REPO / "notebooks" / "finetune_libero.ipynb", as_version=4)
    data = synthetic_dataset(tmp_path, num_episodes=8)
    # smaller and faster than the notebook's defaults, but through every cell unchanged
    settings = notebook.cells[1]
    for old, new in (('OUTPUT_DIR = ROOT / "outputs" / "notebook"', f'OUTPUT_DIR = Path("{tmp_path / "nb"}")'),
                     ("DATA = None", f'DATA = "{data}"'), ("STEPS = 150", "STEPS = 50")):
        assert settings.source.count(old) == 1, f"the notebook's settings cell no longer says {old!r}"
        settings.source = settings.source.replace(old, new)
    notebook.cells.append(nbformat.v4.new_code_cell("import os\nprint('kernel folder:', os.getcwd())"))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}})
    sigint = signal.getsignal(signal.SIGINT)
    try:
        client.execute()
    finally:  # nbclient's asyncio loop hands SIGINT back as Python's default handler, not as it found it
        signal.signal(signal.SIGINT, sigint)
    outputs = {i: "".join(o.get("text", "") for o in cell.get("outputs", [])) for i, cell in enumerate(notebook.cells)}
    assert "logging to: wandb" in outputs[1]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for o in notebook.cells[3].outputs)  # the loss curve
    assert "actions (4, 7)" in outputs[4]
    assert "wandb sync" in outputs[5]
    [run_dir] = (tmp_path / "nb").iterdir()  # each run of the training cell gets its own folder
    assert (run_dir / "final" / "model.safetensors").is_file() and f"run folder: {run_dir}" in outputs[2]
    assert f"kernel folder: {REPO / 'notebooks'}" in outputs[6]  # the notebook left its working directory alone
