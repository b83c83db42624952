"""The README's tables, computed from ``results/*.json`` so that no number in them is typed by hand.

``python -m lib report`` rewrites the parts of README.md between ``<!-- results:begin -->`` and
``<!-- results:end -->`` and between ``<!-- runtimes:begin -->`` and ``<!-- runtimes:end -->``;
``--check`` only says whether they are current (the tests run it, so a README whose numbers
drift from the committed results fails ``make test``). ``make figures`` runs it after drawing.

Each section is a function of the results dicts it reads and returns Markdown, or nothing when
its results file is missing, so a checkout with only some notebooks run still gets a README that
says which results are there (:func:`results_markdown`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from . import paths

RESULTS_MARKERS = ("<!-- results:begin -->", "<!-- results:end -->")
RUNTIMES_MARKERS = ("<!-- runtimes:begin -->", "<!-- runtimes:end -->")
LAB_MARKERS = ("<!-- lab:begin -->", "<!-- lab:end -->")
#: the lab's measured run (``papermill book/lab.ipynb``, copied from ``build/lab/results/``)
LAB_RESULT = "benchmarks/results/lab.json"
#: notebooks whose results the tables read, in README order
NOTEBOOKS = (
    "00_marchenko_pastur",
    "01_resnet_fashion_kmnist",
    "02_text_sst2_emotion",
    "03_text_sst2_cola",
    "04_star",
    "05_drm",
    "06_mergeability",
    "07_lora",
)
#: the notebooks of the report's three experiments (paper 000)
SWEEP_NOTEBOOKS = ("01_resnet_fashion_kmnist", "02_text_sst2_emotion", "03_text_sst2_cola")


#: published figures for small BERTs, beside our MiniLM experts (issue 5): GLUE *test-server*
#: scores of BERT-Small (4 layers, 512 wide, 29M parameters) and BERT-Medium (8 layers, 512 wide,
#: 41M) from Turc et al. 2019, "Well-Read Students Learn Better" (the BERT miniatures' model card),
#: best of their fine-tuning grid, 4 epochs; written on our 0-1 scale. Our numbers are
#: on the GLUE validation sets, so the two columns compare in size, not exactly. Not GLUE tasks
#: (Emotion, TREC, Rotten Tomatoes, the images): no published small-BERT figure is given.
PUBLISHED_SMALL_BERT = {
    "sst2": "accuracy 0.897 / 0.896",
    "cola": "mcc 0.278 / 0.380",
    "mrpc": "accuracy 0.762 / 0.816; f1 0.834 / 0.866",
    "rte": "accuracy 0.618 / 0.622",
}


# --- formatting ------------------------------------------------------------------------------


def fmt(value, digits: int = 3) -> str:
    """``digits`` decimals; three significant digits from 10,000 on (the report's SNRs reach 1e8)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3g}" if abs(value) >= 1e4 else f"{value:.{digits}f}"


def pm(mean, std, n=None, digits: int = 3) -> str:
    """``mean ± std (n)``; a single seed has no std."""
    text = fmt(mean, digits)
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {fmt(std, digits)}"
    return text + (f" ({int(n)})" if n is not None else "")


def clock(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "–"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def table(rows: list[Mapping], columns: Mapping[str, str]) -> str:
    """A Markdown table of ``rows`` with ``columns`` (key -> header)."""
    head = "| " + " | ".join(columns.values()) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(k, "")) for k in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def load(results_dir: Path | None = None) -> dict[str, dict]:
    """Every published results file that exists: name -> contents (``experts`` and notebooks)."""
    folder = Path(results_dir) if results_dir is not None else paths.results_dir(False)
    out = {}
    for name in ("experts", "experts_lora", *NOTEBOOKS):
        path = folder / f"{name}.json"
        if path.is_file():
            out[name] = paths.read_json(path)
    return out


# --- sections ------------------------------------------------------------------------------------


def experts_section(r: Mapping) -> str:
    rows = []
    for name, entry in r["summary"].items():
        task, variant = name.split("/")
        metrics = [k for k, v in entry.items() if isinstance(v, dict) and "mean" in v and k != "train_s"]
        target = entry.get("target")
        rows.append(
            {
                "task": task,
                "variant": variant,
                "seeds": len(entry["seeds"]),
                "scores": "; ".join(f"{m} {pm(entry[m]['mean'], entry[m]['std'])}" for m in metrics),
                "target": f"{target['metric']} ≥ {target['minimum']}: {'met' if target['met'] else '**not met**'}"
                if target
                else "report only",
                "published": PUBLISHED_SMALL_BERT.get(task, ""),
                "train": clock(entry["train_s"]["mean"]),
            }
        )
    text = (
        "**Experts** (`make experts`, `results/experts.json`): each task's own evaluation split, whole; "
        "mean ± sample std over seeds; train time per expert on the two-core CPU (wall clock, mean). "
        "Published small BERTs: GLUE test-server scores of BERT-Small / BERT-Medium (4 and 8 layers, "
        "512 wide; Turc et al. 2019); ours are on the validation sets.\n\n"
    )
    text += table(
        rows,
        {
            "task": "task",
            "variant": "start",
            "seeds": "seeds",
            "scores": "score",
            "target": "target",
            "published": "published small BERTs",
            "train": "train time",
        },
    )
    merge = r.get("mergeability") or []
    if merge:
        df = pd.DataFrame(merge)
        g = df.groupby(["variant", "task"])[["expert", "average", "average_bn_reestimated"]].agg(["mean", "std"])
        rows = [
            {
                "variant": v,
                "task": t,
                **{
                    c: pm(g.loc[(v, t), (c, "mean")], g.loc[(v, t), (c, "std")])
                    for c in ("expert", "average", "average_bn_reestimated")
                },
            }
            for v, t in g.index
        ]
        text += (
            "\n\nHow mergeable the vision experts are by starting point: the average of the Fashion-MNIST and "
            "KMNIST bodies, scored under each task's own head (accuracy, mean ± sample std over seeds).\n\n"
        )
        text += table(
            rows,
            {
                "variant": "start",
                "task": "task",
                "expert": "expert alone",
                "average": "average",
                "average_bn_reestimated": "average, BatchNorm re-estimated",
            },
        )
    return text


#: the tasks on which issue 17 asks a LoRA expert to come within LORA_GAP points of the full fine-tune
LORA_CHECKED = ("sst2", "emotion", "trec")
LORA_GAP = 3.0


def lora_section(results: Mapping[str, Mapping]) -> str:
    """LoRA experts (``results/experts_lora.json``) beside the full fine-tune of the same task and
    seed (``results/experts.json``): accuracy, the gap in points, whether it is within
    :data:`LORA_GAP` on :data:`LORA_CHECKED`, and each task's own metric where it is not accuracy
    (CoLA's MCC, MRPC's F1, Emotion's and TREC's macro-F1); empty without LoRA results."""
    from . import data

    lora, full = results.get("experts_lora"), results.get("experts")
    if not lora or not full:
        return ""
    fulls = {(e["task"], e["seed"]): e for e in full["experts"] if e["variant"] == "pretrained"}
    rows, gaps = [], {}
    for e in lora["experts"]:
        f = fulls.get((e["task"], e["seed"]))
        if f is None:
            continue
        gap = 100 * (e["metrics"]["accuracy"] - f["metrics"]["accuracy"])
        checked = e["task"] in LORA_CHECKED
        metric = data.get_task(e["task"]).metric
        own = (
            f"{metric} {fmt(e['metrics'][metric])} / {fmt(f['metrics'][metric])}"
            if metric != "accuracy" and metric in e["metrics"] and metric in f["metrics"]
            else ""
        )
        rows.append(
            {
                "task": e["task"],
                "seed": e["seed"],
                "lora": fmt(e["metrics"]["accuracy"]),
                "full": fmt(f["metrics"]["accuracy"]),
                "gap": f"{gap:+.1f}",
                "within": ("yes" if gap >= -LORA_GAP else "**no**") if checked else "report only",
                "own": own,
                "train": clock(e["runtime"]["train_s"])
                + (f" (load {e['runtime']['load_average']:.1f})" if e["runtime"].get("load_average") else ""),
            }
        )
        gaps.setdefault(e["task"], []).append(gap)
    spec = lora.get("config", {}).get("lora", {})
    text = (
        f"**LoRA experts** (`make experts LORA=1`, `results/experts_lora.json`): rank {spec.get('r')}, "
        f"alpha {spec.get('alpha')}, {' and '.join(spec.get('targets', []))} projections, head trained in full, "
        f"learning rate {lora.get('config', {}).get('lr')}, the full fine-tune's recipe otherwise"
        + "".join(
            f"{' except ' if i == 0 else ', '}{task} " + " ".join(f"{k} {v:g}" for k, v in kw.items())
            for i, (task, kw) in enumerate((lora.get("config", {}).get("lora_recipes") or {}).items())
        )
        + (" (`lib.cache.LORA_RECIPES`)" if lora.get("config", {}).get("lora_recipes") else "")
        + "; accuracy (and each task's own metric where it is another) on "
        f"each task's whole validation split beside the full fine-tune of the same task and seed "
        f"(`results/experts.json`). Seeds trained so far: "
        f"{sorted({r['seed'] for r in rows})}. Target: within {LORA_GAP:g} points on "
        f"{', '.join(LORA_CHECKED)}.\n\n"
    )
    means = [
        f"{task} {sum(gaps[task]) / len(gaps[task]):+.1f} ({len(gaps[task])} seed{'s' if len(gaps[task]) > 1 else ''})"
        for task in LORA_CHECKED
        if task in gaps
    ]
    text += (
        "Train time is wall time with the load average the row records (above 2 the two cores were shared). "
        f"Mean gap over seeds on the checked tasks, in points: {', '.join(means)}.\n\n"
        if means
        else ""
    )
    return text + table(
        rows,
        {
            "task": "task",
            "seed": "seed",
            "lora": "LoRA",
            "full": "full fine-tune",
            "gap": "gap (points)",
            "within": f"within {LORA_GAP:g}",
            "own": "task's metric, LoRA / full",
            "train": "LoRA train time",
        },
    )


def shape_bias_section(r: Mapping) -> str:
    rows = []
    for entry in r["shape_bias"]:
        rows.append(
            {
                "shape": "×".join(map(str, entry["shape"])),
                **{m: fmt(pd.Series(entry[f"snr_{m}"]).mean(), 3) for m in ("mp", "report_text", "max_median")},
            }
        )
    return (
        "**Notebook 00, pure Gaussian noise** (no signal at all; mean over "
        f"{r['config']['bias_draws']} draws): the SNR each definition reports. Ours (`mp`) is 0 for every "
        "shape; the report's definitions depend on the shape.\n\n"
        + table(
            rows,
            {
                "shape": "shape",
                "mp": "ours (`mp`)",
                "report_text": "report, text (`report_text`)",
                "max_median": "report, ResNet (`max_median`)",
            },
        )
    )


def report_section(results: Mapping[str, Mapping]) -> str:
    """The report's numbers (paper 000 section 4) beside ours, and each notebook's :func:`merges_table`."""
    rows = []
    for nb in SWEEP_NOTEBOOKS:
        if nb not in results:
            continue
        r = results[nb]
        for c in r["comparison"]:
            rows.append(
                {
                    "nb": nb[:2],
                    "what": c["what"],
                    "report": fmt(c["report"]),
                    "ours": pm(c["ours_mean"], c["ours_std"], c["seeds"]),
                    "run": f"`{c['run']}`",
                    "note": c.get("note", ""),
                }
            )
    if not rows:
        return ""
    text = (
        "**The report (paper 000, section 4) beside ours.** The report scored 200 examples; ours are whole "
        "evaluation splits (sizes below), mean ± sample std (seeds).\n\n"
    )
    text += table(
        rows, {"nb": "nb", "what": "claim", "report": "report", "ours": "ours", "run": "our run", "note": "note"}
    )
    for nb in SWEEP_NOTEBOOKS:
        if nb in results:
            text += "\n\n" + merges_table(nb, results[nb])
    return text


def merges_table(nb: str, r: Mapping) -> str:
    """One notebook's merges that must serve both tasks: each family's best run, picked by its
    *worst* task, chance-corrected (:func:`lib.sweep.chance_corrected`: ``(score - chance) /
    (expert - chance)``, each task's own metric, means over seeds), beside each expert alone and
    the base. A run that copies one expert scores that expert's numbers on its task and about
    chance on the other, so it scores about 0 and cannot win by excelling at one task; plain
    ``score / expert`` would credit it with the share of the expert's score that guessing gets
    (SST-2: 0.51 of 0.87)."""
    from . import data, sweep

    tasks = list(r["config"]["tasks"])
    metrics = {t: data.get_task(t).metric for t in tasks}
    chance = sweep.chance_scores({t: r["tasks"][t] for t in tasks}, metrics)
    s = sweep.summarize(r["records"])
    s = s[s.apply(lambda row: metrics.get(row.task) == row.metric, axis=1)]
    wide = s.pivot_table(index="run", columns="task", values="mean", aggfunc="first")[tasks]
    std = s.pivot_table(index="run", columns="task", values="std", aggfunc="first")[tasks]
    first = s.drop_duplicates("run").set_index("run")
    own = {t: wide.loc[f"expert:{t}", t] for t in tasks}
    wide["worst"] = pd.concat(
        [pd.Series(sweep.chance_corrected(wide[t], own[t], chance[t]), index=wide.index) for t in tasks], axis=1
    ).min(axis=1)
    merged = wide[first.loc[wide.index, "model"] == "merged"]
    snr_method = first.loc[merged.index, "snr_method"]
    families = [("Standard merge", merged.index == "average()")]
    families += [(f"best SNR merge, `{m}`", (snr_method == m).to_numpy()) for m in r["config"]["snr_methods"]]
    families.append(("best other method", snr_method.isna().to_numpy() & (merged.index != "average()")))
    picked = [(label, merged[mask]["worst"].idxmax()) for label, mask in families if mask.any()]
    picked += [
        ("expert alone" if run.startswith("expert") else "base", run)
        for run in [f"expert:{t}" for t in tasks] + ["base:base"]
        if run in wide.index
    ]
    rows = [
        {
            "merge": label,
            "run": f"`{run}`",
            **{t: pm(wide.loc[run, t], std.loc[run, t]) for t in tasks},
            "worst": fmt(wide.loc[run, "worst"]),
        }
        for label, run in picked
    ]
    rows.append(
        {
            "merge": "chance",
            "run": "always the most common label",
            **{t: fmt(chance[t]) for t in tasks},
            "worst": fmt(0.0),
        }
    )
    seeds = len(r["config"]["seeds"])
    head = (
        f"**Notebook {nb}**: the best merge of each family for *both* tasks, picked by its worst task, "
        "chance-corrected: (score − chance) / (its expert − chance), 0 for guessing and 1 for the expert (an "
        f"optimistic pick from the grid); mean ± sample std over {seeds} seeds; evaluation sets: "
        + ", ".join(f"{t} {r['tasks'][t]['split']} ({r['tasks'][t]['n_eval']:,})" for t in tasks)
        + "."
    )
    return (
        head
        + "\n\n"
        + table(
            rows,
            {
                "merge": "merge",
                "run": "run",
                **{t: f"{t} {metrics[t]}" for t in tasks},
                "worst": "worst task, chance-corrected",
            },
        )
    )


def effect_rows(
    parts: Sequence[tuple[str, Mapping, Sequence[Mapping]]], sources: Sequence[str] | None = None
) -> list[dict]:
    """The rows of a claims table (:func:`effects_section`), formatted: ``parts`` as there. With
    ``sources`` (README's table) a claim's source is its ``[n]`` in that list and a flagged
    baseline is bold; without (a notebook's table), the source's text and the flag as it is."""
    return [
        {
            "setting": setting,
            "claim": e["claim"],
            "pool": e.get("pools", ""),
            "source": f"[{sources.index(e['source']) + 1}]" if sources is not None else e["source"],
            "paper": fmt(e["paper"], 1),
            "ours": pm(e["ours"], e["ours_std"], None, 1),
            "interval": f"[{fmt(e['ci_low'], 1)}, {fmt(e['ci_high'], 1)}]",
            "wins": f"{e['won']}/{e['subsets']}",
            "levels": " / ".join(fmt(e[k], 1) for k in ("worse_score", "base_score", "chance_score")),
            "baseline": f"**{e['baseline']}**" if e["baseline"] and sources is not None else e["baseline"],
            "agrees": e["agrees"],
            "note": e["note"],
        }
        for setting, _, es in parts
        for e in es
    ]


def effects_section(parts: Sequence[tuple[str, Mapping, Sequence[Mapping]]], title: str) -> str:
    """A paper's claims measured on our experts (:func:`lib.pool.compare_effects`), one row per
    claim and setting (``parts``: the setting's name, its notebook's results, its effect rows): our
    effect with its t-interval, how many subsets it won, the baseline's level beside the base and
    guessing, and whether it counts as agreement with the paper. Sources are listed once, below."""
    parts = [(setting, r, list(effects)) for setting, r, effects in parts if effects]
    effects = [e for _, _, es in parts for e in es]
    if not effects or any("ci_low" not in e for e in effects):
        raise ValueError("these effects have no intervals: measure them again with lib.pool.refresh_effects")
    sources = list(dict.fromkeys(e["source"] for e in effects))
    levels = {e["level"] for e in effects}
    if len(levels) > 1:
        raise ValueError(f"one claims table needs one interval level, not {sorted(levels)}: refresh the effects")
    level = levels.pop()
    rows = effect_rows(parts, sources)
    from .pool import CHANCE_MARGIN

    seeds = "/".join(map(str, sorted({e["seeds"] for e in effects})))
    sizes = sorted({r["config"]["max_subsets"] for _, r, _ in parts})
    per_size = "/".join(map(str, sizes))
    one = ", so 3/3 at one size is three subsets, one per seed" if sizes == [1] else ""
    text = (
        f"**{title}** Effects in points of normalized accuracy (ours: mean ± sample std over {seeds} seeds of the "
        f"mean over each seed's subsets; the paper's in points of its metric), with a paired Student-t {level:.0%} "
        f"interval over seeds. `setting`: the experts merged (full fine-tunes, or LoRA adapters of rank 16 on the "
        f"query and value projections, the papers' own setting). `wins`: merged subsets where the claim held, of "
        f"all measured (at most {per_size} subset{'s' * (sizes != [1])} per size and seed{one}). `worse / base / "
        "chance`: the normalized score of "
        "the baseline, of the pre-trained body under the experts' heads, and of always answering the most common "
        f"label. A baseline within {CHANCE_MARGIN:g} points of chance, or below the base, is flagged: beating it "
        "shows that the baseline failed, so it does not count as agreeing with the paper. `agrees`: yes (the "
        "paper's sign, interval clear of 0, a working baseline), no (the opposite sign, clear of 0), unresolved "
        "(the interval holds 0), not counted (a flagged baseline), – (a comparison the paper does not make).\n\n"
    )
    text += table(
        rows,
        {
            "setting": "setting",
            "claim": "claim",
            "pool": "pool",
            "source": "source",
            "paper": "paper",
            "ours": "ours",
            "interval": f"{level:.0%} interval",
            "wins": "wins",
            "levels": "worse / base / chance",
            "baseline": "baseline",
            "agrees": "agrees",
            "note": "note",
        },
    )
    return text + "\n\nSources: " + "; ".join(f"[{i}] {src}" for i, src in enumerate(sources, 1)) + "."


#: each paper's claims: the notebook that measures them on full fine-tunes, and its name in notebook 07's
#: ``effects[].about`` (the same claims on LoRA experts)
CLAIMS = {
    "STAR": ("04_star", "Notebooks 04 and 07, STAR's claims (paper 002) on our full fine-tunes and LoRA experts."),
    "DRM": ("05_drm", "Notebooks 05 and 07, DRM's claims (paper 004) on our full fine-tunes and LoRA experts."),
}


def claims_section(results: Mapping[str, Mapping], paper: str) -> str:
    """One claims table per paper (:data:`CLAIMS`): its full fine-tune rows (notebook 04 or 05)
    above its LoRA rows (notebook 07), a ``setting`` column telling them apart; empty when
    neither notebook has results."""
    notebook, title = CLAIMS[paper]
    parts = []
    if notebook in results:
        parts.append(("full fine-tune", results[notebook], results[notebook]["effects"]))
    lora = results.get("07_lora")
    if lora is not None and lora.get("effects"):
        parts.append(("LoRA", lora, [e for e in lora["effects"] if e.get("about") == paper]))
    return effects_section(parts, title) if any(es for _, _, es in parts) else ""


def mergeability_section(r: Mapping) -> str:
    from .mergeability import INTERVAL_LEVEL, flat_properties, p_text

    rows = []
    for method, f in r["fits"].items():
        chosen = sorted(
            ((abs(c), name, c) for name, c in zip(f["features"], f["coefficients"]) if c != 0), reverse=True
        )
        n_perm = f.get("permutations", r["config"]["permutations"])
        rows.append(
            {
                "method": method,
                "pairs": len(f["pairs"]),
                "r2": fmt(f["r2"], 2),
                "interval": f"[{fmt(f['r2_interval'][0], 2)}, {fmt(f['r2_interval'][1], 2)}]",
                "p": p_text({"permutations": n_perm, **f}),
                "perms": f"{n_perm:,}",
                "features": ", ".join(f"{n} ({c:+.3f})" for _, n, c in chosen[:3]) or "none",
            }
        )
    levels = {f.get("interval_level", INTERVAL_LEVEL) for f in r["fits"].values()}
    if len(levels) != 1:
        raise ValueError(f"the fits' bootstrap intervals have different levels {sorted(levels)}: refit them alike")
    level = f"{levels.pop():.0%}"
    seed = r["config"]["seed"]
    stops = sorted({f["stop_after"] for f in r["fits"].values() if f.get("stop_after")})
    stopping = f", stopping once {'/'.join(map(str, stops))} do as well" if stops else ""
    features = next(iter(r["fits"].values()))["features"]
    flat = flat_properties(r["properties"], features)
    note = ""
    if flat:
        note = (
            "\n\nThe same for every pair, so they cannot predict anything here: "
            + ", ".join(
                f"`{f}` ({fmt(lo)}–{fmt(hi)} over the {len(r['properties'])} pairs)" for f, (lo, hi) in flat.items()
            )
            + "."
        )
        if set(flat) <= {"snr_rank_corr", "snr_agreement"}:
            note += (
                " These are the experts' own per-matrix SNRs, which the SNR merges of notebooks 01–03 route by: "
                "each expert's SNRs are those of the pre-trained matrices it started from, so every pair ranks its "
                "matrices alike and splits them alike. The task vectors' SNRs (`tv_snr_rank_corr`) are where the "
                "fine-tunings differ."
            )
    return (
        "**Notebook 06, predicting mergeability** (one Lasso per method over the text-expert pairs of one seed of "
        f"experts, seed {seed}; leave-one-pair-out R² with a bootstrap {level} interval over pairs and a "
        "permutation p-value, the share of shuffled-target refits of the whole pipeline doing as well (up to the "
        f"permutations shown{stopping}), marked ≤ where none did, as 1 / (permutations + 1) is then the smallest "
        "p they can show; the largest coefficients of the fit on all pairs, per standard deviation of the "
        "property).\n\n"
        + table(
            rows,
            {
                "method": "method",
                "pairs": "pairs",
                "r2": "LOO R²",
                "interval": f"{level} interval",
                "p": "permutation p",
                "perms": "permutations",
                "features": "largest coefficients",
            },
        )
        + note
    )


SECTIONS: list[tuple[tuple[str, ...], Callable[..., str]]] = [
    (("experts",), experts_section),
    ((), lora_section),
    (("00_marchenko_pastur",), shape_bias_section),
    ((), report_section),
    ((), lambda results: claims_section(results, "STAR")),
    ((), lambda results: claims_section(results, "DRM")),
    (("06_mergeability",), mergeability_section),
]


def results_markdown(results: Mapping[str, Mapping]) -> str:
    parts = []
    for needs, fn in SECTIONS:
        if not needs:
            parts.append(fn(results))
        elif needs[0] in results:
            parts.append(fn(results[needs[0]]))
    missing = [n for n in ("experts", *NOTEBOOKS) if n not in results]
    if missing:
        parts.append("Not run in full mode yet (no results file): " + ", ".join(f"`{n}`" for n in missing) + ".")
    return "\n\n".join(p for p in parts if p)


def total_seconds(r: Mapping) -> float | None:
    """A notebook's measured run time: ``runtimes.total_s`` or ``runtime_s.total``."""
    for outer, inner in (("runtimes", "total_s"), ("runtime_s", "total")):
        if isinstance(r.get(outer), Mapping) and inner in r[outer]:
            return float(r[outer][inner])
    return None


def records_seconds(r: Mapping) -> float:
    """The seconds a notebook's grid records took when they were computed (``sweep_s`` per seed
    and pool), wherever that was: inside the run, or earlier into the record store."""
    runtimes = r.get("runtimes")
    rows = runtimes.get("per_seed_and_pool", []) if isinstance(runtimes, Mapping) else []
    return float(sum(x.get("sweep_s") or 0.0 for x in rows))


def runtimes_markdown(results: Mapping[str, Mapping]) -> str:
    rows = []
    for name, job, what in (
        ("experts", "`make experts`", "experts"),
        ("experts_lora", "`make experts LORA=1`", "LoRA experts"),
    ):
        if name in results:
            rs = results[name]["experts"]
            seconds = sum(e["runtime"]["train_s"] + e["runtime"]["eval_s"] for e in rs)
            rows.append(
                {
                    "job": job,
                    "what": f"{len(rs)} {what} trained and evaluated",
                    "seconds": seconds,
                    "time": clock(seconds),
                    "note": "sum of the experts' own wall times",
                }
            )
    for nb in NOTEBOOKS:
        if nb in results:
            r = results[nb]
            seeds = r["config"].get("seeds") or [r["config"].get("seed")]
            trained = sum(not e.get("from_cache", True) for e in r.get("experts", []) if isinstance(e, Mapping))
            seconds = total_seconds(r) or 0.0
            note = (
                f"{trained} experts trained in the run"
                if trained
                else "experts from the cache"
                if r.get("experts")
                else ""
            )
            earlier = records_seconds(r)
            if earlier > seconds:  # the grid's records came from the record store: count their own times
                earlier_note = (
                    f"records computed earlier (`lib records compute`), their own times; this run {clock(seconds)}"
                )
                note = "; ".join(n for n in (note, earlier_note) if n)
                seconds += earlier
            rows.append(
                {
                    "job": f"notebook {nb}",
                    "what": f"{'SMOKE' if r.get('smoke') else 'full mode'}, seed{'s' * (len(seeds) > 1)} "
                    f"{', '.join(map(str, seeds))}",
                    "seconds": seconds,
                    "time": clock(seconds),
                    "note": note,
                }
            )
    if not rows:
        return ""
    total = sum(r["seconds"] for r in rows)
    rows.append({"job": "**total**", "what": "`make reproduce`, what is measured above", "time": clock(total)})
    text = (
        "Measured on the project's two-core CPU (no GPU); wall times, so they grow while other work shares "
        "the machine.\n\n" + table(rows, {"job": "job", "what": "what", "time": "time", "note": "note"})
    )
    plan = cluster_markdown(results)
    return text + ("\n\n" + plan if plan else "")


def cluster_markdown(results: Mapping[str, Mapping]) -> str:
    """Expected wall times of the full grids on 1, 2, 16 and 64 workers (:func:`lib.runner.cluster_plan`),
    from the per-record times each results file measured in one process."""
    from .runner import PLAN_WORKERS, cluster_plan

    ran = {nb: results[nb] for nb in NOTEBOOKS if nb in results}
    if not ran:
        return ""
    rows = []
    for row in cluster_plan(ran, total_seconds):
        name = "**all** (`make reproduce`, experts cached)" if row["notebook"] == "all" else row["notebook"]
        rows.append(
            {
                "notebook": name,
                "records": str(row["records"]),
                "serial": clock(row["serial_s"]),
                "longest": clock(row["longest_s"]),
                **{f"w{w}": clock(row["wall_s"][w]) for w in PLAN_WORKERS},
            }
        )
    columns = {
        "notebook": "notebook",
        "records": "models merged or scored",
        "serial": "serial part",
        "longest": "longest record",
        **{f"w{w}": f"{w} worker{'s' * (w > 1)}" for w in PLAN_WORKERS},
    }
    return (
        "**Planning a cluster run** (`lib.runner.cluster_plan`): the expected wall time of each full grid "
        "when `lib.runner.run_grid` spreads its records over workers as fast as this machine, computed from "
        "the per-record seconds (merge + evaluation) in each results file. A model an earlier notebook "
        "computed counts once (the record store shares it); the serial part is a notebook's run time less "
        "its own records (loading experts, spectra, diagnostics, 06's fits, tables); no plan goes below the "
        "longest single record. Left out: training missing experts (`make experts`, above; done first, in "
        "the runner's process) and each worker's start (about 10 s: torch import and loading its pool, "
        "`benchmarks/grid.py`). Every notebook and `make reproduce` run their grid through `run_grid`; "
        "`EXECUTOR=processes:N`, `dask:ADDRESS` or `slurm` is what these times plan for.\n\n" + table(rows, columns)
    )


def figure_files(figures_dir: Path | None = None) -> list[str]:
    """The published figures, as paths relative to the repository root."""
    folder = Path(figures_dir) if figures_dir is not None else paths.figures_dir(False)
    return [
        p.relative_to(paths.ROOT).as_posix() if p.is_relative_to(paths.ROOT) else p.as_posix()
        for p in sorted(folder.glob("*.png"))
    ]


def figures_markdown(figures) -> str:
    """Links to every published figure, one line per notebook."""
    lines = []
    for nb in NOTEBOOKS:
        mine = [f for f in figures if Path(f).name.startswith(f"{nb}_")]
        if mine:
            links = ", ".join(f"[{Path(f).stem.removeprefix(nb + '_')}]({f})" for f in mine)
            lines.append(f"* `{nb}`: {links}")
    return ("**Figures** (`make figures` redraws them from the results files):\n\n" + "\n".join(lines)) if lines else ""


def replace_between(text: str, markers: tuple[str, str], body: str) -> str:
    begin, end = markers
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"README has no {begin} ... {end} block")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text, count=1)


def lab_markdown(lab: Mapping | None) -> str:
    """The lab's measured run beside the full run: its wall and CPU time, the load it ran at, the
    experts' recipe and scores and the grid's verdict rows (``beside_full``), from
    :data:`LAB_RESULT`; empty without it."""
    if not lab:
        return ""
    rt = lab["runtime"]
    experts = "; ".join(
        f"{lab['tasks'][t]['title']} "
        + ", ".join(f"{m} {fmt(v)}" for m, v in scores.items() if m != "n")
        + f" (majority {fmt(lab['tasks'][t]['majority'])})"
        for t, scores in lab["experts"].items()
    )
    within = "within" if rt["total_s"] <= 600 else "**not** within"
    head = (
        f"Measured (`{LAB_RESULT}`, a full run of `book/lab.ipynb` under papermill, load average "
        f"{rt['load_average']:.1f} at its end): **{rt['total_s'] / 60:.1f} min wall**, {within} ten minutes "
        f"(training the two experts {clock(rt['experts_s'])}, spectra {clock(rt['spectra_s'])}, merging and scoring "
        f"{clock(rt['sweep_s'])}; {rt['cpu_s'] / 60:.1f} min of CPU time over both cores). Experts: {experts}. "
        f"The lab's runs beside the full run's mean over {lab['beside_full'][0]['full_seeds']} seeds "
        "(the same runs; one lab seed, so no interval):"
    )
    wanted = [
        r
        for r in lab["beside_full"]
        if r["run"].startswith(("expert:", "average", "task_arithmetic", "snr_winner(snr_method=mp"))
    ]
    rows = [
        {
            "run": f"`{r['run']}`",
            "task": lab["tasks"][r["task"]]["title"],
            "metric": r["metric"],
            "lab": fmt(r["lab"]),
            "full": pm(r["full"], r["full_std"]),
        }
        for r in wanted
    ]
    return (
        head
        + "\n\n"
        + table(rows, {"run": "run", "task": "task", "metric": "metric", "lab": "lab", "full": "full (mean ± std)"})
    )


def render(readme: str, results: Mapping[str, Mapping], figures=(), lab: Mapping | None = None) -> str:
    body = "\n\n".join(p for p in (results_markdown(results), figures_markdown(figures)) if p)
    text = replace_between(readme, RESULTS_MARKERS, body)
    text = replace_between(text, RUNTIMES_MARKERS, runtimes_markdown(results))
    if lab is not None or LAB_MARKERS[0] in text:
        text = replace_between(text, LAB_MARKERS, lab_markdown(lab))
    return text


def load_lab() -> dict | None:
    """The lab's measured run (:data:`LAB_RESULT`), or None where it is missing."""
    path = paths.ROOT / LAB_RESULT
    return paths.read_json(path) if path.exists() else None


def main(args) -> int:
    readme = paths.ROOT / "README.md"
    current = readme.read_text()
    new = render(current, load(), figure_files(), load_lab())
    if getattr(args, "check", False):
        if new != current:
            print("README.md tables differ from results/*.json: run `python -m lib report`")
            return 1
        print("README.md tables match results/*.json")
        return 0
    if new != current:
        paths.atomic_write_bytes(readme, new.encode())
        print("README.md tables rewritten from results/*.json")
    return 0
