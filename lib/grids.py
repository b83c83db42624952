"""What a notebook computes and what it publishes: its grid through :func:`lib.runner.run_grid`,
its results file written only over one of the same configuration, and read back for
``FROM_RESULTS=1``.

Every notebook 00-06 has two parameters besides ``SMOKE``:

* ``EXECUTOR`` (environment variable too; default ``inline``): where the grid's merges run,
  ``processes:N``, ``dask:local``, ``dask:tcp://host:8786``, ``slurm:...``
  (:func:`lib.executors.make_executor`). Records go to the record store as they are computed, so
  a killed notebook, run again, computes only the missing ones.
* ``FROM_RESULTS`` (``FROM_RESULTS=1``): compute nothing; every table, figure and verdict is
  rendered from the committed ``results/<notebook>.json`` (``results/smoke/`` with ``SMOKE=1``)
  by :func:`load_results`, which refuses a file whose configuration is not the notebook's.

:func:`publish` writes a results file atomically and refuses to replace a published one (full
mode) holding another configuration, naming the fields that differ; ``OVERWRITE_RESULTS=1``
says the change is meant.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import paths, pool, runner, sweep

OVERWRITE_VARIABLE = "OVERWRITE_RESULTS"


class ConfigMismatch(ValueError):
    """A results file holds another configuration than the notebook's parameters."""


def flag(name: str) -> bool:
    """Whether environment variable ``name`` is ``1`` (``FROM_RESULTS``, ``SMOKE``)."""
    return os.environ.get(name, "0") == "1"


def _plain(value: Any) -> Any:
    # what the configuration is once written: tuples become lists, numpy scalars plain numbers
    return json.loads(json.dumps(value, default=paths._json_default))


def differences(stored: Mapping, wanted: Mapping, *, ignore: Iterable[str] = ()) -> list[str]:
    """The fields in which two configurations differ, as ``"field: stored X, notebook Y"``."""
    stored, wanted, ignore = _plain(dict(stored)), _plain(dict(wanted)), set(ignore)
    out = []
    for key in sorted(set(stored) | set(wanted)):
        if key in ignore:
            continue
        a, b = stored.get(key, "<absent>"), wanted.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: file {json.dumps(a)[:160]}, notebook {json.dumps(b)[:160]}")
    return out


def results_path(notebook: str, *, smoke: bool) -> Path:
    return paths.results_dir(smoke) / f"{notebook}.json"


def load_results(
    notebook: str, config: Mapping, *, smoke: bool, derived: Iterable[str] = (), ignore: Iterable[str] = ()
) -> dict:
    """``results/<notebook>.json`` (``results/smoke/`` when ``smoke``), checked to hold this
    notebook's configuration: a missing file, another mode or another value of a parameter is an
    error saying which fields differ and what to do.

    ``derived``: fields the code derives rather than the notebook's parameters (run labels with
    every default spelled out, a method's default): where they differ the file was computed by
    another version of the methods, which is printed as a note and the file rendered as published
    (the notebook then reads labels from ``results["config"]``). ``ignore``: fields that describe
    the machine, not the experiment (e.g. the device)."""
    path = results_path(notebook, smoke=smoke)
    if not path.exists():
        raise FileNotFoundError(
            f"FROM_RESULTS=1 but {path} does not exist: run the notebook without FROM_RESULTS "
            f"({'SMOKE=1 ' if smoke else ''}papermill, or `make {'smoke' if smoke else 'reproduce'}`) "
            "to compute it"
        )
    results = paths.read_json(path)
    if bool(results.get("smoke")) != bool(smoke):
        raise ConfigMismatch(
            f"{path} was computed with SMOKE={int(bool(results.get('smoke')))}, the notebook runs with "
            f"SMOKE={int(bool(smoke))}"
        )
    derived, stored = set(derived), results.get("config", {})
    diff = differences(stored, config, ignore=set(ignore) | derived)
    if diff:
        raise ConfigMismatch(
            f"{path} holds another configuration than this notebook's parameters; it cannot be "
            f"rendered from results. Differences: {'; '.join(diff)}. Set the parameters back, or "
            "run without FROM_RESULTS to compute the new configuration"
        )
    notes = [
        _first_difference(k, stored.get(k), config.get(k))
        for k in sorted(derived)
        if _plain(stored.get(k)) != _plain(config.get(k))
    ]
    if notes:
        print(
            f"note: {path.name} was computed by an earlier version of the methods; it is shown as published. "
            f"{'; '.join(notes)}"
        )
    return results


def _first_difference(key: str, stored: Any, wanted: Any) -> str:
    stored, wanted = _plain(stored), _plain(wanted)
    if isinstance(stored, list) and isinstance(wanted, list) and len(stored) == len(wanted):
        changed = [(a, b) for a, b in zip(stored, wanted) if a != b]
        a, b = changed[0]
        return f"{key}: {len(changed)} of {len(stored)} differ, e.g. {json.dumps(a)} (file) is {json.dumps(b)} today"
    return f"{key}: {json.dumps(stored)[:160]} (file) is {json.dumps(wanted)[:160]} today"


def publish(notebook: str, results: Mapping, *, smoke: bool, ignore: Iterable[str] = ()) -> Path:
    """Write ``results`` atomically to :func:`results_path`. A published file (full mode) that
    holds another configuration is not replaced unless ``OVERWRITE_RESULTS=1``: the error names
    the fields that differ."""
    path = results_path(notebook, smoke=smoke)
    if not smoke and path.exists() and not flag(OVERWRITE_VARIABLE):
        old = paths.read_json(path)
        diff = differences(old.get("config", {}), results.get("config", {}), ignore=ignore)
        if diff or bool(old.get("smoke")) != bool(smoke):
            raise ConfigMismatch(
                f"not overwriting the published {path}: it holds another configuration "
                f"({'; '.join(diff) or 'another mode'}). Set {OVERWRITE_VARIABLE}=1 to replace it "
                "(and say in the commit which numbers change and why), or restore the parameters"
            )
    return paths.write_json(path, results)


# --- pool grids (notebooks 04-06) ----------------------------------------------------------------


def pool_specs(pools: Mapping[str, Sequence[str]], seeds: Sequence[int], *, smoke: bool) -> list[dict]:
    """One :func:`lib.runner.pool_spec` per seed and pool, seed by seed (a pool's name
    ``kind/variant`` names its variant)."""
    return [
        runner.pool_spec(tasks, seed=seed, smoke=smoke, variant=name.split("/")[1] if "/" in name else None, name=name)
        for seed in seeds
        for name, tasks in pools.items()
    ]


def pool_configs(
    spec: Mapping,
    subsets: Sequence[Sequence[str]],
    runs: Sequence[sweep.Run],
    *,
    extra: Iterable[tuple[Sequence[Sequence[str]], Sequence[sweep.Run]]] = (),
    alone: bool = True,
) -> list[dict]:
    """The configurations of one pool and seed: experts and base alone, every subset by every
    run, then each ``(subsets, runs)`` of ``extra`` (e.g. a density sweep on some sizes)."""
    out = runner.pool_grid(spec, subsets, runs, alone=alone)
    for more_subsets, more_runs in extra:
        out += runner.pool_grid(spec, more_subsets, more_runs, alone=False)
    return out


def found(configs: Iterable[Mapping]) -> list[str]:
    """Descriptions of the merges of ``configs`` the record store already holds (computed by an
    earlier run or another notebook: not computed again)."""
    done, _ = runner.plan(configs)
    return [runner.describe(c) for c in done if c["record"] == "merge"]


def seconds_by_pool(records: Iterable[Mapping]) -> dict[tuple[str, int], float]:
    """Seconds the models of each ``(pool, seed)`` took to merge and score, each model once
    (the times measured when each record was computed)."""
    out: dict[tuple[str, int], float] = {}
    for (name, seed, *_), seconds in runner.record_seconds(records).items():
        out[(name, seed)] = out.get((name, seed), 0.0) + seconds
    return out


def label_in(records: Iterable[Mapping], run: sweep.Run) -> str:
    """The label under which ``records`` hold ``run``: the record of ``run``'s method whose
    hyperparameters agree with ``run``'s (defaults filled in) on every one the record names.
    Records computed before a method gained a hyperparameter carry a shorter label; this finds
    it, so a table drawn from published results selects the same runs. ``run.label()`` when no
    record matches."""
    wanted = pool.canonical_run(run.method, **run.hparams()).hparams()
    for r in records:
        hp = r.get("hparams") or {}
        if (
            r.get("method") == run.method
            and r.get("model") == "merged"
            and all(wanted.get(k) == v for k, v in hp.items())
        ):
            return r["run"]
    return run.label()


# --- the runs of notebooks 04 and 05 ---------------------------------------------------------------


def star_runs(etas: Iterable[float], no_rescale_etas: Iterable[float], references: Iterable[str]) -> list[sweep.Run]:
    """Notebook 04's runs: STAR at each eta with rescaling, at its default (always: it is the run
    compared with the other methods), without rescaling at ``no_rescale_etas``, and each reference
    at its registered defaults; each label once, in that order."""
    star = [pool.canonical_run("star", eta=e) for e in etas] + [pool.canonical_run("star")]
    star += [pool.canonical_run("star", eta=e, rescale=False) for e in no_rescale_etas]
    return list({r.label(): r for r in star + [pool.canonical_run(m) for m in references]}.values())


def drm_runs(
    references: Iterable[tuple[str, Mapping]], densities: Iterable[float], density_methods: Sequence[Mapping]
) -> tuple[list[sweep.Run], list[sweep.Run]]:
    """Notebook 05's ``(main runs, density runs)``: DRM-H and DRM-V with and without
    renormalisation and each reference, then each of ``density_methods`` (``method``, ``fixed``
    hyperparameters) at each density, less the runs already among the main ones (the main runs
    are the density sweep's point at the default density)."""
    drm = [pool.canonical_run(f"drm_{v}") for v in ("h", "v")]
    no_renorm = [pool.canonical_run(f"drm_{v}", renorm=False) for v in ("h", "v")]
    main = [*drm, *no_renorm, *(pool.canonical_run(m, **hp) for m, hp in references)]
    sweep_runs = [
        pool.canonical_run(spec["method"], density=d, **spec.get("fixed", {}))
        for spec in density_methods
        for d in densities
    ]
    labels = {r.label() for r in main}
    return main, list({r.label(): r for r in sweep_runs if r.label() not in labels}.values())
