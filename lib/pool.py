"""Expert pools: merge subsets of experts fine-tuned from one base, as STAR (seed 002) and DRM
(seed 004) do, and score them by normalized accuracy. The runner of notebooks 04-06.

A *pool* (:class:`Pool`, :func:`build_pool`) is the experts of one kind, starting point and seed:
the seven text experts on the shared MiniLM body, or the vision experts of one variant. Each
expert is split into its *body* (merged) and its head (kept per task). A merged body is scored
on each task of its subset under that task's own head, and the headline number is the papers'
*normalized accuracy*: merged accuracy / the expert's accuracy on the same task, averaged over
the subset's tasks (1 = as good as every expert alone).

>>> pool = build_pool(["sst2", "cola", "trec"], seed=0, smoke=True)
>>> subsets = subset_plan(pool.tasks, sizes=[2, 3], max_subsets=10, seed=0)
>>> runner = PoolRunner(pool)
>>> records = runner.alone() + runner.run(subsets, [sweep.Run("star", extra={"eta": 40})])
>>> size_summary(records)        # mean +- std over seeds, per pool, subset size and merge

Subsets of each size are all combinations when there are at most ``max_subsets`` of them, else
that many drawn without replacement by a seeded generator (:func:`task_subsets`), as DRM's
"at most 10 distinct combinations for each subset size" (STAR samples 5 per size for Flan-T5). Drawing them with the expert seed gives every seed other
combinations, so the spread over seeds covers both the training seed and the choice of tasks.

Everything about merging and evaluating a model is reused from :mod:`lib.sweep`: runs are
:class:`lib.sweep.Run`, :func:`lib.sweep.run_sweep` merges and times, and
:class:`lib.sweep.CachedEvaluate` scores a body identical to one already scored (STAR at
``eta=100`` with and without rescaling) once. The evaluation is a callable per subset,
``evaluate_for(subset) -> evaluate(body) -> {task: {metric: value}}`` (:meth:`Pool.evaluator`;
tests pass a fake one).

Records are :func:`lib.sweep.run_sweep`'s, plus ``pool``, ``kind``, ``subset`` (task names joined
by ``+``), ``size`` and ``hparams`` (the method's hyperparameters with its defaults filled in),
so a table can select ``star`` runs by ``hp_eta`` (:func:`task_scores` expands them as ``hp_*``
columns). Each expert alone is recorded with ``method="expert"``, the base body under each task's
head with ``method="base"`` (the papers' "pretrained model": merging that scores below it has
lost its purpose).

The diagnostics look inside the methods: :func:`star_ranks` (the rank STAR keeps per matrix),
:func:`drm_profile` and :func:`drm_pruning_summary` (what DRM's renormalisation changes in its
pruning, :func:`lib.merge.drm.row_profile`). :func:`estimate_seconds` extrapolates a full-mode
runtime from the measured merge and evaluation times.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import cache as expert_cache
from . import data, stats, sweep, train
from .claims import Claim
from .device import get_device
from .linalg import gram_eigh, shape_batches
from .merge import drm as drm_method
from .merge import get_method, resolve_hparams, stack
from .merge.star import BATCH_ELEMENTS, kept_rank
from .statedict import StateDict, matches

EvaluateFor = Callable[[Sequence[str]], sweep.Evaluate]

#: the methods whose records are not merges
ALONE = ("expert", "base")
#: the columns that identify a scored model in the records (a sweep's have no pool or subset)
MODEL_COLUMNS = ["pool", "seed", "subset", "run", "method", "model"]
#: subset scores are grouped by these columns (``run`` names the merge with all its hyperparameters)
SUBSET_COLUMNS = ["pool", "kind", "seed", "size", "subset", "run"]


# --- pools -------------------------------------------------------------------------------------


@dataclass
class Pool:
    """Experts of one kind sharing one base: ``bodies`` (task -> the expert without its head) are
    merged, ``heads`` (task -> a state dict holding the task's head, e.g. the whole expert) score
    the merged bodies, ``base`` is the common starting point's body."""

    name: str
    kind: str
    seed: int
    smoke: bool
    base: StateDict
    bodies: dict[str, StateDict]
    heads: dict[str, StateDict]
    expert_info: list[dict] = field(default_factory=list)  # per expert: key, cache status, metrics, runtime

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.bodies)

    def evaluator(self, subset: Sequence[str]) -> sweep.Evaluate:
        """Scores a body on every task of ``subset`` under the task's own head (evaluation split;
        SMOKE: lib.train's fixed slice)."""
        unknown = [t for t in subset if t not in self.heads]
        if unknown:
            raise ValueError(f"{unknown} are not experts of pool {self.name!r} ({', '.join(self.tasks)})")
        return sweep.evaluate_tasks(list(subset), smoke=self.smoke, heads=self.heads)


def kind_of(tasks: Sequence[str]) -> str:
    """``"text"`` or ``"vision"``: the one kind of all ``tasks``."""
    kinds = {data.get_task(t).kind for t in tasks}
    if len(kinds) != 1:
        raise ValueError(f"a pool holds experts of one kind, got text and vision tasks: {list(tasks)}")
    return kinds.pop()


def build_pool(
    tasks: Sequence[str],
    *,
    seed: int,
    smoke: bool,
    variant: str | None = None,
    name: str | None = None,
    expert_kw: Mapping | None = None,
    experts: Mapping | None = None,
    progress: bool = False,
) -> Pool:
    """Train (or load from the cache) the experts of ``tasks`` for ``seed`` and ``variant`` (see
    :mod:`lib.train`) and split them into bodies and heads. All tasks must be of one kind; MNIST
    is an expert only in the ``shared_init`` variant (it is the ``mnist_base`` variant's base).
    ``expert_kw``: extra :func:`lib.train.fit_expert` keywords (``{"lora": True}``: notebook 07's
    LoRA experts); such a pool is named ``text-lora`` (``text-custom`` for other keywords) and its
    experts' records say whether they are LoRA adapters. ``experts``: the tasks' experts (task ->
    :class:`lib.cache.Expert`) where the caller has loaded them already, so they are not loaded twice."""
    expert_kw = dict(expert_kw or {})
    if len(tasks) < 2:
        raise ValueError(f"a pool needs at least two experts to merge, got {list(tasks)}")
    kind = kind_of(tasks)
    variant = variant or expert_cache.VARIANTS[kind][0]
    if "mnist" in tasks and variant != "shared_init":
        raise ValueError("MNIST is the base of the mnist_base variant, not an expert; use variant='shared_init'")
    if expert_kw:
        name = name or f"{kind}-{'lora' if expert_kw.get('lora') else 'custom'}"
    name = name or (kind if kind == "text" else f"{kind}/{variant}")
    experts = {
        t: experts[t]
        if experts is not None
        else train.fit_expert(t, seed=seed, variant=variant, smoke=smoke, progress=progress, **expert_kw)
        for t in tasks
    }
    base, _ = train.split_head(train.base_state_dict(tasks[0], seed=seed, variant=variant, smoke=smoke), kind)
    return Pool(
        name=name,
        kind=kind,
        seed=seed,
        smoke=smoke,
        base=base,
        bodies={t: train.split_head(e.state_dict, kind)[0] for t, e in experts.items()},
        heads={t: e.state_dict for t, e in experts.items()},
        expert_info=[
            {
                "pool": name,
                "seed": seed,
                "task": t,
                "variant": e.variant,
                "key": e.key,
                "from_cache": e.from_cache,
                **{k: v for k, v in e.metrics.items() if k != "n"},
                "n_eval": e.metrics.get("n"),
                "train_s": e.runtime.get("train_s"),
                **({"lora": bool(e.config.get("lora"))} if expert_kw else {}),
            }
            for t, e in experts.items()
        ],
    )


# --- subsets -----------------------------------------------------------------------------------


def task_subsets(tasks: Sequence[str], size: int, *, max_subsets: int = 10, seed: int = 0) -> list[tuple[str, ...]]:
    """The subsets of ``size`` tasks merged together: every combination (in ``tasks``' order) when
    there are at most ``max_subsets``, else ``max_subsets`` distinct ones drawn by a generator
    seeded with ``(seed, size, len(tasks))`` -- the same draw on every machine and run."""
    if not 2 <= size <= len(tasks):
        raise ValueError(f"subset size must be between 2 and the {len(tasks)} tasks of the pool, got {size}")
    if max_subsets < 1:
        raise ValueError(f"max_subsets must be at least 1, got {max_subsets}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks repeat: {list(tasks)}")
    combos = list(itertools.combinations(tasks, size))
    if len(combos) <= max_subsets:
        return combos
    rng = np.random.default_rng([seed, size, len(tasks)])
    return [combos[i] for i in sorted(rng.choice(len(combos), size=max_subsets, replace=False))]


def subset_plan(
    tasks: Sequence[str], sizes: Iterable[int], *, max_subsets: int = 10, seed: int = 0
) -> list[tuple[str, ...]]:
    """:func:`task_subsets` for every size in ``sizes`` larger than 1 and at most the pool's size,
    smallest first (sizes the pool cannot fill are skipped, so one grid serves pools of 2 and 7)."""
    return [
        s
        for size in sorted(set(sizes))
        if 2 <= size <= len(tasks)
        for s in task_subsets(tasks, size, max_subsets=max_subsets, seed=seed)
    ]


def subset_name(subset: Sequence[str]) -> str:
    return "+".join(subset)


def subset_tasks(name: str) -> list[str]:
    return name.split("+")


def canonical_run(method: str, **hparams) -> sweep.Run:
    """A :class:`lib.sweep.Run` with every hyperparameter of ``method`` spelled out (defaults filled
    in), so that one merge has one label whichever sweep asks for it."""
    return sweep.Run(method, extra=resolve_hparams(get_method(method), hparams))


def reference_run(reference: str | tuple[str, Mapping] | list) -> sweep.Run:
    """The canonical run of a grid's reference: a method name (its registered defaults) or a
    ``(method, hyperparameters)`` pair (a list once read back from JSON)."""
    method, hp = (reference, {}) if isinstance(reference, str) else reference
    return canonical_run(method, **hp)


def short_name(run: sweep.Run) -> str:
    """The method and the hyperparameters that differ from its defaults: ``star``,
    ``star(eta=10)``, ``drm_h(renorm=False)``; for legends."""
    defaults = get_method(run.method).defaults
    changed = [f"{k}={v}" for k, v in run.hparams().items() if defaults.get(k, object()) != v]
    return run.method + (f"({', '.join(changed)})" if changed else "")


# --- the runner ---------------------------------------------------------------------------------


class PoolRunner:
    """Merges subsets of one pool and scores them, sharing an evaluation cache per subset across
    calls (a run repeated in two sweeps, or a body that coincides with another, is scored once)."""

    def __init__(
        self,
        pool: Pool,
        evaluate_for: EvaluateFor | None = None,
        *,
        progress: bool = True,
        merge_fn: Callable[..., StateDict] | None = None,
    ):
        self.pool = pool
        self.evaluate_for = evaluate_for or pool.evaluator
        self.progress = progress
        self.merge_fn = merge_fn
        self.caches: dict[str, sweep.CachedEvaluate] = {}

    def _tag(self, records: list[dict], subset: Sequence[str] | None, run: sweep.Run | None) -> list[dict]:
        size = len(subset) if subset is not None else 0
        hp = {} if run is None else resolve_hparams(get_method(run.method), run.hparams())
        return [
            {
                "pool": self.pool.name,
                "kind": self.pool.kind,
                **r,
                "subset": subset_name(subset) if subset is not None else None,
                "size": size,
                "hparams": hp,
            }
            for r in records
        ]

    def alone(self) -> list[dict]:
        """Each expert on its own task (``method="expert"``, ``size`` 1) and the base body on every
        task under the task's head (``method="base"``, ``size`` 0): the denominators and the floor
        of normalized accuracy."""
        out = []
        for task in self.pool.tasks:
            recs = sweep.evaluate_models(
                {task: self.pool.bodies[task]}, self.evaluate_for((task,)), seed=self.pool.seed, method="expert"
            )
            out += self._tag(recs, (task,), None)
        recs = sweep.evaluate_models(
            {"base": self.pool.base}, self.evaluate_for(self.pool.tasks), seed=self.pool.seed, method="base"
        )
        return out + self._tag(recs, None, None)

    def run(
        self, subsets: Sequence[Sequence[str]], runs: Sequence[sweep.Run], *, progress: bool | None = None
    ) -> list[dict]:
        """Merge each subset's bodies once per run and score the merged body on the subset's tasks
        (a progress bar over the merges unless ``progress`` or the runner's setting says not)."""
        out = []
        bar = tqdm(
            total=len(subsets) * len(runs),
            desc=f"{self.pool.name} seed {self.pool.seed}",
            disable=not (self.progress if progress is None else progress),
            leave=False,
        )
        for subset in subsets:
            name = subset_name(subset)
            if name not in self.caches:
                self.caches[name] = sweep.CachedEvaluate(self.evaluate_for(subset))
            cache = self.caches[name]
            experts = [self.pool.bodies[t] for t in subset]
            for run in runs:
                recs = sweep.run_sweep(
                    self.pool.base,
                    experts,
                    cache.evaluate,
                    [run],
                    seed=self.pool.seed,
                    merge_fn=self.merge_fn,
                    cache=cache,
                    share_prepass=False,
                    progress=False,
                )
                out += self._tag(recs, subset, run)
                bar.update()
        bar.close()
        return out


# --- scores -------------------------------------------------------------------------------------


def task_scores(records: Iterable[Mapping], metric: str = "accuracy") -> pd.DataFrame:
    """One row per merged (or base) model and task with ``value``, the task's ``expert`` value (same
    pool and seed) and ``normalized = value / expert``; hyperparameters as ``hp_*`` columns."""
    df = pd.DataFrame(list(records))
    if df.empty:
        raise ValueError("no records")
    df = df[df.metric == metric]
    experts = df[df.method == "expert"].set_index(["pool", "seed", "task"])["value"]
    if experts.index.duplicated().any():
        raise ValueError(f"an expert was recorded twice: {experts.index[experts.index.duplicated()][0]}")
    out = df[df.method != "expert"].reset_index(drop=True)
    out["expert"] = experts.reindex(pd.MultiIndex.from_frame(out[["pool", "seed", "task"]])).to_numpy()
    missing = out[out.expert.isna()]
    if not missing.empty:
        r = missing.iloc[0]
        raise ValueError(
            f"no {metric} of the {r.task!r} expert of pool {r.pool!r}, seed {r.seed}: record the "
            "experts alone first (PoolRunner.alone)"
        )
    if (out.expert <= 0).any():
        r = out[out.expert <= 0].iloc[0]
        raise ValueError(
            f"the {r.task!r} expert scores {r.expert} {metric}: normalized scores are undefined; use a "
            "metric every expert scores above 0 on"
        )
    out["normalized"] = out.value / out.expert
    hp = pd.json_normalize(out["hparams"].map(lambda h: h if isinstance(h, Mapping) else {}).tolist())
    hp.columns = [f"hp_{c}" for c in hp.columns]
    return pd.concat([out.drop(columns=["hparams"]), hp], axis=1)


def subset_scores(records: Iterable[Mapping], metric: str = "accuracy") -> pd.DataFrame:
    """The papers' number: normalized score averaged over the tasks of each merged subset, one row
    per (pool, seed, subset, run). The base appears once per subset (``run="base"``), averaged over
    the same tasks."""
    t = task_scores(records, metric)
    merged = t[t.method != "base"]
    hp_cols = [c for c in t.columns if c.startswith("hp_")]
    agg = {"method": "first", "normalized": "mean", "task": "count", **{c: "first" for c in hp_cols}}
    out = merged.groupby(SUBSET_COLUMNS, sort=False, dropna=False).agg(agg).reset_index()
    out = out.rename(columns={"task": "tasks"})
    if (out.tasks != out["size"]).any():
        bad = out[out.tasks != out["size"]].iloc[0]
        raise ValueError(f"run {bad.run!r} on {bad.subset!r} was scored on {bad.tasks} of its {bad['size']} tasks")
    base = t[t.method == "base"].set_index(["pool", "seed", "task"])["normalized"]
    rows = []
    for (pool, kind, seed, size, subset), _ in out.groupby(["pool", "kind", "seed", "size", "subset"], sort=False):
        tasks = subset_tasks(subset)
        keys = [(pool, seed, task) for task in tasks]
        if all(k in base.index for k in keys):
            rows.append(
                {
                    "pool": pool,
                    "kind": kind,
                    "seed": seed,
                    "size": size,
                    "subset": subset,
                    "run": "base",
                    "method": "base",
                    "normalized": float(np.mean([base[k] for k in keys])),
                    "tasks": len(tasks),
                }
            )
    return pd.concat([out, pd.DataFrame(rows)], ignore_index=True) if rows else out


def size_summary(records: Iterable[Mapping], metric: str = "accuracy") -> pd.DataFrame:
    """Per pool, subset size and run: :func:`lib.stats.over_seeds` of the normalized scores (the
    mean over subsets of each seed, then ``mean``, ``std`` and ``n`` seeds), with the number of
    ``subsets`` per seed."""
    s = subset_scores(records, metric)
    hp_cols = [c for c in s.columns if c.startswith("hp_")]
    by = ["pool", "kind", "size", "run"]
    first_seen = {run: i for i, run in enumerate(s.run.unique())}  # runs in the order the grid made them
    out = stats.over_seeds(s, by).sort_values(
        ["pool", "size", "run"], kind="stable", key=lambda c: c.map(first_seen) if c.name == "run" else c
    )
    out = out.join(s.groupby("run", sort=False)[["method", *hp_cols]].first(), on="run")
    subsets = s.groupby([*by, "seed"], sort=False, dropna=False)["subset"].count().groupby(level=by).mean()
    out["subsets"] = subsets.reindex(pd.MultiIndex.from_frame(out[by])).to_numpy()
    return out.reset_index(drop=True)


def select(frame: pd.DataFrame, method: str, **hparams) -> pd.DataFrame:
    """Rows of ``method`` whose hyperparameters equal ``hparams`` (``eta=40`` matches ``hp_eta``)."""
    out = frame[frame.method == method]
    for k, v in hparams.items():
        col = f"hp_{k}"
        if col not in out.columns:
            raise ValueError(
                f"{method!r} records have no hyperparameter {k!r}; they have "
                f"{[c[3:] for c in out.columns if c.startswith('hp_') and out[c].notna().any()]}"
            )
        out = out[out[col] == v]
    return out


def best_setting(
    records: Iterable[Mapping], method: str, param: str, *, metric: str = "accuracy", **fixed
) -> pd.DataFrame:
    """For each pool, seed and subset: the value of ``param`` of ``method`` (other hyperparameters
    fixed by ``fixed``) with the highest normalized score (the smallest value on ties), and that score."""
    s = select(subset_scores(records, metric), method, **fixed)
    if s.empty:
        raise ValueError(f"no {method!r} runs with {fixed} in these records")
    s = s.sort_values(f"hp_{param}", kind="stable")
    idx = s.groupby(["pool", "seed", "size", "subset"], sort=False)["normalized"].idxmax()
    best = s.loc[idx, ["pool", "kind", "seed", "size", "subset", f"hp_{param}", "normalized"]]
    return (
        best.rename(columns={f"hp_{param}": "best"}).sort_values(["pool", "size"], kind="stable").reset_index(drop=True)
    )


def density_sensitivity(
    records: Iterable[Mapping],
    methods: Sequence[Mapping],
    densities: Sequence[float],
    sizes: Mapping[str, Sequence[int]],
    *,
    metric: str = "accuracy",
) -> pd.DataFrame:
    """Notebook 05's sensitivity to the density (DRM's Figure 7): per pool, subset size and method
    of ``methods`` (``{"method", "name", "fixed"}``), over ``densities`` at the subset ``sizes``
    (kind -> sizes) the density sweep covers, the density with the best mean over seeds
    (``best_density``), that mean (``best``) and the curve's spread, best minus worst mean in
    normalized points (``spread_points``)."""
    summary = size_summary(records, metric)
    curves = pd.concat([select(summary, m["method"], **m.get("fixed", {})).assign(name=m["name"]) for m in methods])
    curves = curves[curves.hp_density.isin(densities) & curves.apply(lambda r: r["size"] in sizes[r["kind"]], axis=1)]
    return (
        curves.groupby(["pool", "size", "name"])
        .apply(
            lambda g: pd.Series(
                {
                    "best_density": g.loc[g["mean"].idxmax(), "hp_density"],
                    "best": g["mean"].max(),
                    "spread_points": 100 * (g["mean"].max() - g["mean"].min()),
                }
            ),
            include_groups=False,
        )
        .reset_index()
    )


def paired_differences(
    records: Iterable[Mapping], better: str, worse: str, *, metric: str = "accuracy"
) -> pd.DataFrame:
    """``better - worse`` (run labels, or ``"base"``) in normalized points (x100) on every (pool,
    seed, subset) where both were scored: a comparison on the same experts and tasks."""
    s = subset_scores(records, metric)
    wide = s[s.run.isin([better, worse])].pivot_table(
        index=["pool", "kind", "seed", "size", "subset"], columns="run", values="normalized", aggfunc="first"
    )
    missing = {better, worse} - set(wide.columns)
    if missing:
        raise ValueError(f"no scores of {sorted(missing)} in these records; runs present: {sorted(s.run.unique())}")
    wide = wide.dropna()
    return (100 * (wide[better] - wide[worse])).rename("difference").reset_index()


def rescale_gain(records: Iterable[Mapping], metric: str = "accuracy") -> pd.Series:
    """STAR with minus without rescaling, in normalized points (x100), on every (pool, seed, size,
    subset, eta) where both were scored: notebook 04's rescale ablation (its table and figure)."""
    s = select(subset_scores(records, metric), "star")
    wide = s.pivot_table(index=["pool", "seed", "size", "subset", "hp_eta"], columns="hp_rescale", values="normalized")
    wide = wide.dropna()
    return 100 * (wide[True] - wide[False])


def trend(frame: pd.DataFrame, x: str, y: str) -> dict[str, float]:
    """Least-squares slope of ``y`` against ``x`` over the rows, and the Spearman rank correlation."""
    from scipy.stats import spearmanr

    if frame[x].nunique() < 2:
        return {"slope": float("nan"), "spearman": float("nan"), "points": len(frame)}
    slope = float(np.polyfit(frame[x].astype(float), frame[y].astype(float), 1)[0])
    # a constant y (the same best setting everywhere) has no rank correlation
    rho = float(spearmanr(frame[x], frame[y]).statistic) if frame[y].nunique() > 1 else float("nan")
    return {"slope": slope, "spearman": rho, "points": len(frame)}


def slopes(records: Iterable[Mapping], runs: Sequence[str], *, metric: str = "accuracy") -> pd.DataFrame:
    """Per pool and run: how normalized accuracy (in points) changes with each extra merged task,
    the least-squares slope over every scored subset (:func:`trend`)."""
    s = subset_scores(records, metric)
    rows = []
    for (name, run), g in s[s.run.isin(runs)].groupby(["pool", "run"], sort=False):
        rows.append(
            {
                "pool": name,
                "run": run,
                "method": g.method.iloc[0],
                **trend(g.assign(points=100 * g.normalized), "size", "points"),
            }
        )
    return pd.DataFrame(rows)


#: the confidence level of :func:`compare_effects`' intervals
EFFECT_LEVEL = stats.LEVEL
#: a baseline within this many normalized points of chance counts as "at chance"
CHANCE_MARGIN = 2.0


def chance_normalized(
    records: Iterable[Mapping], chance: Mapping[str, float], *, metric: str = "accuracy"
) -> pd.DataFrame:
    """Per (pool, seed, subset): the normalized score of guessing (``chance``: task -> the
    chance score of ``metric``, :func:`lib.sweep.chance_scores`), averaged over the subset's
    tasks as :func:`subset_scores` averages a merge: the floor below which a merge has learned
    nothing."""
    s = subset_scores(records, metric)
    t = task_scores(records, metric)
    experts = t.drop_duplicates(["pool", "seed", "task"]).set_index(["pool", "seed", "task"])["expert"]
    keys = s.drop_duplicates(["pool", "seed", "subset"])[["pool", "seed", "subset"]]
    keys = keys[keys.subset.notna()]
    keys["chance"] = [
        float(np.mean([chance[task] / experts[(p, seed, task)] for task in subset_tasks(sub)]))
        for p, seed, sub in keys.itertuples(index=False)
    ]
    return keys.reset_index(drop=True)


def _seed_means(d: pd.DataFrame, column: str) -> pd.Series:
    return d.groupby("seed")[column].mean()


def compare_effects(
    records: Iterable[Mapping],
    effects: Iterable[Claim],
    *,
    metric: str = "accuracy",
    chance: Mapping[str, float] | None = None,
    level: float = EFFECT_LEVEL,
) -> pd.DataFrame:
    """One row per effect claim (:class:`lib.claims.Claim`): the paper's size beside ours (``better - worse`` in normalized points,
    the mean over the subsets of each seed, then mean and sample std over seeds), a paired
    Student-t interval at ``level`` over the per-seed means (both runs are scored on the same
    experts and subsets; with one seed, over its subsets, said in ``interval_over``), how many
    subsets ``better`` won, and whether our effect agrees with the paper.

    ``worse_score``, ``base_score`` and (given ``chance``, task -> chance score) ``chance_score``
    are the normalized scores of the baseline, of the base and of guessing, in points. A baseline
    within :data:`CHANCE_MARGIN` points of chance, or below the base, is ``baseline`` "at chance"
    or "below the base": beating it says the baseline failed, not that ``better`` is better, so it
    is never counted as agreement. ``agrees``: "yes" (the paper's sign, interval clear of zero,
    a working baseline), "no" (the opposite sign, interval clear of zero), "unresolved" (the
    interval holds zero), "not counted" (a failed baseline), "–" (not in the paper)."""
    records = list(records)
    chance_frame = chance_normalized(records, chance, metric=metric) if chance is not None else None
    scores = subset_scores(records, metric)
    rows = []
    for e in effects:
        d = paired_differences(records, e.better, e.worse, metric=metric)
        if e.pools is not None:
            d = d[d.pool.isin(e.pools)]
        if e.sizes is not None:
            d = d[d["size"].isin(e.sizes)]
        keys = d[["pool", "seed", "subset"]]
        level_of = {}
        for name, run in (("worse", e.worse), ("base", "base")):
            sel = scores[scores.run == run].merge(keys, on=["pool", "seed", "subset"])
            level_of[name] = float(_seed_means(sel, "normalized").mean()) * 100 if len(sel) else math.nan
        if chance_frame is not None and len(d):
            level_of["chance"] = (
                float(_seed_means(chance_frame.merge(keys, on=["pool", "seed", "subset"]), "chance").mean()) * 100
            )
        else:
            level_of["chance"] = math.nan
        per_seed = _seed_means(d, "difference")
        mean = float(per_seed.mean()) if len(d) else math.nan
        if per_seed.size >= 2:
            (low, high), over = stats.t_interval(per_seed, level), "seeds"
        elif len(d) >= 2:
            (low, high), over = stats.t_interval(d.difference, level), "subsets (one seed)"
        else:
            (low, high), over = (math.nan, math.nan), "too few"
        resolved = bool(low > 0 or high < 0)
        direction = "not measured" if not len(d) else "same" if mean > 0 else "opposite" if mean < 0 else "none"
        baseline = ""
        if level_of["worse"] <= level_of["chance"] + CHANCE_MARGIN:
            baseline = "at chance"  # the base too: a random initialisation, or heads over a body they do not fit
        elif e.worse != "base" and level_of["worse"] < level_of["base"]:
            baseline = "below the base"
        if not e.in_paper or not len(d):
            agrees = "–"
        elif baseline:
            agrees = "not counted"
        elif not resolved:
            agrees = "unresolved"
        else:
            agrees = "yes" if direction == "same" else "no"
        rows.append(
            {
                "claim": e.what,
                "pools": ", ".join(e.pools) if e.pools else "all",
                "source": e.source,
                "paper": e.paper,
                "ours": mean,
                "ours_std": float(per_seed.std(ddof=1)) if per_seed.size >= 2 else math.nan,
                "seeds": int(per_seed.size),
                "subsets": len(d),
                "won": int((d.difference > 0).sum()),
                "wins": float((d.difference > 0).mean()) if len(d) else math.nan,
                "level": level,
                "ci_low": low,
                "ci_high": high,
                "interval_over": over,
                "resolved": resolved,
                "direction": direction,
                "worse_score": level_of["worse"],
                "base_score": level_of["base"],
                "chance_score": level_of["chance"],
                "baseline": baseline,
                "agrees": agrees,
                "better": e.better,
                "worse": e.worse,
                "sizes": list(e.sizes) if e.sizes else None,
                "in_paper": e.in_paper,
                "note": e.note,
            }
        )
    return pd.DataFrame(rows)


def stored_effects(rows: Iterable[Mapping]) -> list[Claim]:
    """The :class:`lib.claims.Claim` definitions behind a results file's ``effects`` table, to measure them
    again on the same records (:func:`refresh_effects`). Rows written before ``sizes`` and
    ``in_paper`` were stored give them in words: a claim ending "(N tasks)" was measured at N
    tasks only, and a source beginning "not" ("not compared in the paper") is ours only."""
    out = []
    for r in rows:
        sizes = r.get("sizes", ...)
        if sizes is ...:
            m = re.search(r"\((\d+) tasks\)$", r["claim"])
            sizes = (int(m.group(1)),) if m else None
        in_paper = r.get("in_paper", not r["source"].lower().startswith("not "))
        pools = None if r["pools"] == "all" else tuple(p.strip() for p in r["pools"].split(","))
        paper = None if r["paper"] is None or (isinstance(r["paper"], float) and math.isnan(r["paper"])) else r["paper"]
        out.append(
            Claim(
                r["claim"],
                paper,
                r["source"],
                r.get("note", ""),
                better=r["better"],
                worse=r["worse"],
                pools=pools,
                sizes=tuple(sizes) if sizes else None,
                in_paper=bool(in_paper),
            )
        )
    return out


def refresh_effects(results: Mapping, *, level: float = EFFECT_LEVEL) -> list[dict]:
    """A notebook's ``effects`` table measured again by :func:`compare_effects` from the records
    and task table in its ``results``: for results written before the table had intervals,
    baselines and chance levels. Nothing is merged or evaluated."""
    metric = results["config"].get("metric", "accuracy")
    table = compare_effects(
        results["records"],
        stored_effects(results["effects"]),
        metric=metric,
        chance=sweep.chance_scores(results["tasks"], metric),
        level=level,
    )
    return table.to_dict("records")


# --- inside the methods -------------------------------------------------------------------------


def _matrix_keys(base: StateDict, include=None, exclude=None) -> dict[str, tuple[int, ...]]:
    return {
        k: tuple(t.shape)
        for k, t in base.items()
        if t.is_floating_point() and t.ndim >= 2 and matches(k, include, exclude)
    }


def numerical_rank(sigma: torch.Tensor, rows: int, cols: int) -> int:
    """How many of ``sigma`` (descending, from a float32 Gram eigensolver) are resolved from zero:
    above ``sigma[0] * sqrt(max(rows, cols) * eps)``. A Gram eigenvalue is exact to about
    ``n * eps * sigma[0]**2``, so a smaller singular value is round-off (a LoRA task vector taken
    from dense float32 weights, ``base + s B A - base``, shows hundreds of such values beside its
    16 real ones); counting every value above 0 called them rank."""
    if not len(sigma) or float(sigma[0]) <= 0:
        return 0
    tol = float(sigma[0]) * math.sqrt(max(rows, cols) * torch.finfo(torch.float32).eps)
    return int((sigma > tol).sum())


def kept_fraction(kept, nonzero):
    """STAR's kept rank as a fraction of the task vector's numerical rank, for ``kept (n, etas)``
    and ``nonzero (n,)`` of :func:`star_ranks`' rows: at eta = 100 STAR keeps every direction,
    the round-off ones too, so the kept rank can exceed the numerical rank; a fraction above 1
    would read as more than all, so it is capped at 1 (a zero task vector counts as 0)."""
    kept = np.asarray(kept, float)
    nonzero = np.asarray(nonzero, float)[:, None]
    return np.where(nonzero > 0, np.minimum(kept, nonzero) / np.maximum(nonzero, 1), 0.0)


def star_ranks(
    base: StateDict, bodies: Mapping[str, StateDict], etas: Sequence[float], *, include=None, exclude=None, device=None
) -> list[dict]:
    """The rank STAR keeps of every weight matrix of every expert's task vector at each ``eta``:
    one row per (expert, matrix) with ``order`` (position in the state dict), ``rows``, ``cols``
    (conv kernels as ``out x in*kh*kw``), ``nonzero`` (the task vector's numerical rank), and
    ``kept``, the kept rank for each of ``etas`` (same order). One Gram eigendecomposition per
    matrix, batched by shape."""
    shapes = _matrix_keys(base, include, exclude)
    order = {k: i for i, k in enumerate(base)}
    device = get_device(device)
    out = []
    for expert, body in bodies.items():
        for keys in shape_batches(shapes, BATCH_ELEMENTS):
            taus = torch.stack([(body[k] - base[k]).flatten(1) for k in keys]).to(device)
            sigma = gram_eigh(taus).singular_values.cpu()
            for key, s in zip(keys, sigma):
                rows, cols = taus.shape[-2:]
                out.append(
                    {
                        "expert": expert,
                        "key": key,
                        "order": order[key],
                        "rows": int(rows),
                        "cols": int(cols),
                        "nonzero": numerical_rank(s, rows, cols),
                        "kept": [int(kept_rank(s, eta)) for eta in etas],
                    }
                )
    return sorted(out, key=lambda r: (list(bodies).index(r["expert"]), r["order"]))


def _deltas(base: StateDict, bodies: Mapping[str, StateDict], key: str, variant: str, device) -> torch.Tensor:
    if variant not in ("h", "v"):
        raise ValueError(f"variant must be 'h' (DRM-H, shared column basis) or 'v' (DRM-V), got {variant!r}")
    d = (stack(list(bodies.values()), key) - base[key]).flatten(2).to(get_device(device))
    return d if variant == "h" else d.mT


def drm_profile(
    base: StateDict,
    bodies: Mapping[str, StateDict],
    key: str,
    *,
    variant: str = "h",
    density: float = 0.2,
    rtol: float = 1e-2,
    device=None,
) -> dict:
    """:func:`lib.merge.drm.row_profile` of one matrix as plain lists (for the results file):
    the joint singular values, each task's row norms ``|v_{t,i}|`` before renormalisation, and the
    fraction of each row that pruning at ``density`` keeps with and without renormalisation."""
    p = drm_method.row_profile(_deltas(base, bodies, key, variant, device), density=density, rtol=rtol)
    return {
        "key": key,
        "variant": variant,
        "density": density,
        "tasks": list(bodies),
        "singular_values": p.singular_values.tolist(),
        "row_norms": p.row_norms.tolist(),
        "kept_renorm": p.kept[True].tolist(),
        "kept_plain": p.kept[False].tolist(),
        "energy_renorm": p.kept_energy[True].tolist(),
        "energy_plain": p.kept_energy[False].tolist(),
    }


def drm_pruning_summary(
    base: StateDict,
    bodies: Mapping[str, StateDict],
    *,
    variant: str = "h",
    density: float = 0.2,
    rtol: float = 1e-2,
    top: int = 10,
    zeroed_below: float = 0.01,
    include=None,
    exclude=None,
    device=None,
) -> list[dict]:
    """For every weight matrix and task: how many of the task's ``top`` largest components (by its
    contribution ``sigma_i |v_{t,i}|``) pruning leaves with less than ``zeroed_below`` of their
    entries -- practically zeroed out -- with and without renormalisation, and the share of the
    task's delta (squared Frobenius norm) the kept entries hold."""
    out = []
    for key in _matrix_keys(base, include, exclude):
        p = drm_method.row_profile(_deltas(base, bodies, key, variant, device), density=density, rtol=rtol)
        contribution = p.singular_values * p.row_norms  # (N, r)
        for t, task in enumerate(bodies):
            mine = torch.argsort(contribution[t], descending=True)[:top]
            row = {"key": key, "task": task, "rank": int(p.singular_values.numel())}
            for renorm, label in ((True, "renorm"), (False, "plain")):
                row[f"zeroed_top_{label}"] = int((p.kept[renorm][t, mine] < zeroed_below).sum())
                row[f"energy_{label}"] = float(p.kept_energy[renorm][t])
            out.append(row)
    return out


def census_summary(census: Iterable[Mapping]) -> pd.DataFrame:
    """Per pool: how many matrices :func:`drm_pruning_summary`'s census (rows with ``pool``)
    followed, and the mean over matrices and tasks of its zeroed top components and kept energy,
    with and without renormalisation."""
    return (
        pd.DataFrame(list(census))
        .groupby("pool")
        .agg(
            matrices=("key", "nunique"),
            zeroed_top_renorm=("zeroed_top_renorm", "mean"),
            zeroed_top_plain=("zeroed_top_plain", "mean"),
            energy_renorm=("energy_renorm", "mean"),
            energy_plain=("energy_plain", "mean"),
        )
        .reset_index()
    )


# --- time ----------------------------------------------------------------------------------------


def models_frame(records: Iterable[Mapping]) -> pd.DataFrame:
    """One row per scored model (records repeat a model once per task and metric), with the
    ``tasks`` it was scored on. Records of a :mod:`lib.sweep` grid (every expert merged, every
    model scored on every task) get their tasks' ``kind`` and ``size``, their seed's experts."""
    df = pd.DataFrame(list(records))
    if "kind" not in df:
        df["kind"] = [data.get_task(t).kind for t in df.task]
        df["size"] = df.seed.map(df[df.method == "expert"].groupby("seed").model.nunique())
    cols = [c for c in MODEL_COLUMNS if c in df]
    keys = df[cols].astype(object).where(df[cols].notna(), "")  # a base has no subset: a key all the same
    tasks = df.task.groupby([keys[c] for c in cols], sort=False).unique()
    first = ~df.duplicated(cols)
    return (
        df[first]
        .assign(tasks=[list(tasks[tuple(k)]) for k in keys[first].itertuples(index=False)])
        .reset_index(drop=True)
    )


def measured_rates(records: Iterable[Mapping], n_eval: Mapping[str, int]) -> dict:
    """From the merged models of ``records`` (:mod:`lib.pool`'s or :mod:`lib.sweep`'s): seconds
    per merged expert for each (kind, method), seconds per evaluated example for each kind (fresh
    evaluations only; ``n_eval``: task -> examples scored in these records), and the SNR prepass
    seconds per seed (a sweep's; 0 for pools)."""
    m = models_frame(records)
    merged = m[~m.method.isin(ALONE)]
    if merged.empty:
        raise ValueError("no merged models in these records to time")
    merge_rate = {
        f"{k}/{meth}": float(g.merge_s.sum() / g["size"].sum())
        for (k, meth), g in merged.groupby(["kind", "method"], sort=False)
    }
    fresh = merged[~merged.reused.astype(bool)]
    eval_rate = {
        kind: float(g.eval_s.sum() / sum(n_eval[t] for ts in g.tasks for t in ts))
        for kind, g in fresh.groupby("kind", sort=False)
    }
    return {
        "merge_s_per_expert": merge_rate,
        "eval_s_per_example": eval_rate,
        "merges": len(merged),
        "fresh_evaluations": len(fresh),
        "reused_evaluations": len(merged) - len(fresh),
        "merge_s": float(merged.merge_s.sum()),
        "eval_s": float(fresh.eval_s.sum()),
        "prepass_s_per_seed": float(merged.prepass_s.sum()) / max(m.seed.nunique(), 1),
    }


def planned(
    pool: str, kind: str, subsets: Sequence[Sequence[str]], runs: Sequence[sweep.Run], *, alone: Sequence[str] = ()
) -> list[dict]:
    """The merges a grid will make, for :func:`estimate_seconds`; ``alone``: the models scored
    as they are on each subset too (a sweep's ``["expert", "expert", "base"]``)."""
    return [
        {"pool": pool, "kind": kind, "tasks": list(s), "method": m}
        for s in subsets
        for m in [r.method for r in runs] + list(alone)
    ]


def plan_grid(
    pools: Mapping[str, Sequence[str]],
    sizes: Mapping[str, Sequence[int]],
    *,
    max_subsets: int,
    seeds: Sequence[int],
    runs: Sequence[sweep.Run],
) -> tuple[list[dict], list[tuple[str, list[str]]]]:
    """Everything a notebook's grid merges and scores, without running it: ``(plan, alone)`` for
    :func:`estimate_seconds`, with the subsets :func:`subset_plan` draws for each seed and pool
    (``pools``: name -> tasks; ``sizes``: kind -> subset sizes)."""
    plan, alone = [], []
    for seed in seeds:
        for name, tasks in pools.items():
            kind = kind_of(tasks)
            plan += planned(name, kind, subset_plan(tasks, sizes[kind], max_subsets=max_subsets, seed=seed), runs)
            alone.append((kind, list(tasks)))
    return plan, alone


def estimate_seconds(
    rates: Mapping,
    plan: Sequence[Mapping],
    n_full: Mapping[str, int],
    alone: Sequence[tuple[str, Sequence[str]]] = (),
    *,
    seeds: int = 1,
) -> dict:
    """The one runtime estimate of notebooks 01-06: seconds a grid ``plan`` (:func:`planned`)
    costs at the measured ``rates`` (:func:`measured_rates`): merge time per merged expert (a
    method not measured gets the mean of the measured ones of its kind; none for a model scored
    alone) plus evaluation time per example of ``n_full`` (task -> examples of the full evaluation
    split), plus ``alone`` (``(kind, tasks)`` of each pool and seed, whose tasks are scored twice:
    by the experts alone and by the base), plus the SNR prepass of each of ``seeds``. Every
    evaluation is counted as fresh."""
    merge_rate, eval_rate = rates["merge_s_per_expert"], rates["eval_s_per_example"]
    merge_s = eval_s = 0.0
    for item in plan:
        kind = item["kind"]
        if kind not in eval_rate:
            raise ValueError(f"no measured evaluation of a {kind} model; the estimate needs one")
        same_kind = [v for k, v in merge_rate.items() if k.startswith(f"{kind}/")]
        rate = merge_rate.get(f"{kind}/{item['method']}", float(np.mean(same_kind)) if same_kind else 0.0)
        merge_s += 0.0 if item["method"] in ALONE else rate * len(item["tasks"])
        eval_s += eval_rate[kind] * sum(n_full[t] for t in item["tasks"])
    alone_s = sum(2 * eval_rate[kind] * n_full[t] for kind, tasks in alone for t in tasks)
    prepass_s = seeds * rates.get("prepass_s_per_seed", 0.0)
    return {
        "merges": sum(i["method"] not in ALONE for i in plan),
        "task_evaluations": int(sum(len(i["tasks"]) for i in plan)),
        "merge_s": merge_s,
        "eval_s": eval_s + alone_s,
        "prepass_s": prepass_s,
        "total_s": merge_s + eval_s + alone_s + prepass_s,
    }
