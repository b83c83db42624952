"""The plan of every expert the notebooks merge, and ``python -m lib experts`` (``make experts``).

Notebooks 01-06 share these experts through the cache (:mod:`lib.cache`): whichever runs first
trains an expert, the others load it. ``make experts`` trains them all up front, seed by seed:

* text, fine-tuned from the pre-trained MiniLM body (variant ``pretrained``), for every text
  task of :data:`lib.data.TASKS`;
* vision ``mnist_base``: a ResNet-18 trained here on MNIST (the base), then the Fashion-MNIST and
  KMNIST experts fine-tuned from it, each with a fresh head;
* vision ``shared_init``: the Fashion-MNIST and KMNIST experts trained from the seed's random
  initialisation -- the same one the MNIST base started from, so the MNIST expert of this
  variant *is* the base above and is trained once.

``--lora`` (``make experts LORA=1``) plans, instead, the LoRA experts of the seven text tasks,
seeds 0-2 (:func:`lib.train.fit_expert` with ``lora=True``: rank 16, alpha 32, query and value,
:data:`lib.cache.LORA`), in the same cache, with the same listing, estimate and SMOKE mode; their
metrics go to ``results/experts_lora.json``. The default plan does not include them.

The cache may not survive a change of machine, so a full run must fit in one working session:
the plan prints an estimate from throughputs measured on two CPU cores (:data:`RATES`) before
it starts, and a run is resumable -- every finished expert is stored at once, so an interrupted
run loses at most the expert in progress. ``--dry-run`` prints the plan only. ``--seeds`` and
``--tasks`` cut the plan (a session that has time for part of it); a cut LoRA plan merges its
rows into ``results/experts_lora.json`` (rows of experts outside the cut are kept, each with its
cache key), while a cut full plan leaves ``results/experts.json`` alone, since that file's
mergeability measurements need the whole plan.

After training, the command measures how *mergeable* the vision experts of each variant are:
it averages the Fashion-MNIST and KMNIST experts' bodies and scores the average on each task with
that task's own head, with and without re-estimating BatchNorm statistics. It writes every
expert's metrics and these measurements to ``results/experts.json``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import cache, data, paths, train
from . import evaluate as evaluation
from .models import HEAD_PATTERNS

SEEDS = (0, 1, 2)

#: quality every expert must reach in full mode (mean over seeds): task -> (metric, minimum)
TARGETS = {
    "mnist": ("accuracy", 0.98),
    "fashion_mnist": ("accuracy", 0.90),
    "kmnist": ("accuracy", 0.85),
    "sst2": ("accuracy", 0.86),
    "emotion": ("accuracy", 0.88),
    "cola": ("mcc", 0.25),
}

#: training and evaluation throughput (examples/s) on the project's two-core CPU when nothing else
#: runs, used only for time estimates. Vision: 210 training images/s measured for resnet18_28 at
#: batch 128 (the lead measured 230), evaluation ~1,300 images/s. Text: a MiniLM step of 32
#: examples costs ~0.3 s plus ~0.015 s per token of the padded width (fitted to the lead's
#: 30-35 examples/s at 32-64 tokens), so each task's rate follows from its mean length with
#: length-bucketed batches (SST-2 ~14 tokens, MRPC ~54, RTE ~72); evaluation is ~4x faster.
#: Wall times measured while other work shared the CPU were 2-5x longer (see results/experts.json).
RATES = {
    "sst2": (64.0, 250.0),
    "cola": (67.0, 270.0),
    "emotion": (50.0, 200.0),
    "trec": (64.0, 250.0),
    "mrpc": (29.0, 110.0),
    "rte": (24.0, 90.0),
    "rotten_tomatoes": (45.0, 180.0),
    "mnist": (210.0, 1300.0),
    "fashion_mnist": (210.0, 1300.0),
    "kmnist": (210.0, 1300.0),
}
#: seconds to build a model and load its data, per expert
OVERHEAD_S = 10.0


@dataclass(frozen=True)
class Planned:
    task: str
    variant: str
    seed: int
    lora: bool = False  # a LoRA adapter of the body (lib.cache.LORA) instead of a full fine-tune

    def config(self, smoke: bool) -> dict:
        return cache.expert_config(
            self.task, seed=self.seed, variant=self.variant, smoke=smoke, lora=True if self.lora else None
        )

    def fit(self, smoke: bool):
        return train.fit_expert(
            self.task, seed=self.seed, variant=self.variant, smoke=smoke, lora=True if self.lora else None
        )

    def __str__(self) -> str:
        kind = f"LoRA r{cache.LORA['r']}" if self.lora else self.variant
        return f"{self.task:<16} {kind:<12} seed {self.seed}"


def plan(seeds=SEEDS, *, lora: bool = False) -> list[Planned]:
    """Every expert the notebooks use, seed by seed (a partial run leaves whole seeds), bases
    before the experts fine-tuned from them; with ``lora``, the LoRA experts of every text task
    instead."""
    if lora:
        return [Planned(task, "pretrained", seed, lora=True) for seed in seeds for task in data.TEXT_TASKS]
    out = []
    for seed in seeds:
        out += [Planned(task, "pretrained", seed) for task in data.TEXT_TASKS]
        out.append(Planned("mnist", "shared_init", seed))
        out += [
            Planned(task, variant, seed)
            for variant in ("mnist_base", "shared_init")
            for task in ("fashion_mnist", "kmnist")
        ]
    return out


def estimate_seconds(config: dict) -> float:
    """Expected training plus evaluation time of an expert on the project's CPU. A LoRA expert is
    estimated at its full fine-tune's rates (it still runs the whole body forward and backward;
    its own rates are not measured yet)."""
    task = config["task"]
    recipe = cache.Recipe(**config["recipe"])
    n_train = len(data.load(task, "train"))
    if recipe.max_train_examples is not None:
        n_train = min(n_train, recipe.max_train_examples)
    n_eval = len(evaluation.eval_indices(task, data.get_task(task).eval_split, smoke=config["smoke"]))
    train_rate, eval_rate = RATES[task]
    return OVERHEAD_S + recipe.epochs * n_train / train_rate + n_eval / eval_rate


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _status_line(item: Planned, config: dict) -> tuple[str, float]:
    key = cache.config_key(config)
    cached = cache.load_expert(config)
    if cached is not None:
        took = cached.runtime["train_s"] + cached.runtime["eval_s"]
        return f"  {item}  {key[:10]}  cached   (took {_clock(took)}) {_metrics_text(cached.metrics)}", 0.0
    est = estimate_seconds(config)
    return f"  {item}  {key[:10]}  missing  (~{_clock(est)})", est


def _metrics_text(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "n")


def print_plan(items: list[Planned], smoke: bool) -> float:
    """Print each expert with its cache status; return the estimated seconds still to train."""
    total = 0.0
    print(f"experts ({'SMOKE' if smoke else 'full'} mode), cache {cache.experts_dir()}")
    for item in items:
        line, est = _status_line(item, item.config(smoke))
        total += est
        print(line)
    return total


def mergeability(seed: int, variant: str, *, smoke: bool) -> list[dict]:
    """Average the Fashion-MNIST and KMNIST experts of ``variant`` (bodies only: BatchNorm
    statistics are averaged too) and score the average on each task with the task's own head,
    without and with BatchNorm re-estimation; beside each expert's own score."""
    from .merge import merge

    tasks = ("fashion_mnist", "kmnist")
    experts = [train.fit_expert(t, seed=seed, variant=variant, smoke=smoke) for t in tasks]
    base = train.base_state_dict("fashion_mnist", seed=seed, variant=variant, smoke=smoke)
    body = merge("average", base, [e.state_dict for e in experts], exclude=HEAD_PATTERNS["vision"])
    records = []
    for expert in experts:
        merged = expert.model()
        merged.load_state_dict(train.with_head(body, expert, "vision"))
        plain = evaluation.evaluate(merged, expert.task, smoke=smoke)["accuracy"]
        train.reestimate_batchnorm(merged, expert.task, batches=2 if smoke else 20)
        bn = evaluation.evaluate(merged, expert.task, smoke=smoke)["accuracy"]
        records.append(
            {
                "seed": seed,
                "variant": variant,
                "task": expert.task,
                "expert": expert.metrics["accuracy"],
                "average": plain,
                "average_bn_reestimated": bn,
            }
        )
    return records


def plan_results(items: list[Planned], smoke: bool) -> dict:
    """Metrics of every cached expert of the plan, mean and std over seeds, and the targets."""
    rows = []
    for item in items:
        expert = cache.load_expert(item.config(smoke))
        if expert is not None:
            rows.append(
                {
                    "task": item.task,
                    "variant": item.variant,
                    "seed": item.seed,
                    "key": expert.key,
                    "metrics": expert.metrics,
                    "runtime": expert.runtime,
                    "versions": expert.versions,
                    **({"lora": expert.config["lora"]} if item.lora else {}),
                }
            )
    return {"experts": rows, "summary": summary_of(rows)}


def summary_of(rows: list[dict]) -> dict:
    """Per task and variant: the seeds, each metric's and the train time's mean and sample std
    over seeds (ddof=1, the convention of every table; 0 for a single seed), and the target."""
    summary = {}
    for task, variant in dict.fromkeys((r["task"], r["variant"]) for r in rows):
        group = [r for r in rows if (r["task"], r["variant"]) == (task, variant)]
        names = [k for k in group[0]["metrics"] if k != "n"]
        entry = {"seeds": [r["seed"] for r in group]}
        for name in names + ["train_s"]:
            values = [r["metrics"][name] if name != "train_s" else r["runtime"]["train_s"] for r in group]
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            entry[name] = {"mean": float(np.mean(values)), "std": std}
        if task in TARGETS:
            metric, minimum = TARGETS[task]
            entry["target"] = {"metric": metric, "minimum": minimum, "met": entry[metric]["mean"] >= minimum}
        summary[f"{task}/{variant}"] = entry
    return summary


def cut(items: list[Planned], seeds=None, tasks=None) -> list[Planned]:
    """The plan restricted to ``seeds`` and ``tasks`` (``None``: all); a seed or task the plan does
    not have is an error, not an empty run."""
    for name, given, have in (("seed", seeds, {i.seed for i in items}), ("task", tasks, {i.task for i in items})):
        unknown = sorted(set(given or ()) - have)
        if unknown:
            raise ValueError(f"unknown {name}(s) {unknown} for this plan; valid: {sorted(have)}")
    return [i for i in items if (seeds is None or i.seed in seeds) and (tasks is None or i.task in tasks)]


def merged_rows(previous: dict | None, rows: list[dict]) -> list[dict]:
    """``rows`` with the rows of ``previous`` results whose (task, variant, seed) they do not have
    (kept as they were, cache key and all), in task/variant/seed order of first appearance."""
    published = (previous or {}).get("experts", [])
    have = {(r["task"], r["variant"], r["seed"]) for r in rows}
    kept = [r for r in published if (r["task"], r["variant"], r["seed"]) not in have]
    # the published file's task order first
    order = {k: n for n, k in enumerate(dict.fromkeys((r["task"], r["variant"]) for r in [*published, *rows]))}
    return sorted(kept + rows, key=lambda r: (r["seed"], order[(r["task"], r["variant"])]))


def main(args) -> int:
    smoke = bool(getattr(args, "smoke", False))
    lora = bool(getattr(args, "lora", False))
    seeds, tasks = getattr(args, "seeds", None), getattr(args, "tasks", None)
    whole = plan(lora=lora)
    try:
        items = cut(whole, seeds, tasks)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    partial = len(items) < len(whole)
    remaining = print_plan(items, smoke)
    missing = [i for i in items if not cache.is_cached(i.config(smoke))]
    print(
        f"{len(missing)} of {len(items)} {'LoRA ' if lora else ''}experts to train; estimated {_clock(remaining)} "
        "on two CPU cores (longer while other work shares the CPU)"
    )
    if getattr(args, "dry_run", False):
        return 0
    start = time.perf_counter()
    for n, item in enumerate(missing, 1):
        print(f"[{n}/{len(missing)}] {item} (~{_clock(estimate_seconds(item.config(smoke)))})", flush=True)
        expert = item.fit(smoke)
        took = expert.runtime["train_s"] + expert.runtime["eval_s"]
        print(
            f"    {_metrics_text(expert.metrics)} in {_clock(took)}; {_clock(time.perf_counter() - start)} so far",
            flush=True,
        )
    results_path = paths.results_dir(smoke) / ("experts_lora.json" if lora else "experts.json")
    if partial and not lora:
        print(
            f"a cut plan ({len(items)} of {len(whole)} experts): {results_path} is left as it is "
            "(it needs the whole plan)"
        )
        return 0
    results = plan_results(items, smoke)
    if partial:
        previous = paths.read_json(results_path) if results_path.exists() else None
        rows = merged_rows(previous, results["experts"])
        results = {"experts": rows, "summary": summary_of(rows)}
    if lora:
        results["config"] = {
            "seeds": sorted({r["seed"] for r in results["experts"]}),
            "smoke": smoke,
            "lora": cache.lora_spec(True),
            "lr": cache.LORA_LR,
            "recipes": {t: asdict(cache.RECIPES[t]) for t in data.TEXT_TASKS},
            "lora_recipes": cache.LORA_RECIPES,
        }
    else:
        results["mergeability"] = [
            r
            for seed in SEEDS
            for variant in ("mnist_base", "shared_init")
            for r in mergeability(seed, variant, smoke=smoke)
        ]
        results["config"] = {
            "seeds": list(SEEDS),
            "smoke": smoke,
            "recipes": {t: asdict(r) for t, r in cache.RECIPES.items()},
        }
    out = paths.write_json(results_path, results)
    for name, entry in results["summary"].items():
        target = entry.get("target")
        check = (
            f"  target {target['metric']} >= {target['minimum']}: {'met' if target['met'] else 'NOT MET'}"
            if target
            else ""
        )
        means = " ".join(
            f"{k}={v['mean']:.4f}±{v['std']:.4f}"
            for k, v in entry.items()
            if isinstance(v, dict) and "mean" in v and k != "train_s"
        )
        print(f"  {name:<28} {means}  train {entry['train_s']['mean']:.0f}s{check}")
    print(f"wrote {out}")
    return 0
