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

Records that travel (notebooks 04-07). The record store lives in the uncommitted cache, so a grid
longer than a session would start from nothing each time. In full mode :func:`run_grid` first
imports every committed shard ``results/records/*.jsonl`` into the store
(:meth:`lib.store.RecordStore.import_rows`), then runs :func:`lib.runner.run_grid` with every new
record also written at once into the notebook's shard ``results/records/<notebook>.jsonl``
(:class:`ShardedStore`: a session killed mid-grid leaves its shard current, ready to commit), and
at the end exports the rows of the whole grid there (those found in another notebook's shard
too). SMOKE runs never write into ``results/``. :func:`notebook_grid` is each notebook's grid,
built by the same functions the notebooks call, so ``python -m lib records compute 05_drm --seeds
1`` computes seed 1 of notebook 05 alone, in a session of its own, and commits its shard.
:func:`expert_info` keeps each pool's expert table in the store (and so in the shard): a session
that assembles a notebook from shards loads the weights of the first seed only (its ranks,
profiles and census), not of every seed.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import configs, paths, pool, runner, sweep
from .store import RecordStore, method_version

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
    it, so a table drawn from published results selects the same runs; a hyperparameter the record
    lacks matches only at the method's default (the run such a record stood for when it was
    published), so an older record never stands for, say, ``prune="per_task"``. ``run.label()`` when no record matches."""
    wanted = pool.canonical_run(run.method, **run.hparams()).hparams()
    default = pool.canonical_run(run.method).hparams()
    for r in records:
        hp = r.get("hparams") or {}
        if (
            r.get("method") == run.method
            and r.get("model") == "merged"
            and all(wanted.get(k) == v for k, v in hp.items())
            and all(wanted[k] == default.get(k) for k in wanted.keys() - hp.keys())
        ):
            return r["run"]
    return run.label()


# --- what a change of method changed in published numbers ------------------------------------------


def _seed_means(records: Iterable[Mapping]) -> pd.DataFrame:
    """Per pool, subset size, run and seed: the mean normalized score over that seed's subsets."""
    s = pool.subset_scores(records)
    return s.groupby(["pool", "size", "run", "seed"], sort=False)["normalized"].mean().sort_index()


def _expert_scores(experts: Iterable[Mapping]) -> dict:
    """(pool, seed) -> {task: accuracy} of a notebook's expert table: what tells the same experts."""
    out: dict = {}
    for e in experts:
        out.setdefault((e["pool"], int(e["seed"])), {})[e["task"]] = e.get("accuracy")
    return out


def frozen_summary(results: Mapping, methods: Sequence[str], *, source: str) -> dict:
    """What ``results`` (a notebook's published file) said about ``methods`` before they changed:
    per pool, subset size and run the mean, sample std and count over seeds of the normalized
    score (:func:`lib.pool.size_summary`), each seed's mean (``by_seed``), the run's
    hyperparameters, every claim's effect and verdict, and the experts' own scores per pool and
    seed (so a later run can tell which seeds it merged the same experts of). ``source`` says where
    it came from (file and commit). A later run reads it back with :func:`changed_since` (notebook
    05 keeps the per-task-pruning DRM this way)."""
    s = pool.size_summary(results["records"])
    s = s[s.method.isin(methods)]
    seeds = _seed_means(results["records"])
    hp = [c for c in s.columns if c.startswith("hp_") and s[c].notna().any()]
    rows = [
        {
            "pool": r["pool"],
            "size": int(r["size"]),
            "method": r["method"],
            "hparams": {c[3:]: _plain(r[c]) for c in hp if r[c] is not None and r[c] == r[c]},
            "mean": float(r["mean"]),
            "std": None if r["std"] != r["std"] else float(r["std"]),
            "n": int(r["n"]),
            "by_seed": {str(int(k)): float(v) for k, v in seeds.loc[r["pool"], r["size"], r["run"]].items()},
        }
        for r in s.to_dict("records")
    ]
    keep = ("claim", "pools", "ours", "ci_low", "ci_high", "agrees")
    experts = [{k: e.get(k) for k in ("pool", "seed", "task", "accuracy")} for e in results.get("experts", [])]
    return {
        "source": source,
        "config": _plain(results["config"]),
        "summary": rows,
        "effects": [{k: e.get(k) for k in keep} for e in results["effects"]],
        "experts": experts,
    }


def changed_since(frozen: Mapping, records: Iterable[Mapping], *, experts=None, **now) -> pd.DataFrame:
    """Each row of ``frozen`` (:func:`frozen_summary`) beside the same pool, size, method and
    hyperparameters among ``records`` now, with ``now``'s hyperparameters fixed on top (notebook
    05: ``prune="joint"``, the setting the frozen runs did not have): ``before``, ``now`` and
    ``change`` in points of normalized score (x100), ``n`` seeds now. Rows with nothing to
    compare with now (a size the grid no longer has) are left out.

    With ``experts`` (the expert table now) and a frozen file that kept its own, the change is
    also given over the seeds whose experts are the same both times (every expert's score equal):
    ``same_seeds`` and ``change_same`` (the mean over those seeds of now minus before). A
    retrained expert moves every merge of it, so only ``change_same`` is the change of the method
    alone."""
    records = list(records)
    summary = pool.size_summary(records)
    seeds = _seed_means(records)
    before_experts = _expert_scores(frozen.get("experts", []))
    now_experts = _expert_scores(experts or [])
    out = []
    for row in frozen["summary"]:
        here = summary[(summary.pool == row["pool"]) & (summary["size"] == row["size"])]
        if here.empty or row["method"] not in set(here.method):
            continue
        match = pool.select(here, row["method"], **{**row["hparams"], **now})
        if len(match) != 1:
            continue
        after = match.iloc[0]
        entry = {
            "pool": row["pool"],
            "size": row["size"],
            "run": after["run"],
            "before": 100 * row["mean"],
            "now": 100 * float(after["mean"]),
            "change": 100 * (float(after["mean"]) - row["mean"]),
            "n": int(after["n"]),
        }
        if experts is not None and before_experts:
            diffs = {}
            for k, mean in row.get("by_seed", {}).items():
                seed = int(k)
                key = (row["pool"], row["size"], after["run"], seed)
                had = before_experts.get((row["pool"], seed))
                if had is not None and had == now_experts.get((row["pool"], seed)) and key in seeds.index:
                    diffs[seed] = seeds.loc[key] - mean
            entry["same_seeds"] = ", ".join(map(str, sorted(diffs)))
            entry["change_same"] = 100 * float(np.mean(list(diffs.values()))) if diffs else float("nan")
        out.append(entry)
    columns = ["pool", "size", "run", "before", "now", "change", "n"]
    if experts is not None and before_experts:
        columns += ["same_seeds", "change_same"]
    return pd.DataFrame(out, columns=columns)


def verdicts_since(frozen: Mapping, effects: Iterable[Mapping]) -> pd.DataFrame:
    """The claims of ``frozen`` beside the same claims (same text and pools) of ``effects`` now:
    ``ours`` before and now in points, and each verdict (``agrees``) before and now; ``flipped``
    where the verdict differs."""
    now = {(e["claim"], e["pools"]): e for e in effects}
    rows = [
        {
            "claim": b["claim"],
            "pools": b["pools"],
            "ours_before": b["ours"],
            "ours_now": now[b["claim"], b["pools"]]["ours"],
            "agrees_before": b["agrees"],
            "agrees_now": now[b["claim"], b["pools"]]["agrees"],
        }
        for b in frozen["effects"]
        if (b["claim"], b["pools"]) in now
    ]
    out = pd.DataFrame(rows, columns=["claim", "pools", "ours_before", "ours_now", "agrees_before", "agrees_now"])
    return out.assign(flipped=out.agrees_before != out.agrees_now)


# --- the runs of notebooks 04 and 05 ---------------------------------------------------------------


def star_runs(
    etas: Iterable[float], no_rescale_etas: Iterable[float], references: Iterable[str | tuple[str, Mapping]]
) -> list[sweep.Run]:
    """Notebooks 04's and 07's runs: STAR at each eta with rescaling, at its default (always: it
    is the run compared with the other methods), without rescaling at ``no_rescale_etas``, and
    each reference (:func:`lib.pool.reference_run`); each label once, in that order."""
    star = [pool.canonical_run("star", eta=e) for e in etas] + [pool.canonical_run("star")]
    star += [pool.canonical_run("star", eta=e, rescale=False) for e in no_rescale_etas]
    return list({r.label(): r for r in star + [pool.reference_run(x) for x in references]}.values())


def drm_runs(
    references: Iterable[tuple[str, Mapping]], densities: Iterable[float], density_methods: Sequence[Mapping]
) -> tuple[list[sweep.Run], list[sweep.Run]]:
    """Notebook 05's ``(main runs, density runs)``: DRM-H and DRM-V with and without
    renormalisation (the paper's Table 3), pruned task by task instead of jointly (Table 8:
    :func:`drm_per_task_runs`) and each reference, then each of ``density_methods`` (``method``, ``fixed``
    hyperparameters) at each density, less the runs already among the main ones (the main runs
    are the density sweep's point at the default density)."""
    drm = [pool.canonical_run(f"drm_{v}") for v in ("h", "v")]
    no_renorm = [pool.canonical_run(f"drm_{v}", renorm=False) for v in ("h", "v")]
    per_task = list(drm_per_task_runs().values())
    main = [*drm, *no_renorm, *per_task, *(pool.reference_run(x) for x in references)]
    sweep_runs = [
        pool.canonical_run(spec["method"], density=d, **spec.get("fixed", {}))
        for spec in density_methods
        for d in densities
    ]
    labels = {r.label() for r in main}
    return main, list({r.label(): r for r in sweep_runs if r.label() not in labels}.values())


def drm_per_task_runs() -> dict[str, sweep.Run]:
    """The pruning ablation (the paper's Table 8), by variant: DRM-H and DRM-V at their defaults
    but pruned within each task's block instead of over all blocks jointly."""
    return {v: pool.canonical_run(f"drm_{v}", prune="per_task") for v in ("h", "v")}


#: notebook 05's density sweep: each method at each density, with its fixed hyperparameters
DRM_DENSITY_METHODS = [
    {"method": "drm_h", "name": "DRM-H", "fixed": {"renorm": True}},
    {"method": "ties", "name": "TIES", "linestyle": "--"},
]


# --- the grids of notebooks 04-07 ------------------------------------------------------------------


@dataclass
class PoolGrid:
    """A notebook's pool grid: its pool specs (seed by seed), the subsets of each ``(pool,
    seed)``, those the density sweep also covers (``swept``; empty without one) and the
    configurations :func:`run_grid` computes, in grid order."""

    specs: list[dict]
    subsets: dict[tuple[str, int], list[tuple[str, ...]]]
    configs: list[dict]
    swept: dict[tuple[str, int], list[tuple[str, ...]]] = field(default_factory=dict)


def build_pool_grid(
    specs: Sequence[Mapping],
    sizes: Mapping[str, Sequence[int]] | Sequence[int],
    max_subsets: int,
    runs: Sequence[sweep.Run],
    *,
    density_sizes: Mapping[str, Sequence[int]] | None = None,
    density_runs: Sequence[sweep.Run] = (),
) -> PoolGrid:
    """The grid of ``specs``: per pool and seed, the subsets of ``sizes`` (by kind, or one list
    for every pool) by every run of ``runs``, and with ``density_sizes`` the subsets of those
    sizes by every run of ``density_runs`` (notebook 05's density sweep)."""
    specs = [dict(s) for s in specs]
    subsets, swept, out = {}, {}, []
    for s in specs:
        kind = pool.kind_of(s["tasks"])
        key = s["name"], s["seed"]
        wanted = sizes[kind] if isinstance(sizes, Mapping) else sizes
        subsets[key] = pool.subset_plan(s["tasks"], wanted, max_subsets=max_subsets, seed=s["seed"])
        extra = []
        if density_sizes is not None:
            swept[key] = [x for x in subsets[key] if len(x) in density_sizes[kind]]
            extra = [(swept[key], density_runs)]
        out += pool_configs(s, subsets[key], runs, extra=extra)
    return PoolGrid(specs=specs, subsets=subsets, configs=out, swept=swept)


#: the notebooks whose grids :func:`notebook_grid` builds (and ``python -m lib records`` knows)
GRID_NOTEBOOKS = ("04_star", "05_drm", "06_mergeability", "07_lora")


def notebook_grid(notebook: str, *, smoke: bool = False, seeds: Sequence[int] | None = None) -> PoolGrid:
    """``notebook``'s pool grid as the notebook builds it from its parameters (:mod:`lib.configs`,
    :mod:`lib.lora_pool`), for its seeds or only ``seeds`` (some of them: a session computing one
    seed). Notebook 06 has one seed."""
    if notebook not in GRID_NOTEBOOKS:
        raise ValueError(f"no record grid for notebook {notebook!r}; the grids are {', '.join(GRID_NOTEBOOKS)}")
    if notebook == "07_lora":
        from . import lora_pool

        g = lora_pool.grid_values("SEEDS TASKS SIZES MAX_SUBSETS ETAS NO_RESCALE_ETAS", smoke=smoke)
        g = dict(zip("SEEDS TASKS SIZES MAX_SUBSETS ETAS NO_RESCALE_ETAS".split(), g))
    else:
        g = configs.grid(notebook, smoke=smoke)
    all_seeds = [g["SEED"]] if notebook == "06_mergeability" else list(g["SEEDS"])
    if seeds is not None:
        seeds = [int(x) for x in seeds]
        wrong = [x for x in seeds if x not in all_seeds]
        if wrong or not seeds:
            raise ValueError(
                f"seed {wrong[0] if wrong else '(none)'} is not one of {notebook}'s seeds "
                f"{all_seeds}{' (SMOKE)' if smoke else ''}"
            )
    chosen = [x for x in all_seeds if seeds is None or x in seeds]  # grid order, whatever order was asked
    if notebook == "04_star":
        runs = star_runs(g["ETAS"], g["NO_RESCALE_ETAS"], g["REFERENCES"])
        return build_pool_grid(pool_specs(g["POOLS"], chosen, smoke=smoke), g["SIZES"], g["MAX_SUBSETS"], runs)
    if notebook == "05_drm":
        runs, density_runs = drm_runs(g["REFERENCES"], g["DENSITIES"], DRM_DENSITY_METHODS)
        return build_pool_grid(
            pool_specs(g["POOLS"], chosen, smoke=smoke),
            g["SIZES"],
            g["MAX_SUBSETS"],
            runs,
            density_sizes=g["DENSITY_SIZES"],
            density_runs=density_runs,
        )
    if notebook == "06_mergeability":
        spec = runner.pool_spec(g["TASKS"], seed=g["SEED"], smoke=smoke)
        pairs = list(itertools.combinations(g["TASKS"], 2))
        out = pool_configs(spec, pairs, [pool.canonical_run(m) for m in g["METHODS"]])
        return PoolGrid(specs=[spec], subsets={(spec["name"], spec["seed"]): pairs}, configs=out)
    from . import lora_pool

    specs = [lora_pool.lora_pool_spec(g["TASKS"], seed=x, smoke=smoke, name=LORA_POOL) for x in chosen]
    return build_pool_grid(specs, g["SIZES"], g["MAX_SUBSETS"], lora_pool.lora_runs(g["ETAS"], g["NO_RESCALE_ETAS"]))


#: notebook 07's pool name
LORA_POOL = "text-lora"


# --- shards: the record store's rows, committed --------------------------------------------------


def shard_dir() -> Path:
    """``results/records`` (under ``$SPECTRAL_MERGE_RESULTS`` where set): the committed shards."""
    return paths.RESULTS / "records"


def shard_path(notebook: str) -> Path:
    return shard_dir() / f"{notebook}.jsonl"


def shard_paths() -> list[Path]:
    """Every committed shard, by name."""
    return sorted(shard_dir().glob("*.jsonl"))


def import_shards(
    shards: Iterable[str | os.PathLike] | None = None,
    *,
    smoke: bool = False,
    store: RecordStore | None = None,
    quiet: bool = False,
) -> dict[str, dict[str, int]]:
    """Import ``shards`` (default: every ``results/records/*.jsonl``) into the record store, in
    full mode only (``smoke``: nothing, SMOKE records never come from or go to ``results/``).
    Returns each shard's counts (:meth:`lib.store.RecordStore.import_rows`); prints one line per
    shard that brought rows or holds rows the store has computed otherwise."""
    if smoke:
        return {}
    store = store if store is not None else RecordStore()
    out = {}
    for path in shard_paths() if shards is None else [Path(p) for p in shards]:
        counts = out[str(path)] = store.import_rows(path)
        if not quiet and (counts["imported"] or counts["differing"]):
            print(
                f"{path.name}: {counts['imported']} records imported into {store.path}, {counts['present']} there already"
                + (
                    f", {counts['differing']} computed otherwise there (the store's kept; exporting them into "
                    "this shard will refuse)"
                    if counts["differing"]
                    else ""
                )
            )
    return out


class ShardedStore(RecordStore):
    """A :class:`lib.store.RecordStore` whose every new row is also exported at once into the
    shard ``shard`` (an atomic rewrite of the file): a session killed in the middle of a grid
    leaves the shard holding every record it computed."""

    def __init__(self, path: str | os.PathLike | None = None, *, shard: str | os.PathLike, timeout_s: float = 60.0):
        super().__init__(path, timeout_s=timeout_s)
        self.shard = Path(shard)

    def __repr__(self) -> str:
        return f"ShardedStore({str(self.path)!r}, shard={str(self.shard)!r})"

    def __getstate__(self):
        return {**super().__getstate__(), "shard": self.shard}

    def __setstate__(self, state):
        self.__init__(state["path"], shard=state["shard"], timeout_s=state["timeout_s"])

    def put(self, config: Mapping[str, Any], payload: Sequence[Mapping], *, seconds: float | None = None) -> str:
        key = super().put(config, payload, seconds=seconds)
        self.export_rows([key], self.shard)
        return key


def run_grid(
    notebook: str,
    configs: Iterable[Mapping],
    *,
    smoke: bool,
    executor=None,
    store: RecordStore | None = None,
    progress: bool = True,
) -> list[dict]:
    """:func:`lib.runner.run_grid` of a notebook's grid with its rows in the committed shard
    ``results/records/<notebook>.jsonl`` (full mode; with ``smoke`` exactly ``runner.run_grid``):
    the committed shards are imported first, every record computed lands in the shard as it is
    stored, and the rows of the whole grid are exported there at the end."""
    configs = list(configs)
    if smoke:
        return runner.run_grid(configs, store=store, executor=executor, progress=progress, desc=notebook)
    store = store if store is not None else RecordStore()
    import_shards(store=store)
    shard = shard_path(notebook)
    with ShardedStore(store.path, shard=shard, timeout_s=store.timeout_s) as sharded:
        records = runner.run_grid(configs, store=sharded, executor=executor, progress=progress, desc=notebook)
        counts = sharded.export_rows(configs, shard)
    print(
        f"{shard.relative_to(paths.ROOT) if shard.is_relative_to(paths.ROOT) else shard}: "
        f"{counts['exported']} records of this grid, {counts['kept'] + counts['added']} rows in all (commit it)"
    )
    return records


def expert_info_config(spec: Mapping) -> dict:
    """The record-store configuration of a pool's expert table (:attr:`lib.pool.Pool.expert_info`:
    each expert's key, metrics and training time), keyed like the pool's records."""
    return {
        "record": "expert_info",
        "pool": json.loads(json.dumps(dict(spec), default=paths._json_default)),
        "method": "expert_info",
        "version": method_version("expert_info"),
    }


def expert_info(
    notebook: str,
    spec: Mapping,
    loaded: pool.Pool | None = None,
    *,
    smoke: bool,
    store: RecordStore | None = None,
) -> tuple[list[dict], bool]:
    """``(expert table, loaded)`` of the pool ``spec``: the table the record store holds (from an
    earlier run, or imported from a shard), else that of ``loaded`` or of the pool loaded now
    (``loaded`` is then True: its weights were read), stored and, in full mode, exported into the
    notebook's shard. So a session whose store holds a seed's records and experts needs none of
    that seed's weights."""
    store = store if store is not None else RecordStore()
    config = expert_info_config(spec)
    stored = store.get(config)
    if stored is not None:
        return stored, loaded is not None
    p = loaded if loaded is not None else runner.load_pool(spec)
    store.put(config, p.expert_info)
    if not smoke:
        store.export_rows([config], shard_path(notebook))
    return store.get(config), True
