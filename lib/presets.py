"""Named presets of a notebook's parameters, chosen with the ``PRESET`` environment variable.

``PRESET=lab`` is the teaching preset of the course book (issue 19): notebook 03's whole pipeline
(two experts trained, their spectra, the SNR sweep, the reference merges, the leaderboards) on
one seed and one pair, with experts small enough to train in a few minutes on two CPU cores yet
really trained (each clearly above its majority class), so a one-hour lab produces real numbers.
Its experts differ from the published ones (fewer training examples), so their cache keys differ
and they never replace a published expert; its results go where ``SPECTRAL_MERGE_RESULTS``
points (``book/lab.ipynb`` sends them to ``build/lab/``).

A notebook takes a preset in its parameters cell::

    globals().update(presets.parameters("03_text_sst2_cola"))   # no-op unless PRESET is set

and passes ``presets.expert_kw(task)`` to :func:`lib.train.fit_expert`.
"""

from __future__ import annotations

import os
from typing import Any

#: preset -> notebook -> the parameters it replaces (the names of the notebook's parameters cell)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "lab": {
        "03_text_sst2_cola": {
            "SEEDS": [0],
            "SNR_METHODS": ["mp", "report_text"],  # ours and the report's: the shape bias stays visible
            "STRATEGIES": ["snr_winner", "snr_base_reset"],
            "TOPS": [0.0, 0.5, 1.0],
            "REFERENCES": ["average", "task_arithmetic"],
        },
    },
}

#: preset -> task -> overrides of lib.train's recipe (they change the expert's cache key)
EXPERT_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "lab": {
        # the full recipe takes a fixed 16k subset for one pass; 4k of them are enough to be far
        # above SST-2's majority class
        "sst2": {"max_train_examples": 4000, "max_length": 64},
        # CoLA's 8,551 sentences are short: one and a half passes instead of three
        "cola": {"epochs": 1.5, "max_length": 64},
    },
}


def current(name: str | None = None) -> str | None:
    """The preset asked for: ``name``, else ``$PRESET``; ``None`` for the notebook's own parameters."""
    name = os.environ.get("PRESET", "") if name is None else name
    if not name:
        return None
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: PRESET must be one of {sorted(PRESETS)} or empty")
    return name


def parameters(notebook: str, name: str | None = None) -> dict[str, Any]:
    """The parameters that preset ``name`` (default ``$PRESET``) sets for ``notebook``; ``{}``
    without a preset. A preset that does not cover the notebook is an error, not a silent
    full-size run."""
    name = current(name)
    if name is None:
        return {}
    if notebook not in PRESETS[name]:
        raise ValueError(
            f"preset {name!r} is defined for {sorted(PRESETS[name])}, not for {notebook!r}: "
            f"unset PRESET to run {notebook} with its own parameters"
        )
    return {key: (list(value) if isinstance(value, list) else value) for key, value in PRESETS[name][notebook].items()}


def expert_kw(task: str, name: str | None = None) -> dict[str, Any]:
    """The recipe overrides preset ``name`` gives ``task``'s expert (``{}`` without a preset)."""
    name = current(name)
    return {} if name is None else dict(EXPERT_OVERRIDES[name].get(task, {}))


def estimate_seconds(notebook: str, name: str = "lab", published: dict | None = None) -> dict[str, float]:
    """What preset ``name`` should cost on the machine that produced ``results/<notebook>.json``,
    from the rates measured there: seconds per training step of each task's published experts
    (median over seeds) times the preset's steps, and the published seed's seconds (SNR prepass,
    merge, evaluation) of every record of the preset's grid, the base and the experts. The preset
    trains on shorter sequences (``max_length``), so the training part errs on the long side."""
    import math
    import statistics

    from . import cache as expert_cache
    from . import paths, sweep

    published = paths.read_json(paths.results_dir(False) / f"{notebook}.json") if published is None else published
    params = parameters(notebook, name)
    out = {}
    for task in published["config"]["tasks"]:
        rows = [e for e in published["experts"] if e["task"] == task and e.get("steps")]
        per_step = statistics.median(e["train_s"] / e["steps"] for e in rows)
        recipe = expert_cache.RECIPES[task]
        recipe_kw = {
            **{
                "epochs": recipe.epochs,
                "batch_size": recipe.batch_size,
                "max_train_examples": recipe.max_train_examples,
            },
            **expert_kw(task, name),
        }
        n_train = min(rows[0]["train_examples"], recipe_kw["max_train_examples"] or math.inf)
        steps = math.ceil(n_train * recipe_kw["epochs"] / recipe_kw["batch_size"])
        out[f"train_{task}_s"] = per_step * steps
    runs = sweep.snr_runs(params["STRATEGIES"], params["SNR_METHODS"], params["TOPS"]) + sweep.reference_runs(
        params["REFERENCES"]
    )
    wanted = {run.label() for run in runs} | {"base:base"} | {f"expert:{t}" for t in published["config"]["tasks"]}
    seed = published["config"]["seeds"][0]
    seen, sweep_s = set(), 0.0
    for rec in published["records"]:
        if rec["seed"] == seed and rec["run"] in wanted and rec["run"] not in seen:
            seen.add(rec["run"])
            sweep_s += rec["prepass_s"] + rec["merge_s"] + rec["eval_s"]
    missing = wanted - seen
    if missing:
        raise ValueError(
            f"results/{notebook}.json has no seed-{seed} record of {sorted(missing)}: cannot price the preset"
        )
    out["sweep_s"] = sweep_s
    out["total_s"] = sum(out.values())
    return out


def results_dir(smoke: bool | None = None, name: str | None = None):
    """Where a notebook run under a preset writes its results: ``build/<preset>/results`` (never
    the published ``results/``); without a preset, :func:`lib.paths.results_dir`."""
    from . import paths

    name = current(name)
    return paths.results_dir(smoke) if name is None else paths.ROOT / "build" / name / "results"


def figures_dir(smoke: bool | None = None, name: str | None = None):
    """The figures' counterpart of :func:`results_dir`: ``build/<preset>/figures``."""
    from . import paths

    name = current(name)
    return paths.figures_dir(smoke) if name is None else paths.ROOT / "build" / name / "figures"


def task_kw(tasks, name: str | None = None) -> dict[str, dict[str, Any]]:
    """Each task's expert overrides under preset ``name`` (default ``$PRESET``), for
    :func:`lib.runner.sweep_spec`'s ``task_kw``; ``{}`` without a preset."""
    return {t: kw for t in tasks if (kw := expert_kw(t, name))}


def check_outputs(name: str | None = None) -> None:
    """Refuse a preset run that would write into the published ``results/`` or ``figures/``: a
    notebook reads its output folders from ``SPECTRAL_MERGE_RESULTS``/``SPECTRAL_MERGE_FIGURES`` at
    import, so a preset run sets them (``make lab-03`` does) to :func:`results_dir` and
    :func:`figures_dir`."""
    from . import paths

    name = current(name)
    if name is None:
        return
    for what, folder, published in (
        ("SPECTRAL_MERGE_RESULTS", paths.results_dir(False), paths.ROOT / "results"),
        ("SPECTRAL_MERGE_FIGURES", paths.figures_dir(False), paths.ROOT / "figures"),
    ):
        if folder.resolve() == published.resolve():
            raise RuntimeError(
                f"PRESET={name} would write into the published {published.name}/: set {what} "
                f"(e.g. {what}=build/{name}/{published.name}) or run `make lab-03`"
            )
