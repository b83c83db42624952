"""Contracts of the repository itself: notebooks are stripped and parametrised, every notebook
has its figure function, paths honour their environment variables, results are written
atomically and never overwritten by accident."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lib import paths
from lib.figures import drawers

NOTEBOOKS = sorted((paths.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_parametrised(nb):
    cells = json.loads(nb.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code, f"{nb.name} has no code cell"
    assert "parameters" in code[0].get("metadata", {}).get("tags", []), (
        f"{nb.name}: the first code cell must be tagged 'parameters' for papermill"
    )
    assert "SMOKE" in "".join(code[0]["source"]), f"{nb.name}: the parameters cell must define SMOKE"
    dirty = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"{nb.name}: code cells {dirty} carry outputs; run `make strip` before committing"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_has_a_figure_function(nb):
    assert nb.stem in drawers(), f"no lib/figures/fNN_*.py module declares NOTEBOOK = {nb.stem!r}"


def test_paths_follow_environment(tmp_path):
    env = {
        **os.environ,
        "SPECTRAL_MERGE_CACHE": str(tmp_path / "c"),
        "SPECTRAL_MERGE_RESULTS": str(tmp_path / "r"),
        "SPECTRAL_MERGE_FIGURES": str(tmp_path / "f"),
        "SMOKE": "1",
    }
    code = "from lib import paths; print(paths.CACHE, paths.results_dir(), paths.figures_dir(), sep='\\n')"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(tmp_path / "c"), str(tmp_path / "r" / "smoke"), str(tmp_path / "f" / "smoke")]


def test_explicit_data_dir_comes_first(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRAL_MERGE_DATA", str(tmp_path / "env"))
    assert paths.data_candidates(tmp_path / "x") == [tmp_path / "x"]
    found = paths.data_candidates()
    assert found[0] == tmp_path / "env" and found[1] == paths.SHARED_DATA


def test_write_json_is_atomic_and_guarded(tmp_path):
    target = tmp_path / "r.json"
    paths.write_json(target, {"a": 1})
    with pytest.raises(FileExistsError):
        paths.write_json(target, {"a": 2}, overwrite=False)
    with pytest.raises(TypeError):
        paths.write_json(target, {"a": object()})
    assert paths.read_json(target) == {"a": 1}, "a failed write must leave the old file intact"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"], "no temporary file may be left behind"
