"""Regenerate the README's notebook figures: ``docs/<notebook>.png`` for each ``notebooks/*.ipynb``.

Runs every notebook (or the ones named) top to bottom with this interpreter as the kernel, in a
temporary directory, with ``LF_FIGURE_DIR`` pointing at ``docs/``; each notebook saves its main
figure there. The notebooks themselves are not modified (they stay stored without outputs).

Usage::

    make notebook-plots                                   # all notebooks
    .venv/bin/python scripts/make_notebook_plots.py notebooks/02_frozen_safe_ema.ipynb
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
KERNEL_NAME = "lightning-freeze-plots"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go (default: docs/)")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="lightning_freeze_plots_") as tmp:
        # a kernelspec that runs this interpreter, found first through JUPYTER_PATH
        spec_dir = Path(tmp) / "jupyter" / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        argv_kernel = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv_kernel, "language": "python"}))
        os.environ["JUPYTER_PATH"] = str(Path(tmp) / "jupyter")
        os.environ["MPLBACKEND"] = "Agg"
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one torch thread is fastest on CPU
        os.environ["LF_FIGURE_DIR"] = str(out)
        for path in notebooks:
            work = Path(tmp) / path.stem
            work.mkdir()
            figure = out / f"{path.stem}.png"
            figure.unlink(missing_ok=True)
            nb = nbformat.read(path, as_version=4)
            start = time.perf_counter()
            client = nbclient.NotebookClient(
                nb, kernel_name=KERNEL_NAME, timeout=600, resources={"metadata": {"path": str(work)}}
            )
            client.execute()
            if not figure.is_file():
                print(f"{path.name}: ran, but wrote no {figure}", file=sys.stderr)
                return 1
            print(f"{path.name}: {time.perf_counter() - start:.1f} s -> {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
