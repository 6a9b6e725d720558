"""The notebook templates in ``notebooks/``: stored without outputs, and each one runs without error.

Every notebook ends with ``assert`` cells on what it shows (frozen tensors bitwise unchanged,
the naive EMA drifting, the stage-1 branch's predictions identical after merging, the cached runs'
head bitwise the uncached run's), so running it checks its claims. The kernel is this interpreter
(a kernelspec written for the test, found first through ``JUPYTER_PATH``), with the ``Agg``
backend, one torch thread and no figure saving.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "lightning-freeze-test"
CELL_TIMEOUT_S = 300


def test_there_are_notebook_templates() -> None:
    names = [p.name for p in NOTEBOOKS]
    expected = [
        "01_freeze_backbone.ipynb",
        "02_frozen_safe_ema.ipynb",
        "03_staged_multibranch.ipynb",
        "04_feature_cache.ipynb",
    ]
    assert names[:4] == expected


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code_cells = [(i, cell) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    with_outputs = [i for i, cell in code_cells if cell.outputs or cell.execution_count]
    assert not with_outputs, f"{path.name}: cells {with_outputs} hold outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_a_template(path: Path) -> None:
    """It opens with a markdown cell on the trap, marks the cells to adapt, saves its figure on request."""
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    markdown = [cell.source for cell in nb.cells if cell.cell_type == "markdown"]
    adapt = [text for text in markdown if "**Adapt this cell:**" in text]
    assert adapt, f"{path.name} has no markdown cell marking what to adapt"
    code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert "LF_FIGURE_DIR" in code and f"{path.stem}.png" in code


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kernelspec that runs this interpreter, first on JUPYTER_PATH; returns the working directory."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lightning_freeze tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models on 2 shared cores: one thread is fastest
    monkeypatch.delenv("LF_FIGURE_DIR", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, kernel_env: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(kernel_env)}},
    )
    client.execute()  # raises CellExecutionError (cell source and traceback) on any error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors
    assert not list(kernel_env.glob("*.png")), "figures are saved only when LF_FIGURE_DIR is set"


def test_notebook_kernel_is_this_interpreter(kernel_env: Path) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys\nprint(sys.executable)")])
    nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=60).execute()
    assert nb.cells[0].outputs[0].text.strip() == sys.executable
