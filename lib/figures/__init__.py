"""Figures drawn from ``results/<notebook>.json``: the notebook and ``make figures`` call the
same function, so a plot can be redrawn in seconds without retraining anything.

Each notebook has one module here, named ``fNN_<anything>.py``, defining ``NOTEBOOK`` (the
notebook's stem, which is also the name of its results file) and
``draw(results: dict, *, smoke: bool = False) -> list[Path]``. Modules are discovered by name,
so adding a notebook's figures is adding its module.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .. import paths


def drawers() -> dict[str, Callable]:
    """notebook stem -> draw function, in notebook order."""
    out = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("f") and info.name[1:3].isdigit():
            mod = importlib.import_module(f"{__name__}.{info.name}")
            out[mod.NOTEBOOK] = mod.draw
    return out


def results_path(notebook: str, smoke: bool | None = None) -> Path:
    return paths.results_dir(smoke) / f"{notebook}.json"


def run_notebook(notebook: str, *, smoke: bool) -> None:
    """Execute ``notebooks/<notebook>.ipynb`` with papermill (it writes its own results)."""
    src = paths.ROOT / "notebooks" / f"{notebook}.ipynb"
    out = paths.ROOT / "build" / "notebooks" / f"{notebook}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    env_smoke = "1" if smoke else "0"
    cmd = [sys.executable, "-m", "papermill", "--log-level", "WARNING", "-k", "python3", str(src), str(out)]
    print(f"[figures] results for {notebook} missing: running {src.name} (SMOKE={env_smoke})", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "SMOKE": env_smoke})


def draw_all(*, run_missing: bool = False, smoke: bool = False, only: list[str] | None = None) -> list[Path]:
    written: list[Path] = []
    for nb, draw in drawers().items():
        if only and nb not in only:
            continue
        path = results_path(nb, smoke)
        if not path.exists():
            if not run_missing:
                print(
                    f"[figures] {nb}: no {path.relative_to(paths.ROOT) if path.is_relative_to(paths.ROOT) else path}; skipped (use --run-missing)"
                )
                continue
            run_notebook(nb, smoke=smoke)
        files = draw(paths.read_json(path), smoke=smoke)
        print(f"[figures] {nb}: {len(files)} figure(s)")
        written += files
    return written
