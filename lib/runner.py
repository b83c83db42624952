"""Experiment grids that survive a kill, never compute a record twice, and spread over workers.

A *grid* is a list of configurations, plain JSON dicts that say everything a record depends on
(:func:`pool_spec`, :func:`merge_config`, :func:`alone_config`, :func:`pool_grid`).
:func:`run_grid` looks each one up in the :class:`lib.store.RecordStore`, hands the missing ones
to an executor (:func:`lib.executors.make_executor`: inline, local processes, Dask, SLURM) and
writes every record into the store the moment its future completes -- the runner is the store's
single writer, workers only return records. A killed run (SIGKILL, power loss) loses at most the
records in flight; run it again and only those are computed. :func:`assemble` reads the records
of a grid back in the shape of ``results/*.json``'s ``records`` (the list published files hold).

>>> spec = pool_spec(["mnist", "fashion_mnist", "kmnist"], seed=0, smoke=True, variant="shared_init")
>>> subsets = pool.subset_plan(spec["tasks"], [2, 3], max_subsets=10, seed=0)
>>> configs = pool_grid(spec, subsets, [pool.canonical_run("average"), pool.canonical_run("star", eta=40)])
>>> records = run_grid(configs, executor=executors.from_env())   # EXECUTOR=processes:2, dask:tcp://host:8786

What a configuration holds. ``pool``: the pool's name, tasks, seed, SMOKE flag, variant, its
*source* and, from the source, each expert's cache key (its whole training configuration
hashed, :func:`lib.cache.config_key`) and the evaluation (split per task, examples scored, each
task scored under its own expert's head). A merge adds ``subset``, ``method``, ``hparams`` (all
of the method's hyperparameters, defaults filled in, as :func:`lib.pool.canonical_run` spells
them), ``version`` (:func:`lib.store.method_version`: bumped when the method's code or defaults
change) and ``merge_kwargs`` (``exclude``, ...). The experts and the base scored alone are one
configuration per pool (``record="alone"``). The same merge asked for by two notebooks has one
configuration, so it is computed once.

Workers build the pool from the configuration -- they load the experts from the cache by path,
no state dict travels -- and keep it for the next record of the same pool (one or two pools per
worker process, a :class:`lib.pool.PoolRunner` per thread, so a body identical to one the same
worker already scored is not scored again). Merging and scoring are :class:`lib.pool.PoolRunner`'s,
so the records are the ones the notebooks' pool loops produce. The fields that measure the run
rather than its result (:data:`MEASURED`: seconds, and ``reused``, which depends on what the
same worker scored before) differ between runs; :func:`comparable` drops them.

Sources. ``source`` names a class ``"module:Name"`` with static methods ``experts(spec)``
(task -> an identity, for the key), ``evaluation(spec)`` (a description, for the key),
``prepare(spec)`` (run once in the parent before any worker starts: trains missing experts) and
``build(spec) -> Pool`` (in the worker; an expert missing from the cache is an error naming it).
The default, :class:`CachedExperts`, is :mod:`lib.train`'s cache; tests use synthetic ones.

Sweeps (notebooks 01-03). :func:`sweep_spec` and :func:`sweep_grid` make the same kind of grid for
a sweep: every model of the setup merged together by each run (``record="sweep"``, the run's label
kept as :class:`lib.sweep.Run` spells it), plus the base and experts alone. Their source,
:class:`CachedSweep`, builds a :class:`lib.sweep.SweepSetup` (experts whole over a base, bodies
under their own heads, or the report's shared head); a worker keeps one
:class:`lib.sweep.SweepRunner` per setup, so its runs share one SNR prepass and one evaluation
cache as :func:`lib.sweep.sweep_seed` does (tested equal). The notebooks build their grids with
:mod:`lib.grids` and publish what :func:`run_grid` returns.

What is serial. The parent trains missing experts (:meth:`CachedExperts.prepare`) before it
submits anything, and each worker loads a pool once before its first record of that pool;
everything else -- one merge and its evaluation per record -- runs in parallel.
"""

from __future__ import annotations

import functools
import importlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import Any

from tqdm import tqdm

from . import cache as expert_cache
from . import data, executors, pool, sweep, train
from . import store as store_module
from .merge import get_method, merge, resolve_hparams
from .spectral import canonical_snr_method
from .store import RecordStore, config_key, method_version

#: record fields that measure the run, not its result: they differ between two runs of one grid
MEASURED = ("prepass_s", "merge_s", "eval_s", "reused")
DEFAULT_SOURCE = "lib.runner:CachedExperts"
#: pools a worker process keeps loaded (a grid is ordered pool by pool, so one is mostly enough)
POOLS_PER_WORKER = 2


class GridError(RuntimeError):
    """A record of a grid failed; every record finished before it is in the store."""


# --- sources ------------------------------------------------------------------------------------


class CachedExperts:
    """The experts of :mod:`lib.train`'s cache (``$SPECTRAL_MERGE_CACHE/experts``), as
    :func:`lib.pool.build_pool` loads them."""

    @staticmethod
    def _configs(spec: Mapping) -> dict[str, dict]:
        out = {
            t: expert_cache.expert_config(
                t, seed=spec["seed"], variant=spec["variant"], smoke=spec["smoke"], **expert_kw(spec, t)
            )
            for t in spec["tasks"]
        }
        if spec["variant"] == "mnist_base":  # the base is the MNIST expert
            out.setdefault("mnist (base)", expert_cache.expert_config("mnist", seed=spec["seed"], smoke=spec["smoke"]))
        return out

    @staticmethod
    def experts(spec: Mapping) -> dict[str, str]:
        return {name: expert_cache.config_key(c) for name, c in CachedExperts._configs(spec).items()}

    @staticmethod
    def evaluation(spec: Mapping) -> dict:
        kind = pool.kind_of(spec["tasks"])
        return {
            "split": {t: data.get_task(t).eval_split for t in spec["tasks"]},
            "examples": expert_cache.SMOKE_EVAL[kind] if spec["smoke"] else "all",
            "head": "each task's own expert",
        }

    @staticmethod
    def prepare(spec: Mapping, *, progress: bool = True) -> None:
        for config in CachedExperts._configs(spec).values():
            if not expert_cache.is_cached(config):
                train.fit_expert(
                    config["task"],
                    seed=spec["seed"],
                    variant=config["variant"],
                    smoke=spec["smoke"],
                    progress=progress,
                    **(expert_kw(spec, config["task"]) if config["task"] in spec["tasks"] else {}),
                )

    @staticmethod
    def build(spec: Mapping) -> pool.Pool:
        for name, config in CachedExperts._configs(spec).items():
            if not expert_cache.is_cached(config):
                raise FileNotFoundError(
                    f"expert {name} (seed {spec['seed']}, {config['variant']}, {'SMOKE' if spec['smoke'] else 'full'}"
                    f" mode) is not in the cache: {expert_cache.expert_path(expert_cache.config_key(config))} is missing; train it "
                    "with `make experts` (or let run_grid train it before the workers start)"
                )
        # each task's expert as _configs keys it (with its own task_kw), not build_pool's pool-wide keywords
        experts = {
            t: train.fit_expert(
                t, seed=spec["seed"], variant=spec["variant"], smoke=spec["smoke"], progress=False, **expert_kw(spec, t)
            )
            for t in spec["tasks"]
        }
        return pool.build_pool(
            spec["tasks"],
            seed=spec["seed"],
            smoke=spec["smoke"],
            variant=spec["variant"],
            name=spec["name"],
            expert_kw=expert_kw(spec),
            experts=experts,
        )


class CachedSweep:
    """The experts of notebooks 01-03's sweeps, from :mod:`lib.train`'s cache: every model of
    ``tasks`` merged whole over ``base_task``'s base (``setup="whole"``); their bodies over the
    base body, each task scored under its own expert's head (``"bodies"``); or the report's
    setup (``"report_head"``: the first expert whole, the second's body under a fresh, untrained
    head of the first task, scored on the first task and on collapsed Emotion labels)."""

    SETUPS = {
        "whole": "each task under its merged head",
        "bodies": "each task's own expert's head",
        "report_head": "one shared head of the first task; Emotion collapsed to sadness vs rest",
    }

    _configs = CachedExperts._configs  # the tasks' experts and, for mnist_base, the MNIST expert as base
    experts = CachedExperts.experts

    @staticmethod
    def evaluation(spec: Mapping) -> dict:
        if spec["setup"] not in CachedSweep.SETUPS:
            raise ValueError(f"unknown sweep setup {spec['setup']!r}; expected one of {sorted(CachedSweep.SETUPS)}")
        kind = pool.kind_of(spec["tasks"])
        return {
            "split": {t: data.get_task(t).eval_split for t in spec["tasks"]},
            "examples": expert_cache.SMOKE_EVAL[kind] if spec["smoke"] else "all",
            "head": CachedSweep.SETUPS[spec["setup"]],
        }

    prepare = CachedExperts.prepare

    @staticmethod
    def build(spec: Mapping) -> sweep.SweepSetup:
        seed, smoke, variant, tasks = spec["seed"], spec["smoke"], spec["variant"], spec["tasks"]
        for task, config in CachedExperts._configs(spec).items():
            if not expert_cache.is_cached(config):
                raise FileNotFoundError(
                    f"expert {task} (seed {seed}, {variant}, {'SMOKE' if smoke else 'full'} mode) is "
                    f"not in the cache: {expert_cache.expert_path(expert_cache.config_key(config))} is missing; "
                    "train it with `make experts` (or let run_grid train it first)"
                )
        trained = {
            t: train.fit_expert(t, seed=seed, variant=variant, smoke=smoke, progress=False, **expert_kw(spec, t))
            for t in tasks
        }
        info = [
            {"seed": seed, "task": t, "key": e.key, "from_cache": e.from_cache, **e.metrics, **e.runtime}
            for t, e in trained.items()
        ]
        if spec["setup"] != "bodies":
            base = train.base_state_dict(spec["base_task"], seed=seed, variant=variant, smoke=smoke)
        if spec["setup"] == "whole":
            models, evaluate = {t: e.state_dict for t, e in trained.items()}, sweep.evaluate_tasks(tasks, smoke=smoke)
        elif spec["setup"] == "bodies":  # a pool of notebooks 04-06: bodies merged over the base body
            p = pool.build_pool(
                tasks,
                seed=seed,
                smoke=smoke,
                variant=variant,
                name=spec["name"],
                expert_kw=expert_kw(spec),
                experts=trained,
            )
            models, base, evaluate = p.bodies, p.base, p.evaluator(tasks)
        else:  # the report's: the second expert's body under a fresh head of the first task
            first, second = tasks
            models = {
                first: trained[first].state_dict,
                second: train.fresh_head(
                    trained[second].state_dict, first, seed=expert_cache.derive_seed(seed, "report head")
                ),
            }
            evaluate = sweep.evaluate_report_head(smoke=smoke)
        return sweep.SweepSetup(
            name=spec["name"], seed=seed, base=base, models=models, evaluate=evaluate, expert_info=info
        )


def expert_kw(spec: Mapping, task: str | None = None) -> dict:
    """The extra :func:`lib.train.fit_expert` keywords of a pool's experts (``spec["expert_kw"]``,
    e.g. ``{"lora": True}``; none for the default full fine-tunes), and for ``task`` its own on top
    (``spec["task_kw"][task]``, e.g. a preset's smaller recipe for one task)."""
    kw = dict(spec.get("expert_kw") or {})
    if task is not None:
        kw.update((spec.get("task_kw") or {}).get(task) or {})
    return kw


def resolve_source(name: str):
    """The source class ``"module:Name"`` names."""
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"pool source {name!r} cannot be imported ({err}); give it as 'module:ClassName'") from None


# --- configurations -----------------------------------------------------------------------------


def pool_spec(
    tasks: Sequence[str],
    *,
    seed: int,
    smoke: bool,
    variant: str | None = None,
    name: str | None = None,
    source: str = DEFAULT_SOURCE,
    expert_kw: Mapping[str, Any] | None = None,
    **fields,
) -> dict:
    """The pool part of every configuration of a grid: name, tasks, seed, SMOKE flag, variant,
    source, and the source's expert identities and evaluation (``fields``: more for a custom
    source, e.g. a folder). ``expert_kw``: extra :func:`lib.train.fit_expert` keywords of the
    experts (``{"lora": True}``: LoRA experts, :mod:`lib.lora_pool`; smaller recipes), kept in the
    spec and so in every record's key (besides changing the experts' own keys); the spec holds no
    ``expert_kw`` entry without them, so the full fine-tunes' record keys are unchanged."""
    tasks = list(tasks)
    if len(tasks) < 2:
        raise ValueError(f"a pool needs at least two experts to merge, got {tasks}")
    if source == DEFAULT_SOURCE:
        kind = pool.kind_of(tasks)
        variant = variant or expert_cache.VARIANTS[kind][0]
        name = name or (kind if kind == "text" else f"{kind}/{variant}")
    elif name is None:
        raise ValueError(f"a pool from source {source!r} needs a name")
    spec = {
        "name": name,
        "tasks": tasks,
        "seed": int(seed),
        "smoke": bool(smoke),
        "variant": variant,
        "source": source,
        **({"expert_kw": dict(expert_kw)} if expert_kw else {}),
        **fields,
    }
    src = resolve_source(source)
    spec["experts"] = src.experts(spec)
    spec["evaluation"] = src.evaluation(spec)
    return spec


def merge_config(
    spec: Mapping,
    subset: Sequence[str],
    method: str,
    hparams: Mapping[str, Any] | None = None,
    *,
    merge_kwargs: Mapping[str, Any] | None = None,
) -> dict:
    """One merge of ``subset`` of the pool ``spec`` by ``method`` (hyperparameters resolved)."""
    unknown = [t for t in subset if t not in spec["tasks"]]
    if unknown:
        raise ValueError(f"{unknown} are not experts of pool {spec['name']!r} ({', '.join(spec['tasks'])})")
    return {
        "record": "merge",
        "pool": dict(spec),
        "subset": list(subset),
        "method": method,
        "hparams": resolve_hparams(get_method(method), canonical_hparams(hparams)),
        "version": method_version(method),
        "merge_kwargs": dict(merge_kwargs or {}),
    }


def canonical_hparams(hparams: Mapping[str, Any] | None) -> dict:
    """``hparams`` with an SNR variant under its name in use (``snr_method="seed"`` ->
    ``"report_text"``, :func:`lib.spectral.canonical_snr_method`), so that the old name and the new
    one make the same configuration, key and record."""
    out = dict(hparams or {})
    if out.get("snr_method") is not None:
        out["snr_method"] = canonical_snr_method(out["snr_method"])
    return out


def alone_config(spec: Mapping) -> dict:
    """Each expert of the pool on its own task and the base on every task
    (:meth:`lib.pool.PoolRunner.alone`): the denominators of normalized accuracy."""
    return {"record": "alone", "pool": dict(spec), "method": "alone", "version": method_version("alone")}


def pool_grid(
    spec: Mapping,
    subsets: Iterable[Sequence[str]],
    runs: Iterable[sweep.Run],
    *,
    alone: bool = True,
    merge_kwargs: Mapping[str, Any] | None = None,
) -> list[dict]:
    """The experts and base alone (unless ``alone=False``), then every subset by every run: the
    records of one pool and seed in the order a notebook's loop makes them."""
    runs = list(runs)
    out = [alone_config(spec)] if alone else []
    return out + [
        merge_config(spec, s, r.method, r.hparams(), merge_kwargs=merge_kwargs) for s in subsets for r in runs
    ]


def sweep_spec(
    tasks: Sequence[str],
    *,
    seed: int,
    smoke: bool,
    setup: str = "whole",
    base_task: str | None = None,
    variant: str | None = None,
    name: str | None = None,
    task_kw: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict:
    """The setup part of a sweep's configurations (notebooks 01-03, :class:`CachedSweep`): the
    models of ``tasks`` merged together over ``base_task``'s base (default: the first task).
    ``task_kw``: per-task :func:`lib.train.fit_expert` keywords (a preset's recipes,
    :func:`lib.presets.task_kw`), in the spec and so in every record's key; without them the spec
    has no ``task_kw`` entry and the published records keep their keys."""
    kind = pool.kind_of(tasks)
    variant = variant or expert_cache.VARIANTS[kind][0]
    name = name or f"{'+'.join(tasks)}/{variant}/{setup}"
    return pool_spec(
        tasks,
        seed=seed,
        smoke=smoke,
        variant=variant,
        name=name,
        source="lib.runner:CachedSweep",
        setup=setup,
        base_task=base_task or tasks[0],
        **({"task_kw": {t: dict(kw) for t, kw in task_kw.items() if kw}} if task_kw and any(task_kw.values()) else {}),
    )


def sweep_config(spec: Mapping, run: sweep.Run, *, merge_kwargs: Mapping[str, Any] | None = None) -> dict:
    """One merge of every model of the sweep setup ``spec`` by ``run`` (its label kept as the
    sweep spells it; its hyperparameters resolved, so a changed default is another key)."""
    return {
        "record": "sweep",
        "pool": dict(spec),
        "run": {
            "method": run.method,
            "snr_method": run.snr_method,
            "top": run.top,
            "threshold": run.threshold,
            "extra": dict(run.extra),
        },
        "method": run.method,
        "hparams": resolve_hparams(get_method(run.method), run.hparams()),
        "version": method_version(run.method),
        "merge_kwargs": dict(merge_kwargs or {}),
    }


def sweep_grid(
    spec: Mapping, runs: Iterable[sweep.Run], *, alone: bool = True, merge_kwargs: Mapping[str, Any] | None = None
) -> list[dict]:
    """The base and experts alone (unless ``alone=False``), then every run: the records
    :func:`lib.sweep.sweep_seed` makes for one seed."""
    out = [alone_config(spec)] if alone else []
    return out + [sweep_config(spec, r, merge_kwargs=merge_kwargs) for r in runs]


def describe(config: Mapping) -> str:
    """``vision/shared_init seed 0: mnist+kmnist star(eta=40, rescale=True)`` (for errors, bars)."""
    p = config["pool"]
    head = f"{p['name']} seed {p['seed']}"
    if config["record"] == "alone":
        return f"{head}: experts and base alone"
    if config["record"] == "sweep":
        return f"{head}: {sweep.Run(**config['run']).label()}"
    return f"{head}: {pool.subset_name(config['subset'])} {pool.canonical_run(config['method'], **config['hparams']).label()}"


def _canonical(config: Mapping) -> dict:
    # what the key hashes is what workers get: tuples become lists, every field JSON
    return json.loads(store_module.canonical(config))


# --- the worker side ----------------------------------------------------------------------------


_pools: OrderedDict[str, pool.Pool] = OrderedDict()
_pools_lock = threading.Lock()
_local = threading.local()


def _pool_for(spec: Mapping, *, prepare: bool) -> pool.Pool:
    key = config_key(spec)
    with _pools_lock:  # Dask's threaded workers share a process: build each pool once
        if key in _pools:
            _pools.move_to_end(key)
            return _pools[key]
        src = resolve_source(spec["source"])
        if prepare:
            src.prepare(spec)
        p = src.build(spec)
        identities = {e["task"]: e["key"] for e in p.expert_info if "key" in e}
        wrong = [t for t, k in identities.items() if t in spec["experts"] and spec["experts"][t] != k]
        if wrong:
            raise RuntimeError(
                f"pool {spec['name']!r} seed {spec['seed']}: the cached expert of {wrong[0]} has key "
                f"{identities[wrong[0]]}, the grid expects {spec['experts'][wrong[0]]}"
            )
        _pools[key] = p
        while len(_pools) > POOLS_PER_WORKER:
            _pools.popitem(last=False)
        return p


def load_pool(spec: Mapping, *, prepare: bool = True) -> pool.Pool:
    """The pool of ``spec`` as this process's inline worker holds it (its experts trained first
    when missing, unless ``prepare=False``): a notebook's diagnostics read the same pool its
    inline grid merges, loaded once."""
    return _pool_for(_canonical(spec), prepare=prepare)


def release() -> None:
    """Drop the pools (and their runners' evaluation caches) this process holds."""
    with _pools_lock:
        _pools.clear()
    _local.__dict__.clear()


def _runner_for(config: Mapping, *, prepare: bool) -> pool.PoolRunner:
    p = _pool_for(config["pool"], prepare=prepare)
    kwargs = config.get("merge_kwargs") or {}
    key = (config_key(config["pool"]), store_module.canonical(kwargs))
    runners = getattr(_local, "runners", None)
    if runners is None:
        runners = _local.runners = OrderedDict()
    runner = runners.get(key)
    if runner is None or runner.pool is not p:  # a pool evicted and built again gets a fresh runner
        if isinstance(p, sweep.SweepSetup):
            runner = sweep.SweepRunner(p)
        else:
            runner = pool.PoolRunner(p, progress=False, merge_fn=functools.partial(merge, **kwargs) if kwargs else None)
        runners[key] = runner
        while len(runners) > POOLS_PER_WORKER:
            runners.popitem(last=False)
    runners.move_to_end(key)
    return runner


def compute(config: Mapping, prepare: bool = False) -> tuple[list[dict], float]:
    """The records of one configuration and the seconds they took (run in a worker).
    ``prepare``: let the source train missing experts first (inline runs)."""
    executors.configure_threads()
    t0 = time.perf_counter()
    runner = _runner_for(config, prepare=prepare)
    if config["record"] == "alone":
        records = runner.alone()
    elif config["record"] == "merge":
        run = pool.canonical_run(config["method"], **config["hparams"])
        records = runner.run([tuple(config["subset"])], [run], progress=False)
    elif config["record"] == "sweep":
        records = runner.run(sweep.Run(**config["run"]), **(config.get("merge_kwargs") or {}))
    else:
        raise ValueError(f"unknown record kind {config['record']!r}; expected 'merge', 'sweep' or 'alone'")
    return records, time.perf_counter() - t0


# --- the parent side ----------------------------------------------------------------------------


def plan(configs: Iterable[Mapping], store: RecordStore | None = None) -> tuple[list[dict], list[dict]]:
    """``(done, todo)``: the distinct configurations of a grid the store has and the ones it
    lacks, in grid order."""
    store = store if store is not None else RecordStore()
    unique: dict[str, dict] = {}
    for c in configs:
        c = _canonical(c)
        unique.setdefault(config_key(c), c)
    present = store.keys()
    done = [c for k, c in unique.items() if k in present]
    todo = [c for k, c in unique.items() if k not in present]
    return done, todo


def _window(executor: Executor, todo: int) -> int:
    # inline: one at a time, so each record is stored before the next starts; a local pool: a
    # queue twice its size; a cluster scheduler queues everything itself
    if isinstance(executor, executors.InlineExecutor):
        return 1
    if isinstance(executor, executors.LocalProcesses):
        return 2 * executor.workers
    return max(todo, 1)


def run_grid(
    configs: Iterable[Mapping],
    *,
    store: RecordStore | None = None,
    executor: str | Executor | None = None,
    progress: bool = True,
    desc: str = "records",
) -> list[dict]:
    """Compute every configuration the store lacks, storing each record as it completes, and
    return the records of the whole grid (:func:`assemble`).

    ``executor``: a spec for :func:`lib.executors.make_executor` (created and shut down here) or
    an executor (the caller shuts it down). One progress bar over the whole grid, its ETA from
    the records computed in this run. A failing record stops the grid: nothing new is started,
    what finishes meanwhile is stored, and :class:`GridError` names the configuration (its
    description and key); every record finished before is in the store.
    """
    configs = [_canonical(c) for c in configs]
    store = store if store is not None else RecordStore()
    done, todo = plan(configs, store)
    for config in done:  # a foreign or corrupt row stops the grid now, not after hours of work
        store.get(config)
    if not todo:
        return assemble(configs, store)
    owned = not isinstance(executor, Executor)
    ex = executors.make_executor(executor)
    inline = isinstance(ex, executors.InlineExecutor)
    try:
        if not inline:  # the serial part: experts are trained here, before any worker needs them
            for spec in {config_key(c["pool"]): c["pool"] for c in todo}.values():
                resolve_source(spec["source"]).prepare(spec)
        _drive(
            ex,
            todo,
            store,
            total=len(done) + len(todo),
            initial=len(done),
            progress=progress,
            desc=desc,
            prepare=inline,
        )
    finally:
        if owned:
            ex.shutdown(wait=True, cancel_futures=True)
    return assemble(configs, store)


def _drive(
    ex: Executor,
    todo: list[dict],
    store: RecordStore,
    *,
    total: int,
    initial: int,
    progress: bool,
    desc: str,
    prepare: bool,
) -> None:
    bar = tqdm(total=total, initial=initial, desc=desc, unit="record", smoothing=0, disable=not progress)
    queue = iter(todo)
    window = _window(ex, len(todo))
    pending: dict[Future, dict] = {}
    failure: tuple[dict, BaseException] | None = None

    def fill():
        while failure is None and len(pending) < window:
            config = next(queue, None)
            if config is None:
                return
            pending[ex.submit(compute, config, prepare)] = config

    try:
        fill()
        while pending:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in finished:
                config = pending.pop(future)
                if future.cancelled():
                    continue
                err = future.exception()
                if err is not None:
                    if failure is None:
                        failure = (config, err)
                        for other in pending:  # start nothing new; what is running may finish
                            other.cancel()
                    continue
                records, seconds = future.result()
                store.put(config, records, seconds=seconds)
                bar.set_postfix_str(describe(config), refresh=False)
                bar.update()
            fill()
    finally:
        bar.close()
        for future in pending:
            future.cancel()
    if failure is not None:
        config, err = failure
        raise GridError(
            f"record {describe(config)} (key {config_key(config)}) failed: {type(err).__name__}: {err}; "
            f"every record finished before it is in {store.path}"
        ) from err


def assemble(configs: Iterable[Mapping], store: RecordStore | None = None) -> list[dict]:
    """The records of ``configs`` from the store, in grid order (each configuration once), as
    ``results/*.json`` holds them. A configuration not in the store is an error naming it."""
    store = store if store is not None else RecordStore()
    out, seen = [], set()
    for c in configs:
        c = _canonical(c)
        key = config_key(c)
        if key in seen:
            continue
        seen.add(key)
        payload = store.get(c)
        if payload is None:
            raise KeyError(f"record {describe(c)} (key {key}) is not in {store.path}; run_grid computes it")
        out += payload
    return out


def comparable(records: Iterable[Mapping]) -> list[dict]:
    """``records`` without the fields that measure the run (:data:`MEASURED`): equal for two
    runs of one grid whatever executed them."""
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in records]


# --- planning a cluster run from measured times ---------------------------------------------------

#: the worker counts the README's planning table shows
PLAN_WORKERS = (1, 2, 16, 64)


def record_seconds(records: Iterable[Mapping], namespace: str = "") -> dict[tuple, float]:
    """Seconds each model of a results file took to merge and score (``prepass_s + merge_s +
    eval_s`` of one model; a model's records, one per task and metric, share those fields),
    each model once: the units :func:`run_grid` spreads over workers. Records without a pool
    (the report's sweeps, notebooks 01-03) are told apart by ``namespace``."""
    seen: dict[tuple, float] = {}
    for r in records:
        key = (r.get("pool") or namespace, r.get("seed"), r.get("subset"), r.get("run"), r.get("model"))
        seen.setdefault(key, sum(float(r.get(k) or 0.0) for k in ("prepass_s", "merge_s", "eval_s")))
    return seen


def expected_wall_seconds(
    times: Iterable[float], serial_s: float, workers: Sequence[int] = PLAN_WORKERS
) -> dict[str, Any]:
    """What records taking ``times`` seconds each in one process, plus ``serial_s`` of work that
    does not spread (loading experts, spectra and diagnostics, fits, tables), should take on
    ``W`` workers: ``serial + max(longest record, sum / W)``. It leaves out each worker's start
    (importing torch, loading its pool: about 10 s a worker, ``benchmarks/grid.py``) and assumes
    workers as fast as the machine that measured."""
    times = [float(t) for t in times]
    parallel = sum(times)
    longest = max(times, default=0.0)
    return {
        "records": len(times),
        "parallel_s": parallel,
        "serial_s": float(serial_s),
        "longest_s": longest,
        "wall_s": {int(w): float(serial_s) + max(longest, parallel / w) for w in workers},
    }


def cluster_plan(results: Mapping[str, Mapping], total_seconds, workers: Sequence[int] = PLAN_WORKERS) -> list[dict]:
    """Expected wall times of each notebook's full grid and of all of them (``make reproduce``)
    on ``workers`` workers, from the per-record times their results files measured in one
    process. ``results``: notebook -> its results, in run order; ``total_seconds(r)``: its
    measured run time. A model already computed by an earlier notebook (04's merges that 05
    reuses) counts once, where it was first computed, as it does with the record store; a
    notebook's serial part is its run time less its own records' seconds."""
    seen: set[tuple] = set()
    rows, all_times, all_serial = [], [], 0.0
    for nb, r in results.items():
        own = {k: t for k, t in record_seconds(r.get("records", []), nb).items() if k not in seen}
        seen.update(own)
        total = total_seconds(r)
        if total is None:
            continue
        serial = max(0.0, float(total) - sum(own.values()))
        rows.append({"notebook": nb, **expected_wall_seconds(own.values(), serial, workers)})
        all_times += own.values()
        all_serial += serial
    rows.append({"notebook": "all", **expected_wall_seconds(all_times, all_serial, workers)})
    return rows
