"""Figures drawn from ``results/<notebook>.json``: the notebook and ``make figures`` call the
same function, so a plot can be redrawn in seconds without retraining anything.

Each notebook has one module here defining ``NOTEBOOK`` (the notebook's stem, which is also the
name of its results file) and ``draw(results: dict, *, smoke: bool = False) -> list[Path]``.
Adding a notebook's figures is one module plus one line in ``_MODULES``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .. import paths

# notebook stem -> module under lib.figures
_MODULES: dict[str, str] = {}


def register_module(notebook: str, module: str) -> None:
    _MODULES[notebook] = module


def drawers() -> dict[str, Callable]:
    return {nb: importlib.import_module(f"{__name__}.{mod}").draw for nb, mod in _MODULES.items()}


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
    subprocess.run(cmd, check=True, env={**__import__("os").environ, "SMOKE": env_smoke})


def draw_all(*, run_missing: bool = False, smoke: bool = False, only: list[str] | None = None) -> list[Path]:
    written: list[Path] = []
    for nb, draw in drawers().items():
        if only and nb not in only:
            continue
        path = results_path(nb, smoke)
        if not path.exists():
            if not run_missing:
                print(f"[figures] {nb}: no {path.relative_to(paths.ROOT) if path.is_relative_to(paths.ROOT) else path}; skipped (use --run-missing)")
                continue
            run_notebook(nb, smoke=smoke)
        files = draw(paths.read_json(path), smoke=smoke)
        print(f"[figures] {nb}: {len(files)} figure(s)")
        written += files
    return written
