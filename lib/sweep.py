"""One runner for the merging sweeps of notebooks 01-03 (the Sapienza report's experiments).

A sweep is a list of :class:`Run` objects (a merge method with its hyperparameters) built by
:func:`snr_runs`, :func:`threshold_runs` and :func:`reference_runs`. :func:`run_sweep` merges
each, evaluates the merged model with a callable the notebook supplies, and returns *tidy
records*: one dict per (model, task, metric) with the sweep coordinates, the value and the
measured merge/evaluation times. :func:`summarize` turns the records of several seeds into
mean +- std.

The evaluation is a callable ``evaluate(state_dict) -> {task: {metric: value}}`` so that the
runner knows nothing about models or data (and is tested with a fake one). Identical merged
models (``top=0`` and ``top=1`` make many strategies coincide, and at those two values the SNR
definition does not matter) are recognised by a hash of their tensors and evaluated once.

The SNR strategies rank layers by the experts' per-layer SNRs, which depend on the SNR definition
but not on ``top`` or ``threshold``. :class:`SnrPrepass` computes them once per definition and
hands each run its layer decisions as the merge's ``context`` (:func:`lib.merge.merge`), so a
sweep over eleven ``top`` values computes the spectra once instead of eleven times.

:func:`evaluate_tasks` and :func:`evaluate_report_head` build the evaluation callables of the
notebooks from :mod:`lib.evaluate`; :func:`snr_and_spectra` reads the experts' spectra for the figures
(:func:`layer_snr_records`, :func:`telling_layers`, :func:`esd_records`);
:func:`compare_with_report` puts the report's numbers beside ours.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import data, stats, train
from . import evaluate as scoring
from .claims import Claim
from .merge import get_method, merge, resolve_hparams, select_keys, to_compute
from .merge.snr import decide_layers, expert_snrs
from .spectral import SNR_ALIASES, canonical_snr_method, scan, spectrum
from .statedict import StateDict

#: the six strategies of the report's Table 1 besides the Standard merge
SNR_STRATEGIES = ("snr_base_reset", "snr_winner", "snr_low_a", "snr_low_b", "snr_max", "snr_weighted")
#: the merges drawn as horizontal reference lines, each at its default hyperparameters
REFERENCES = ("average", "task_arithmetic", "ties", "dare", "star", "drm_h")
#: the report's grid: the fraction of layers (ranked by SNR) counted as "high SNR"
TOPS = tuple(np.round(np.linspace(0.0, 1.0, 11), 6).tolist())

Evaluate = Callable[[StateDict], Mapping[str, Mapping[str, float]]]


@dataclass(frozen=True)
class Run:
    """One merged model of a sweep: ``method`` with the sweep coordinates that are set
    (``snr_method``, ``top``, ``threshold``) plus any other hyperparameters in ``extra``."""

    method: str
    snr_method: str | None = None
    top: float | None = None
    threshold: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # one name per SNR variant in labels, records and hashes: an old name (``"seed"``) becomes
        # the one in use (``"report_text"``, lib.spectral.SNR_ALIASES); an unknown one is an error
        if self.snr_method is not None:
            object.__setattr__(self, "snr_method", canonical_snr_method(self.snr_method))
        if self.extra.get("snr_method") is not None:
            extra = {**self.extra, "snr_method": canonical_snr_method(self.extra["snr_method"])}
            object.__setattr__(self, "extra", extra)

    def hparams(self) -> dict[str, Any]:
        """The keyword arguments for :func:`lib.merge.merge` (unset coordinates are left to the
        method's defaults)."""
        coords = {"snr_method": self.snr_method, "top": self.top, "threshold": self.threshold}
        return {**{k: v for k, v in coords.items() if v is not None}, **self.extra}

    def label(self) -> str:
        coords = [f"{k}={v}" for k, v in self.hparams().items()]
        return f"{self.method}({', '.join(coords)})"


_SNR_METHOD_IN_LABEL = re.compile(r"(?<=\bsnr_method=)\w+")


def canonical_label(label: str) -> str:
    """A run label with an old SNR variant name replaced by the one in use
    (``snr_winner(snr_method=seed, top=0.25)`` -> ``snr_winner(snr_method=report_text, top=0.25)``,
    :data:`lib.spectral.SNR_ALIASES`): the label :meth:`Run.label` gives that run now. Other
    labels are returned unchanged."""
    return _SNR_METHOD_IN_LABEL.sub(lambda m: SNR_ALIASES.get(m.group(0), m.group(0)), label)


def snr_runs(
    strategies: Iterable[str] = SNR_STRATEGIES, snr_methods: Iterable[str] = ("mp",), tops: Iterable[float] = TOPS
) -> list[Run]:
    """Every strategy x SNR definition x ``top`` fraction, grouped by (SNR definition, strategy)
    so that runs sharing an SNR prepass are consecutive."""
    tops = [_check_fraction(t) for t in tops]
    return [Run(s, snr_method=m, top=t) for m in snr_methods for s in strategies for t in tops]


def threshold_runs(strategies: Iterable[str], snr_method: str, thresholds: Iterable[float]) -> list[Run]:
    """Every strategy at absolute SNR thresholds (the report's ResNet sweep: 3, 5, 15, 25 with
    ``max_median``)."""
    return [Run(s, snr_method=snr_method, threshold=float(th)) for s in strategies for th in thresholds]


def reference_runs(references: Iterable[str] = REFERENCES) -> list[Run]:
    """The reference merges, each at its registered default hyperparameters."""
    return [Run(r) for r in references]


def _check_fraction(top: float) -> float:
    top = round(float(top), 6)
    if not 0.0 <= top <= 1.0:
        raise ValueError(f"top is the fraction of layers counted as high-SNR and must lie in [0, 1], got {top}")
    return top


def fingerprint(sd: Mapping[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and bytes: equal fingerprints mean identical models (about
    0.05 s for MiniLM's 23M parameters, far less than one evaluation)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CachedEvaluate:
    """Wrap ``evaluate`` so that a model identical to one already evaluated is not evaluated
    again. ``reused`` tells whether the last call was answered from the cache."""

    def __init__(self, evaluate: Evaluate):
        self.evaluate = evaluate
        self.seen: dict[str, dict[str, dict[str, float]]] = {}
        self.reused = False

    def __call__(self, sd: StateDict) -> dict[str, dict[str, float]]:
        key = fingerprint(sd)
        self.reused = key in self.seen
        if not self.reused:
            self.seen[key] = _check_scores(self.evaluate(sd))
        return self.seen[key]


def _check_scores(scores) -> dict[str, dict[str, float]]:
    if not isinstance(scores, Mapping) or not all(isinstance(m, Mapping) for m in scores.values()):
        raise TypeError(
            f"evaluate must return {{task: {{metric: value}}}}, e.g. {{'sst2': {{'accuracy': 0.9}}}}; got {scores!r}"
        )
    return {task: {metric: float(v) for metric, v in metrics.items()} for task, metrics in scores.items()}


def _records(scores, *, seed, method, model, run: Run | None, prepass_s=0.0, merge_s=0.0, eval_s, reused) -> list[dict]:
    coords = {"run": f"{method}:{model}", "snr_method": None, "top": None, "threshold": None}
    if run is not None:
        coords = {"run": run.label(), "snr_method": run.snr_method, "top": run.top, "threshold": run.threshold}
    return [
        {
            "seed": seed,
            "method": method,
            "model": model,
            **coords,
            "task": task,
            "metric": metric,
            "value": value,
            "prepass_s": prepass_s,
            "merge_s": merge_s,
            "eval_s": eval_s,
            "reused": reused,
        }
        for task, metrics in scores.items()
        for metric, value in metrics.items()
    ]


def evaluate_models(
    models: Mapping[str, StateDict],
    evaluate: Evaluate,
    *,
    seed: int,
    method: str = "expert",
    cache: CachedEvaluate | None = None,
) -> list[dict]:
    """Records for models evaluated as they are (each expert alone, the base), tagged with
    ``method`` and the model's name in ``model``."""
    cache = cache if cache is not None else CachedEvaluate(evaluate)
    out = []
    for name, sd in models.items():
        t0 = time.perf_counter()
        scores = cache(sd)
        out += _records(
            scores, seed=seed, method=method, model=name, run=None, eval_s=time.perf_counter() - t0, reused=cache.reused
        )
    return out


def is_snr_strategy(method: str) -> bool:
    """Whether ``method`` is one of the SNR-routed strategies, whose context is the layer
    decisions of :mod:`lib.merge.snr`."""
    return get_method(method).family == "snr"


class SnrPrepass:
    """The experts' per-layer SNRs, computed once per SNR definition, and the layer decisions
    of each SNR run derived from them: the same ``context`` the merge's own prepass would build
    (tested equal), without recomputing every spectrum for every ``top``."""

    def __init__(
        self, base: StateDict | None, experts: Sequence[StateDict], *, include=None, exclude=None, device=None
    ):
        self.experts, self.device = list(experts), device
        ref = base if base is not None else self.experts[0]
        self.keys = select_keys(ref, include, exclude)
        self.scores: dict[str, tuple[list[str], dict]] = {}

    def snrs(self, snr_method: str) -> tuple[list[str], dict]:
        """``(keys, {layer: per-expert SNRs})`` for ``snr_method``, computed on first use."""
        if snr_method not in self.scores:
            items = ((k, None, [to_compute(e[k], self.device) for e in self.experts]) for k in self.keys)
            self.scores[snr_method] = expert_snrs(items, snr_method=snr_method)
        return self.scores[snr_method]

    def context(self, run: Run):
        """The layer decisions for ``run``, or None when ``run`` is not an SNR strategy."""
        if not is_snr_strategy(run.method):
            return None
        hp = resolve_hparams(get_method(run.method), run.hparams())
        keys, scores = self.snrs(hp["snr_method"])
        return decide_layers(scores, keys, top=hp["top"], threshold=hp["threshold"], score=hp["score"])


def run_sweep(
    base: StateDict | None,
    experts: Sequence[StateDict],
    evaluate: Evaluate,
    runs: Sequence[Run],
    *,
    seed: int,
    merge_fn: Callable[..., StateDict] | None = None,
    cache: CachedEvaluate | None = None,
    share_prepass: bool = True,
    prepass: SnrPrepass | None = None,
    progress: bool = True,
    **merge_kwargs,
) -> list[dict]:
    """Merge ``experts`` once per run and evaluate each merged model.

    ``merge_kwargs`` (``include``, ``exclude``, ``excluded_from``, ``device``) go to every merge
    unchanged: they say which tensors are merged (for example ``exclude="classifier"`` keeps each
    task's own head out of the merge). ``merge_fn`` defaults to :func:`lib.merge.merge`; with
    ``share_prepass`` the SNR runs get their layer decisions from one :class:`SnrPrepass` as
    ``context=``. Pass one ``cache`` to several calls of the same seed so that identical models
    are evaluated once across them; pass one ``prepass`` (built with the same ``include`` and
    ``exclude``) to share the SNRs too. Returns tidy records (see :func:`records_frame`).
    """
    merge_fn = merge if merge_fn is None else merge_fn
    cache = cache if cache is not None else CachedEvaluate(evaluate)
    if prepass is None and share_prepass:
        prepass = SnrPrepass(
            base,
            experts,
            include=merge_kwargs.get("include"),
            exclude=merge_kwargs.get("exclude"),
            device=merge_kwargs.get("device"),
        )
    out = []
    bar = tqdm(runs, desc=f"seed {seed}: merge + evaluate", disable=not progress, leave=False)
    for run in bar:
        bar.set_postfix_str(run.label(), refresh=False)
        t0 = time.perf_counter()
        try:
            context = None if prepass is None else prepass.context(run)
            t1 = time.perf_counter()
            shared = {} if context is None else {"context": context}
            merged = merge_fn(run.method, base, list(experts), **merge_kwargs, **shared, **run.hparams())
        except Exception as err:
            raise RuntimeError(f"merging with {run.label()} failed (seed {seed}): {err}") from err
        t2 = time.perf_counter()
        scores = cache(merged)
        t3 = time.perf_counter()
        out += _records(
            scores,
            seed=seed,
            method=run.method,
            model="merged",
            run=run,
            prepass_s=t1 - t0,
            merge_s=t2 - t1,
            eval_s=t3 - t2,
            reused=cache.reused,
        )
    return out


def sweep_seed(
    base: StateDict | None,
    experts: Mapping[str, StateDict],
    evaluate: Evaluate,
    runs: Sequence[Run],
    *,
    seed: int,
    progress: bool = True,
    **merge_kwargs,
) -> list[dict]:
    """Everything one seed contributes: the base alone (``method="base"``) when there is one, each
    expert alone (``method="expert"``, ``model`` = its name), then every run, all sharing one
    evaluation cache (a merge that reproduces an expert or the base is not evaluated again)."""
    cache = CachedEvaluate(evaluate)
    out = [] if base is None else evaluate_models({"base": base}, evaluate, seed=seed, method="base", cache=cache)
    out += evaluate_models(experts, evaluate, seed=seed, cache=cache)
    out += run_sweep(
        base, list(experts.values()), evaluate, runs, seed=seed, cache=cache, progress=progress, **merge_kwargs
    )
    return out


@dataclass
class SweepSetup:
    """One seed of a sweep: the ``base`` and the named ``models`` merged in every run, how a
    merged model is scored (``evaluate``), and ``experts``: each expert's key, cache status,
    metrics and runtime (the table a notebook shows). Built by a source of :mod:`lib.runner`."""

    name: str
    seed: int
    base: StateDict | None
    models: dict[str, StateDict]
    evaluate: Evaluate
    expert_info: list[dict] = field(default_factory=list)


class SweepRunner:
    """The records of one :class:`SweepSetup`, one run at a time, as :func:`sweep_seed` makes
    them all at once: one evaluation cache and one SNR prepass (per ``include``/``exclude``)
    shared by every run of the setup."""

    def __init__(self, setup: SweepSetup):
        self.pool = setup
        self.cache = CachedEvaluate(setup.evaluate)
        self.prepasses: dict[str, SnrPrepass] = {}

    def alone(self) -> list[dict]:
        """The base (``method="base"``, when there is one) and each expert on its own."""
        s = self.pool
        out = (
            []
            if s.base is None
            else evaluate_models({"base": s.base}, s.evaluate, seed=s.seed, method="base", cache=self.cache)
        )
        return out + evaluate_models(s.models, s.evaluate, seed=s.seed, cache=self.cache)

    def run(self, run: Run, **merge_kwargs) -> list[dict]:
        """The records of one merge of every model of the setup by ``run``."""
        s = self.pool
        key = repr(sorted((k, merge_kwargs.get(k)) for k in ("include", "exclude", "device")))
        if key not in self.prepasses:
            self.prepasses[key] = SnrPrepass(
                s.base,
                list(s.models.values()),
                include=merge_kwargs.get("include"),
                exclude=merge_kwargs.get("exclude"),
                device=merge_kwargs.get("device"),
            )
        return run_sweep(
            s.base,
            list(s.models.values()),
            s.evaluate,
            [run],
            seed=s.seed,
            cache=self.cache,
            prepass=self.prepasses[key],
            progress=False,
            **merge_kwargs,
        )


RECORD_COLUMNS = [
    "seed",
    "method",
    "model",
    "run",
    "snr_method",
    "top",
    "threshold",
    "task",
    "metric",
    "value",
    "prepass_s",
    "merge_s",
    "eval_s",
    "reused",
]
#: ``run`` (the merge with all its hyperparameters, or the name of a model evaluated alone)
#: identifies a model; the other columns are kept so that the summary can be plotted directly
GROUP_COLUMNS = ["run", "method", "model", "snr_method", "top", "threshold", "task", "metric"]


def records_frame(records: Iterable[Mapping]) -> pd.DataFrame:
    """The records as a DataFrame with the columns in :data:`RECORD_COLUMNS`."""
    df = pd.DataFrame(list(records), columns=RECORD_COLUMNS)
    missing = df[["method", "task", "metric", "value"]].isna().any()
    if missing.any():
        raise ValueError(
            f"records without {list(missing[missing].index)}: every record needs method, task, metric and value"
        )
    return df


def summarize(records: Iterable[Mapping]) -> pd.DataFrame:
    """:func:`lib.stats.over_seeds` of every value (mean, sample std, seeds), per sweep
    coordinate, task and metric."""
    return stats.over_seeds(records_frame(records), GROUP_COLUMNS, "value")


def timing(records: Iterable[Mapping]) -> dict[str, float]:
    """Measured seconds, per seed on average: SNR prepasses (once per SNR definition), merges,
    fresh evaluations, and how many evaluations the cache saved. Each model appears once per
    (task, metric) in the records, so models are counted once."""
    df = records_frame(records)
    seeds = max(df.seed.nunique(), 1)
    models = df.drop_duplicates(["seed", "run"])
    merged = models[models["model"] == "merged"]
    fresh = models[~models["reused"].astype(bool)]
    return {
        "seeds": int(seeds),
        "models": len(models) / seeds,
        "merges": len(merged) / seeds,
        "prepass_s": float(merged["prepass_s"].sum()) / seeds,
        "merge_s": float(merged["merge_s"].sum()) / seeds,
        "merge_s_mean": float(merged["merge_s"].mean()) if len(merged) else float("nan"),
        "evaluations": len(fresh) / seeds,
        "evaluations_reused": (len(models) - len(fresh)) / seeds,
        "eval_s": float(fresh["eval_s"].sum()) / seeds,
        "eval_s_mean": float(fresh["eval_s"].mean()) if len(fresh) else float("nan"),
    }


def versions(packages: Iterable[str] = ("numpy", "scipy", "pandas", "scikit-learn", "matplotlib")) -> dict[str, str]:
    """:func:`lib.train.versions` (Python, torch, transformers, device, threads) and the versions
    of the other libraries a results file depends on."""
    out = dict(train.versions())
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


# --- the experts' spectra, for the per-layer SNR and ESD figures ------------------------------


def layer_snr_records(
    experts: Mapping[str, StateDict], snr_methods: Sequence[str], *, seed: int, include=None, exclude=None
) -> list[dict]:
    """One row per (expert, weight matrix, SNR definition): ``seed``, ``expert``, ``key``,
    ``rows``, ``cols``, ``q``, ``snr_method``, ``snr`` and our fit's ``n_signal``."""
    snr_methods = [canonical_snr_method(m) for m in snr_methods]  # records carry the names in use
    # scan() reports our MP fit ("snr_mp") beside the definition it is asked for, so the
    # eigenvalues are computed once per expert for "mp" and one other definition
    others = [m for m in snr_methods if m != "mp"] or ["mp"]
    out = []
    for name, sd in experts.items():
        for i, method in enumerate(others):
            df = scan(sd, include=include, exclude=exclude, method=method)
            columns = {"mp": "snr_mp"} if i == 0 and "mp" in snr_methods else {}
            columns[method] = "snr"
            out += [
                {
                    "seed": seed,
                    "expert": name,
                    "key": r["name"],
                    "rows": int(r["rows"]),
                    "cols": int(r["cols"]),
                    "q": float(r["q"]),
                    "snr_method": snr_method,
                    "snr": float(r[column]),
                    "n_signal": int(r["n_signal"]),
                }
                for snr_method, column in columns.items()
                for r in df.to_dict("records")
            ]
    return out


#: a spectrum with fewer eigenvalues than this shows no bulk worth drawing (a 2-class head has 2)
MIN_EIGENVALUES = 32


def telling_layers(layers: Iterable[Mapping], expert: str, *, ours: str = "mp", theirs: str) -> list[tuple[str, str]]:
    """Three layers of ``expert`` worth looking at, as ``(key, why)``: the one with the most signal
    by our SNR, the one with the least, and the one whose rank the two definitions disagree on
    most (the shape bias at work), among matrices with at least :data:`MIN_EIGENVALUES`
    eigenvalues. Fewer when they coincide."""
    ours, theirs = canonical_snr_method(ours), canonical_snr_method(theirs)
    df = pd.DataFrame(list(layers))
    df = df[(df.expert == expert) & (df[["rows", "cols"]].min(axis=1) >= MIN_EIGENVALUES)]
    wide = df.pivot_table(index="key", columns="snr_method", values="snr", sort=False)
    missing = {ours, theirs} - set(wide.columns)
    if missing or wide.empty:
        raise ValueError(
            f"no per-layer SNR of {expert!r} under {sorted(missing) or [ours, theirs]}; "
            "compute them with layer_snr_records first"
        )
    rank_gap = (wide[ours].rank(ascending=False) - wide[theirs].rank(ascending=False)).abs()
    picks = [
        (wide[ours].idxmax(), f"highest SNR ({ours})"),
        (wide[ours].idxmin(), f"lowest SNR ({ours})"),
        (rank_gap.idxmax(), f"ranked {int(rank_gap.max())} places apart by {ours} and {theirs}"),
    ]
    out, seen = [], set()
    for key, why in picks:
        if key not in seen:
            seen.add(key)
            out.append((key, why))
    return out


def esd_records(sd: StateDict, picks: Iterable[tuple[str, str]], *, expert: str) -> list[dict]:
    """The eigenvalues of the chosen layers with our Marchenko-Pastur fit (``q``, ``sigma2``,
    ``lambda_plus``, the detection ``threshold``, ``n_signal``, ``snr``) for :func:`draw_esd`."""
    out = []
    for key, why in picks:
        sp = spectrum(sd[key])
        out.append(
            {
                "expert": expert,
                "key": key,
                "why": why,
                "shape": list(sp.shape),
                "eigenvalues": sp.eigenvalues.tolist(),
                "q": sp.q,
                "sigma2": sp.sigma2,
                "lambda_plus": sp.lambda_plus,
                "threshold": sp.threshold,
                "n_signal": sp.n_signal,
                "snr": sp.snr,
            }
        )
    return out


# --- the report's numbers beside ours ----------------------------------------------------------


def compare_with_report(records: Iterable[Mapping], claims: Iterable[Claim]) -> pd.DataFrame:
    """One row per value claim (:class:`lib.claims.Claim`): the report's value, ours (mean, std and
    seeds of the best listed run) and the difference. A claim none of whose runs was measured (a SMOKE grid) gets NaN and says
    so in ``run``."""
    summary = summarize(records)
    # a claim or a record written with an old SNR variant name finds the run under its name now
    summary["run"] = summary["run"].map(canonical_label)
    rows = []
    for c in claims:
        runs = [canonical_label(r) for r in c.runs]
        sel = summary[summary.run.isin(runs) & (summary.task == c.task) & (summary.metric == c.metric)]
        if sel.empty:
            rows.append(
                {
                    "what": c.what,
                    "report": c.paper,
                    "ours_mean": np.nan,
                    "ours_std": np.nan,
                    "seeds": 0,
                    "difference": np.nan,
                    "run": "not measured in this run",
                    "metric": c.metric,
                    "note": c.note,
                }
            )
            continue
        best = sel.loc[sel["mean"].idxmax()]
        rows.append(
            {
                "what": c.what,
                "report": c.paper,
                "ours_mean": float(best["mean"]),
                "ours_std": float(best["std"]),
                "seeds": int(best["n"]),
                "difference": float(best["mean"]) - c.paper,
                "run": best["run"],
                "metric": c.metric,
                "note": c.note,
            }
        )
    return pd.DataFrame(rows)


# --- evaluation on the tasks' data ---------------------------------------------------------------


def task_table(tasks: Iterable[str], *, smoke: bool) -> dict[str, dict]:
    """task -> the split scored, its size (the whole split; SMOKE: lib.train's fixed slice), the
    metrics recorded (accuracy, then the task's own metric) and the accuracy of always answering
    the most common label (``majority``), the floor an accuracy should be read against."""
    out = {}
    for task in tasks:
        spec = data.get_task(task)
        idx = scoring.eval_indices(task, spec.eval_split, smoke=smoke)
        labels = data.labels_of(task, spec.eval_split)[idx]
        metrics = ["accuracy"] + ([spec.metric] if spec.metric != "accuracy" else [])
        out[task] = {
            "title": spec.title,
            "split": spec.eval_split,
            "n_eval": len(idx),
            "metrics": metrics,
            "majority": float(np.bincount(labels).max() / len(labels)),
        }
    return out


def chance_score(metric: str, majority: float, num_labels: int) -> float:
    """What a classifier that ignores its input scores: always answering the most common label
    (``majority``: that label's share of the evaluation split). Accuracy: ``majority``;
    Matthews correlation: 0; macro-F1: the majority label's F1, ``2m / (1 + m)``, over
    ``num_labels`` labels (every other label scores 0). The floor that chance-corrected scores
    (:func:`chance_corrected`) are measured from."""
    if not 0.0 < majority <= 1.0 or num_labels < 2:
        raise ValueError(f"majority must be in (0, 1] and num_labels at least 2, got {majority} and {num_labels}")
    if metric == "accuracy":
        return float(majority)
    if metric == "mcc":
        return 0.0
    if metric == "macro_f1":
        return float(2 * majority / (1 + majority) / num_labels)
    raise ValueError(
        f"no chance level for {metric!r}: it depends on which label is positive; use accuracy, mcc or macro_f1"
    )


def chance_scores(tasks: Mapping[str, Mapping], metric: str | Mapping[str, str] = "accuracy") -> dict[str, float]:
    """task -> :func:`chance_score` of ``metric`` (one for all tasks, or task -> metric), from a
    :func:`task_table` (its ``majority``) and each task's labels."""
    metrics = metric if isinstance(metric, Mapping) else {t: metric for t in tasks}
    return {t: chance_score(metrics[t], info["majority"], data.get_task(t).num_labels) for t, info in tasks.items()}


def chance_corrected(score, expert, chance):
    """``(score - chance) / (expert - chance)``: 0 at chance, 1 at the expert, negative below
    chance. Unlike ``score / expert`` it does not credit a merge with the share of the score that
    guessing gets (SST-2's 0.51, CoLA's accuracy 0.69); NaN where the expert is at chance."""
    score, expert, chance = (np.asarray(v, dtype=np.float64) for v in (score, expert, chance))
    spread = expert - chance
    return np.where(spread > 0, (score - chance) / np.where(spread > 0, spread, 1.0), np.nan)


def evaluate_tasks(tasks: Sequence[str], *, smoke: bool, heads: Mapping[str, StateDict] | None = None) -> Evaluate:
    """The evaluation a sweep calls: ``state_dict -> {task: {metric: value}}`` on each task's
    evaluation split. With ``heads`` (task -> a state dict holding that task's head, e.g. its
    expert) the state dict is a merged *body*, scored on each task under the task's own head."""

    def evaluate(sd: StateDict) -> dict[str, dict[str, float]]:
        out = {}
        for task in tasks:
            model = sd if heads is None else train.with_head(sd, heads[task], data.get_task(task).kind)
            scores = scoring.evaluate(model, task, smoke=smoke)
            out[task] = {k: v for k, v in scores.items() if k != "n"}
        return out

    return evaluate


#: what the report's SST-2 + Emotion notebook scores: Emotion's labels mapped by ``y > 1 -> 1``,
#: i.e. sadness (0) against everything else, under one shared two-class head
COLLAPSED_EMOTION = "emotion_sadness_vs_rest"
REPORT_SST2 = "sst2_shared_head"


def collapsed_emotion_labels(*, smoke: bool) -> np.ndarray:
    """Emotion's evaluation labels collapsed as the report's code does (0 stays 0, every other
    class becomes 1), in the order :func:`lib.evaluate.predict` returns examples."""
    spec = data.get_task("emotion")
    idx = scoring.eval_indices("emotion", spec.eval_split, smoke=smoke)
    return (data.labels_of("emotion", spec.eval_split)[idx] != 0).astype(np.int64)


def evaluate_report_head(*, smoke: bool) -> Evaluate:
    """The report's evaluation of SST-2 + Emotion: one model with a single two-class head, scored
    on SST-2 and on Emotion's collapsed labels (:func:`collapsed_emotion_labels`)."""
    collapsed = collapsed_emotion_labels(smoke=smoke)

    def evaluate(sd: StateDict) -> dict[str, dict[str, float]]:
        model = scoring.as_model(sd, "sst2")  # a two-class MiniLM holding ``sd``
        sst2 = scoring.evaluate(model, "sst2", smoke=smoke)
        logits, _ = scoring.predict(model, "emotion", smoke=smoke)
        return {
            REPORT_SST2: {"accuracy": sst2["accuracy"]},
            COLLAPSED_EMOTION: {"accuracy": float((logits.argmax(1) == collapsed).mean())},
        }

    return evaluate


def snr_and_spectra(
    experts: Mapping[str, StateDict], snr_methods: Sequence[str], *, seed: int, include=None, exclude=None
) -> tuple[list[dict], list[dict]]:
    """``(layers, esd)`` for the figures: every matrix's SNR under each definition, and the
    spectra of each expert's :func:`telling_layers` (ours = ``snr_methods[0]`` against the
    report's = ``snr_methods[1]``)."""
    ours, theirs = canonical_snr_method(snr_methods[0]), canonical_snr_method(snr_methods[1])
    layers = layer_snr_records(experts, snr_methods, seed=seed, include=include, exclude=exclude)
    esd = []
    for name, sd in experts.items():
        esd += esd_records(sd, telling_layers(layers, name, ours=ours, theirs=theirs), expert=name)
    return layers, esd


# --- reading the results -----------------------------------------------------------------------


def leaderboard(records: Iterable[Mapping], task: str, metric: str) -> pd.DataFrame:
    """Each SNR strategy and definition at its best ``top`` (or threshold), each reference merge,
    each expert and the base, ranked by the mean over seeds of ``metric`` on ``task``."""
    s = summarize(records)
    s = s[(s.task == task) & (s.metric == metric)].copy()
    if s.empty:
        raise ValueError(f"no records for task {task!r} and metric {metric!r}")
    s["family"] = s.method + " " + s.snr_method.fillna("") + " " + s.model.where(s.model != "merged", "")
    best = s.loc[s.groupby("family", sort=False)["mean"].idxmax()]
    cols = ["run", "method", "snr_method", "top", "threshold", "model", "mean", "std", "n"]
    return best.sort_values("mean", ascending=False)[cols].reset_index(drop=True)


def verdict(records: Iterable[Mapping], task: str, metric: str, *, reference: str = "average()") -> str:
    """One sentence comparing the best SNR merge on the grid with ``reference`` (the Standard
    merge) and with the task's own expert, with the seeds' spread: what a notebook may conclude
    from its own numbers. The best of a grid is an optimistic pick, and the sentence says so."""
    board = leaderboard(records, task, metric).set_index("run")
    snr_rows = board[board.snr_method.notna()]
    if snr_rows.empty or reference not in board.index:
        return f"{task} {metric}: no SNR merge or no {reference} in these records."
    best, ref = snr_rows.iloc[0], board.loc[reference]
    diff = best["mean"] - ref["mean"]
    df = records_frame(records)
    df = df[(df.task == task) & (df.metric == metric)]
    # paired over seeds: both merges are of the same seed's experts
    paired = (
        df[df.run == snr_rows.index[0]].groupby("seed").value.mean()
        - df[df.run == reference].groupby("seed").value.mean()
    ).dropna()
    if paired.size < 2:
        spread = "one seed, so no interval: read it as anecdotal"
    else:
        low, high = stats.t_interval(paired)
        clear = low > 0 or high < 0
        spread = f"paired {stats.LEVEL:.0%} t-interval over {paired.size} seeds [{low:+.3f}, {high:+.3f}]" + (
            "" if clear else f": it holds 0, not distinguishable with {paired.size} seeds"
        )
    text = (
        f"{task} {metric}: the best SNR merge on the grid (an optimistic pick), {snr_rows.index[0]}, scores "
        f"{best['mean']:.3f} ± {_std(best)}; {reference} scores {ref['mean']:.3f} ± {_std(ref)}; "
        f"difference {diff:+.3f}, {spread}."
    )
    own = f"expert:{task}"
    if own in board.index:
        text += f" The {task} expert alone scores {board.loc[own, 'mean']:.3f} ± {_std(board.loc[own])}."
    return text


def _std(row) -> str:
    return "n/a" if pd.isna(row["std"]) else f"{row['std']:.3f}"


def shape_bias(layers: Iterable[Mapping]) -> pd.DataFrame:
    """Per expert, Spearman rank correlations across its weight matrices: of each SNR definition
    with the aspect ratio min(rows, cols) / max(rows, cols) (a definition free of shape bias
    should not track it), and between the definitions."""
    from scipy.stats import spearmanr

    df = pd.DataFrame(list(layers))
    df["aspect"] = df[["rows", "cols"]].min(axis=1) / df[["rows", "cols"]].max(axis=1)
    out = []
    for (seed, expert), g in df.groupby(["seed", "expert"], sort=False):
        wide = g.pivot_table(index="key", columns="snr_method", values="snr", sort=False)
        aspect = g.drop_duplicates("key").set_index("key")["aspect"].reindex(wide.index)
        row = {"seed": seed, "expert": expert, "layers": len(wide)}
        for m in wide.columns:
            row[f"rho({m}, aspect)"] = float(spearmanr(wide[m], aspect).statistic)
        for i, a in enumerate(wide.columns):
            for b in wide.columns[i + 1 :]:
                row[f"rho({a}, {b})"] = float(spearmanr(wide[a], wide[b]).statistic)
        out.append(row)
    return pd.DataFrame(out)
