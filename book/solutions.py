"""Solutions of the book's exercises, computed from the committed ``results/*.json``.

Every solution is a function of the results (no number is typed here): it returns a
:class:`Solution` whose ``text`` the exercises page shows when a student reveals it, and whose
``facts`` are the numbers the text is built from. ``tests/test_exercises.py`` checks the facts
each answer's argument rests on, so an answer that stops being true fails ``make test``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent
while not (ROOT / "lib").is_dir() and ROOT != ROOT.parent:  # book/ in the checkout, or its staged copy
    ROOT = ROOT.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib import paths  # noqa: E402  (lib.paths only: no torch, so every solution runs in well under a second)


@dataclass
class Solution:
    exercise: str
    text: str
    facts: dict = field(default_factory=dict)

    def _repr_markdown_(self) -> str:
        return self.text


SOLUTIONS: dict[str, Callable[[], Solution]] = {}


def solution(exercise: str):
    def register(fn):
        SOLUTIONS[exercise] = fn
        return fn

    return register


def results(notebook: str) -> dict:
    return paths.read_json(paths.results_dir(False) / f"{notebook}.json")


def show(exercise: str) -> Solution:
    """The solution of ``exercise`` ("00.1"), rendered as Markdown in a notebook."""
    return SOLUTIONS[exercise]()


def f3(x: float) -> str:
    return f"{x:.3f}"


def summary(records) -> pd.DataFrame:
    """Mean over seeds per run, task and metric (a run's label names all its hyperparameters)."""
    return pd.DataFrame(records).groupby(["run", "task", "metric"])["value"].agg(["mean", "std", "count"])


# --------------------------------------------------------------------------------------------- 00


@solution("00.1")
def spike_before_threshold() -> Solution:
    s = results("00_marchenko_pastur")["spike"]
    first = int(np.argmax(np.asarray(s["n_signal"]) > 0))
    sigma2 = s["sigma2"][first]
    facts = {
        "t_first": s["strengths"][first],
        "t_predicted": s["detection_strength"],
        "t_previous": s["strengths"][first - 1],
        "lambda_first": s["lambda_max"][first],
        "threshold_sigma1": s["threshold"],
        "sigma2_first": sigma2,
        "threshold_fitted": s["threshold"] * sigma2,
        "sigma2_at_zero": s["sigma2"][0],
    }
    text = (
        f"The prediction `t = {f3(facts['t_predicted'])}` and the threshold line `{f3(facts['threshold_sigma1'])}` "
        f"assume the noise variance is exactly `σ² = 1`. The SNR never gets `σ²`: it fits it from the median of "
        f"the bulk, and a finite draw gives `σ² = {facts['sigma2_at_zero']:.4f}` even with no spike (t = 0) and "
        f"`{sigma2:.4f}` at the first detection. Edge and threshold scale with `σ²`, so the threshold actually "
        f"used is `{f3(facts['threshold_sigma1'])} × {sigma2:.4f} = {f3(facts['threshold_fitted'])}`, and the top "
        f"eigenvalue `{f3(facts['lambda_first'])}` at `t = {f3(facts['t_first'])}` clears it one grid step "
        f"before the σ² = 1 prediction (the previous step is `t = {f3(facts['t_previous'])}`). A detector that "
        f"estimates its noise level moves its threshold with the estimate; compare the dashed lines of the "
        f"spike figure, drawn at the fitted `σ²`."
    )
    return Solution("00.1", text, facts)


@solution("00.2")
def threshold_above_edge() -> Solution:
    r = results("00_marchenko_pastur")
    tw, level = r["tracy_widom"], r["config"]["detection_level"]
    draws = len(tw["top"])
    facts = {
        "draws": draws,
        "above_edge": tw["frac_above_edge"],
        "above_threshold": tw["frac_above_threshold"],
        "edge": tw["lambda_plus"],
        "threshold": tw["threshold"],
        "level": level,
        "expected_false_alarms": draws * (1 - level),
    }
    text = (
        f"Of {draws} pure-noise {tw['rows']}×{tw['cols']} matrices, {facts['above_edge']:.1%} have a largest "
        f"eigenvalue above the Marchenko–Pastur edge `λ+ = {f3(facts['edge'])}`: calling everything above "
        f'`λ+` signal would find "signal" in one noise matrix in {1 / facts["above_edge"]:.0f}. The edge is '
        f"where the bulk ends for an *infinite* matrix; for a finite one the top eigenvalue fluctuates around "
        f"it on the Tracy–Widom scale. At the {level:.1%} Tracy–Widom quantile the threshold is "
        f"`{f3(facts['threshold'])}`, and {facts['above_threshold']:.1%} of the draws exceed it (about "
        f"{facts['expected_false_alarms']:.0f} of {draws} are expected at that level)."
    )
    return Solution("00.2", text, facts)


@solution("00.3")
def report_snr_shape_bias() -> Solution:
    rows = results("00_marchenko_pastur")["shape_bias"]
    table = pd.DataFrame(
        [
            {
                "shape": "×".join(map(str, r["shape"])),
                "q": min(r["shape"]) / max(r["shape"]),
                "tall": r["shape"][0] > r["shape"][1],
                "mp": float(np.mean(r["snr_mp"])),
                "report_text": float(np.mean(r["snr_report_text"])),
            }
            for r in rows
        ]
    )
    square = table[table.q == 1.0].iloc[0]
    worst = table.loc[table.report_text.idxmax()]
    facts = {
        "mp_max": float(table.mp.abs().max()),
        "report_text_square": float(square.report_text),
        "report_text_worst": float(worst.report_text),
        "worst_shape": worst["shape"],
        "table": table.to_dict("records"),
    }
    text = (
        f"Every matrix here is pure noise, so a faithful SNR is 0 for all of them, and ours is (largest mean "
        f"{facts['mp_max']:.3f}). The report's `report_text` SNR divides `WᵀW` by the *smaller* dimension, which "
        f"multiplies every eigenvalue by `1/q`, while its edge keeps the scale of `q`: at `q = 1` the two "
        f"agree ({facts['report_text_square']:.3f} for {square['shape']}), and the further the shape is from square the "
        f"more of the bulk lies above the edge and counts as signal, up to {facts['report_text_worst']:.3g} for "
        f"{worst['shape']} noise. Ranking the layers of one network by it ranks them by shape.\n\n"
        + table[["shape", "q", "mp", "report_text"]].round(3).to_markdown(index=False)
    )
    return Solution("00.3", text, facts)


# --------------------------------------------------------------------------------------------- 01


@solution("01.1")
def low_a_is_max() -> Solution:
    r = results("01_resnet_fashion_kmnist")
    a, b = r["config"]["tasks"]
    layers = pd.DataFrame(r["layers"])
    wide = layers.pivot_table(index=["snr_method", "key"], columns="expert", values="snr")
    a_wins = (wide[a] >= wide[b]).groupby(level="snr_method").mean()
    df = pd.DataFrame(r["records"])
    on = ["seed", "snr_method", "top", "threshold", "task", "metric"]
    pair = df[df.method == "snr_low_a"].merge(df[df.method == "snr_max"], on=on, suffixes=("_a", "_max"))
    facts = {
        "share_a_wins": a_wins.to_dict(),
        "records_compared": len(pair),
        "largest_difference": float((pair.value_a - pair.value_max).abs().max()),
        "expert_a": a,
        "seed": int(layers.seed.iloc[0]),
    }
    shares = ", ".join(f"`{m}`: {s:.0%}" for m, s in facts["share_a_wins"].items())
    text = (
        f"Both strategies average the high-SNR layers; on the low ones `snr_low_a` takes expert A ({a}) and "
        f"`snr_max` takes the *winner*, the expert with the higher SNR on that layer. The Fashion-MNIST expert's "
        f"SNR is at least KMNIST's on this share of the layers (seed {facts['seed']}): {shares}, so the winner "
        f"is always expert A and the two rules build the same model. Across the {facts['records_compared']} "
        f"scores where both were measured, the largest difference is {facts['largest_difference']:.3g}. "
        f"Only where the experts' SNR rankings cross would `snr_max` differ; why they don't cross is notebook "
        f"06's point: an expert's SNRs are mostly those of the matrices it started from."
    )
    return Solution("01.1", text, facts)


@solution("01.2")
def task_arithmetic_at_chance() -> Solution:
    r = results("01_resnet_fashion_kmnist")
    df = pd.DataFrame(r["records"])
    s = (
        df[df.method.isin(["task_arithmetic", "average"])]
        .groupby(["method", "task"])
        .value.agg(["mean", "std", "min", "max"])
    )
    chance = {t: spec["majority"] for t, spec in r["tasks"].items()}
    ta = s.loc["task_arithmetic"]
    facts = {
        "task_arithmetic": ta.to_dict("index"),
        "average": s.loc["average"].to_dict("index"),
        "chance": chance,
        "lam": next(run for run in r["config"]["runs"] if run.startswith("task_arithmetic")),
    }
    paper_ta = next(e["note"] for e in results("04_star")["effects"] if "task_arithmetic" in e["claim"] and e["note"])
    lines = "; ".join(
        f"{t}: task arithmetic {f3(ta.loc[t, 'mean'])} (every seed between {f3(ta.loc[t, 'min'])} and "
        f"{f3(ta.loc[t, 'max'])}), average {f3(s.loc[('average', t), 'mean'])}, chance {f3(chance[t])}"
        for t in ta.index
    )
    text = (
        f"`{facts['lam']}` adds *both* task vectors to the base in full: `θ = θ₀ + τ_A + τ_B`, twice as far "
        f"from the base as the average `θ₀ + (τ_A + τ_B)/2`. {lines}. An accuracy equal to chance on every seed, "
        f"with no spread, is a network that answers one class for every image (these test sets are balanced). "
        f"The ResNet's task vectors are large (each expert moved far from the MNIST base, BatchNorm "
        f"statistics included) and not aligned, so their sum leaves the region where either expert's features "
        f"work, and BatchNorm's summed running statistics no longer match the activations. Papers that use task "
        f"arithmetic scale the sum ({paper_ta}): `λ = 1` is the method at its least forgiving, "
        f"which is why notebooks 04–05 flag it as a baseline at chance."
    )
    return Solution("01.2", text, facts)


# --------------------------------------------------------------------------------------------- 02


@solution("02.1")
def winner_shared_head() -> Solution:
    r = results("02_text_sst2_emotion")
    rows = [c for c in r["comparison"] if c["what"].startswith("SST-2 accuracy, SNR Winner top 25%")]
    own = next(c for c in rows if "own heads" in c["what"])
    shared = next(c for c in rows if "shared head" in c["what"])
    facts = {"own": own["ours_mean"], "shared": shared["ours_mean"], "report": own["report"], "run": own["run"]}
    text = (
        f"In the report's evaluation both tasks share one two-class head: the SST-2 head merged with an untrained "
        f"one. `snr_winner` does not mix a high-SNR layer, it takes the winner's copy whole, and the trained "
        f"SST-2 head has the higher SNR (an untrained head is close to noise). So at `top = 0.25` the shared "
        f"head *is* the SST-2 head, and `{facts['run']}` scores {f3(facts['own'])} with its own head and "
        f"{f3(facts['shared'])} with the shared one. Only strategies that average the heads (the Standard merge) "
        f"see the two evaluations differ; see the head_variants figure."
    )
    return Solution("02.1", text, facts)


@solution("02.2")
def emotion_costs_most() -> Solution:
    r = results("02_text_sst2_emotion")
    s = summary(r["records"])["mean"]
    rows = []
    for task, spec in r["tasks"].items():
        for metric in spec["metrics"]:
            expert, avg = s[(f"expert:{task}", task, metric)], s[("average()", task, metric)]
            rows.append({"task": task, "metric": metric, "expert": expert, "average": avg, "kept": avg / expert})
    table = pd.DataFrame(rows)
    worst = table.loc[table.kept.idxmin()]
    facts = {
        "table": table.to_dict("records"),
        "worst": (worst.task, worst.metric),
        "worst_kept": float(worst.kept),
        "sst2_kept": float(table[table.task == "sst2"].kept.min()),
    }
    text = (
        f"The Standard merge keeps {facts['sst2_kept']:.0%} of the SST-2 expert's accuracy but only "
        f"{facts['worst_kept']:.0%} of Emotion's {worst.metric}. Six emotions need finer features than "
        f"positive/negative: the averaged body halves the Emotion fine-tuning's step and mixes in SST-2's, "
        f"whose features separate sentiment, not joy from love or anger from fear. Macro-F1 weighs the rare "
        f"classes (surprise, love) as much as the common ones, and those are lost first.\n\n"
        + table.round(3).to_markdown(index=False)
    )
    return Solution("02.2", text, facts)


# --------------------------------------------------------------------------------------------- 03


@solution("03.1")
def cola_accuracy_vs_mcc() -> Solution:
    r = results("03_text_sst2_cola")
    s = summary(r["records"])["mean"].unstack("metric").xs("cola", level="task")
    majority = r["tasks"]["cola"]["majority"]
    merges = s[~s.index.str.startswith(("expert:", "base:"))]
    near = merges[(merges.accuracy - majority).abs() <= 0.02]
    facts = {
        "majority": majority,
        "expert_acc": float(s.loc["expert:cola", "accuracy"]),
        "expert_mcc": float(s.loc["expert:cola", "mcc"]),
        "near_majority": len(near),
        "near_mcc_max": float(near.mcc.max()) if len(near) else math.nan,
        "merges": len(merges),
    }
    text = (
        f'Always answering "acceptable" scores accuracy {f3(majority)} on CoLA\'s validation set, and the CoLA '
        f"expert itself reaches only {f3(facts['expert_acc'])}: accuracy has a range of a few points between "
        f"knowing nothing and the best we have. Matthews correlation is 0 for any constant answer and "
        f"{f3(facts['expert_mcc'])} for the expert. Of the {facts['merges']} merges, {facts['near_majority']} "
        f"score a CoLA accuracy within 2 points of the majority class; the best MCC among them is "
        f"{f3(facts['near_mcc_max'])}. An accuracy near {f3(majority)} says nothing about whether a merge kept CoLA; the "
        f"MCC row of the sweep does."
    )
    return Solution("03.1", text, facts)


@solution("03.2")
def base_reset_at_zero() -> Solution:
    r = results("03_text_sst2_cola")
    s = summary(r["records"])["mean"]
    runs = [run for run in r["config"]["runs"] if run.startswith("snr_base_reset") and "top=0.0" in run]
    diffs = [
        abs(s[(run, t, m)] - s[("base:base", t, m)])
        for run in runs
        for t, spec in r["tasks"].items()
        for m in spec["metrics"]
    ]
    ones = [run for run in r["config"]["runs"] if run.startswith("snr_base_reset") and "top=1.0" in run]
    diffs_one = [
        abs(s[(run, t, m)] - s[("average()", t, m)])
        for run in ones
        for t, spec in r["tasks"].items()
        for m in spec["metrics"]
    ]
    facts = {
        "runs": runs,
        "largest_difference_to_base": float(max(diffs)),
        "largest_difference_to_average_at_one": float(max(diffs_one)),
        "base_sst2": float(s[("base:base", "sst2", "accuracy")]),
    }
    text = (
        f"Spectrum Base Reset averages the high-SNR layers and puts the base's weights back in the low ones. At "
        f"`top = 0` no layer is high, so the merge *is* the base (largest difference to the base's scores "
        f"{facts['largest_difference_to_base']:.3g}, for both SNR definitions: which layers are low does not "
        f"matter when all are); at `top = 1` it is the average (largest difference "
        f"{facts['largest_difference_to_average_at_one']:.3g}). The base scores {f3(facts['base_sst2'])} on "
        f'SST-2, chance for an untrained head: the curve of this strategy runs from "nothing learned" to the '
        f"Standard merge, and the question is only where between them it rises."
    )
    return Solution("03.2", text, facts)


# --------------------------------------------------------------------------------------------- 04


@solution("04.1")
def star_at_eta_100() -> Solution:
    r = results("04_star")
    df = pd.DataFrame(r["records"])
    on = ["pool", "seed", "subset", "task", "metric"]
    # by method and hyperparameters, not by label: a label grows when a method gains one (STAR's lam)
    star = df[(df.method == "star") & df.hparams.map(lambda h: h.get("eta") == 100 and h.get("rescale") is True)]
    avg = df[df.method == "average"]
    pair = star.merge(avg, on=on, suffixes=("_star", "_avg"))
    facts = {"compared": len(pair), "largest_difference": float((pair.value_star - pair.value_avg).abs().max())}
    text = (
        f"STAR keeps, of each task vector, the smallest rank whose singular values hold η % of its nuclear norm. "
        f"At η = 100 that is every direction: nothing is cut, the rescale has nothing to restore, and what is "
        f"left is the mean of the task vectors added to the base, the plain average. Over the "
        f"{facts['compared']} scores where both were measured, the largest difference is "
        f"{facts['largest_difference']:.3g} (round-off of the SVD through which STAR rebuilds each matrix). "
        f"So the right end of every η curve is the average, and a curve that rises to η = 100 says truncation "
        f"only removed what the tasks learned."
    )
    return Solution("04.1", text, facts)


def _effect(r: dict, claim: str, pools: str) -> dict:
    return next(e for e in r["effects"] if e["claim"] == claim and e["pools"] == pools)


@solution("04.2")
def star_beats_ta_not_counted() -> Solution:
    r = results("04_star")
    flagged = [e for e in r["effects"] if "task_arithmetic" in e["claim"] and e["pools"].startswith("vision")]
    facts = {
        "rows": [
            {k: e[k] for k in ("claim", "pools", "ours", "worse_score", "chance_score", "baseline", "agrees")}
            for e in flagged
        ]
    }

    def line(e):
        setting = "the paper's α = 0.125" if "lam=0.125" in e["claim"] else "λ = 1"
        return (
            f"{e['pools']}, {setting}: STAR minus task arithmetic {e['ours']:+.1f} points, task arithmetic at {e['worse_score']:.1f} "
            f"against chance {e['chance_score']:.1f} ({e['baseline'] or 'a working baseline'}; agrees: {e['agrees']})"
        )

    text = (
        f"On the vision pools STAR beats task arithmetic at `λ = 1` by a wide margin. But that task arithmetic "
        f"sums the task vectors and lands at chance (exercise 01.2): beating a model that answers one class says "
        f"that the baseline failed, not that STAR is better than a working task arithmetic. So the table flags the "
        f"baseline, and a `λ = 1` row is ours only in any case: the paper's Table 2 scales the sum by α = 0.125, "
        f"which is run too and is the row that tests the paper. Where that one works, its verdict counts; where it "
        f"also lands at chance, it is not counted either. Row by row: {'; '.join(line(e) for e in flagged)}."
    )
    return Solution("04.2", text, facts)


# --------------------------------------------------------------------------------------------- 05


@solution("05.1")
def drm_beats_average_not_counted() -> Solution:
    r = results("05_drm")
    e = _effect(r, "DRM-H beats average (7 tasks)", "text")
    facts = {
        k: e[k]
        for k in (
            "ours",
            "ci_low",
            "ci_high",
            "worse_score",
            "base_score",
            "chance_score",
            "baseline",
            "agrees",
            "paper",
        )
    }
    text = (
        f"DRM-H beats the average of {e['sizes'][0]} text experts by {e['ours']:.1f} points (95 % interval "
        f"[{e['ci_low']:.1f}, {e['ci_high']:.1f}]), more than the paper's {e['paper']:.1f}. But the average "
        f"scores {e['worse_score']:.1f} in normalized accuracy, and always answering each task's most common "
        f"label scores {e['chance_score']:.1f}: {e['sizes'][0]} averaged task vectors leave each one "
        f"1/{e['sizes'][0]} of its step, and the merged body is no better than guessing the majority. The comparison is with a baseline "
        f"that failed (flag: {e['baseline']}), so it is not counted as agreement (agrees: {e['agrees']})."
    )
    return Solution("05.1", text, facts)


@solution("05.2")
def renormalisation_unresolved() -> Solution:
    from scipy import stats

    r = results("05_drm")
    rows = [e for e in r["effects"] if e["claim"] == "renormalisation helps DRM-H (all sizes)"]
    seeds = rows[0]["seeds"]
    t_factor = float(stats.t.ppf(0.5 + rows[0]["level"] / 2, seeds - 1))
    holds_zero = [e["pools"] for e in rows if e["ci_low"] <= 0 <= e["ci_high"]]
    facts = {
        "rows": [
            {
                k: e[k]
                for k in (
                    "pools",
                    "paper",
                    "ours",
                    "ours_std",
                    "ci_low",
                    "ci_high",
                    "won",
                    "subsets",
                    "seeds",
                    "agrees",
                )
            }
            for e in rows
        ],
        "t_factor": t_factor,
        "holds_zero": holds_zero,
    }
    lines = "; ".join(
        f"{e['pools']}: {e['ours']:+.1f} ± {e['ours_std']:.1f} over {e['seeds']} seeds, interval "
        f"[{e['ci_low']:.1f}, {e['ci_high']:.1f}], paper {e['paper']:+.1f}"
        for e in rows
    )
    verdict = (
        "Every interval holds 0: our data neither confirm nor contradict the paper's Table 3."
        if len(holds_zero) == len(rows)
        else f"The intervals of {', '.join(holds_zero) or 'no pool'} hold 0; the others are resolved."
    )
    text = (
        f"Per pool: {lines}. With {seeds} seeds the paired Student-t interval is the mean ± {t_factor:.2f} "
        f"standard errors (t with {seeds - 1} degrees of freedom), so an effect of a few points needs a "
        f"seed-to-seed spread well under a point to resolve. {verdict} Count the wins too: a claim that holds "
        f"on most subsets can still be unresolved when one seed goes the other way by a lot. More seeds, not "
        f"more subsets of one seed, is what would narrow it."
    )
    return Solution("05.2", text, facts)


# --------------------------------------------------------------------------------------------- 06


@solution("06.1")
def snr_features_constant() -> Solution:
    props = pd.DataFrame(results("06_mergeability")["properties"])
    ranges = {
        c: (float(props[c].min()), float(props[c].max()))
        for c in ("snr_rank_corr", "snr_agreement", "tv_snr_rank_corr")
    }
    facts = {"pairs": len(props), "ranges": ranges}
    fmt = {c: f"{lo:.3f}–{hi:.3f}" for c, (lo, hi) in ranges.items()}
    text = (
        f"Over the {len(props)} pairs, `snr_rank_corr` (how alike two experts rank their matrices by SNR) lies "
        f"in {fmt['snr_rank_corr']} and `snr_agreement` in {fmt['snr_agreement']}: a property equal for every "
        f"pair cannot predict which pairs merge well. These SNRs are of the experts' *weights*, and a fine-tuning "
        f"changes a pre-trained matrix by a small fraction of its norm, so each expert keeps the spectrum, and "
        f"the SNR ranking, of the MiniLM it started from; all experts inherit the same one. That is also why "
        f"the SNR strategies of 01–03 route nearly the same layers whichever pair they merge. The SNRs of the "
        f"task vectors (`tv_snr_rank_corr`, {fmt['tv_snr_rank_corr']}) are where fine-tunings differ."
    )
    return Solution("06.1", text, facts)


@solution("06.2")
def read_p_before_coefficients() -> Solution:
    fits = results("06_mergeability")["fits"]
    rows = [
        {
            "method": m,
            "r2": f["r2"],
            "low": f["r2_interval"][0],
            "high": f["r2_interval"][1],
            "p": f["permutation_p"],
            "permutations": f["permutations"],
        }
        for m, f in fits.items()
    ]
    table = pd.DataFrame(rows)
    facts = {
        "table": table.to_dict("records"),
        "significant": table[table.p < 0.05].method.tolist(),
        "interval_holds_zero": table[(table.low <= 0) & (table.high >= 0)].method.tolist(),
    }
    text = (
        f"Below 0.05 in permutation p: {', '.join(facts['significant']) or 'none'}; a bootstrap interval of the "
        f"left-out R² that holds 0: {', '.join(facts['interval_holds_zero']) or 'none'}. The two are different "
        f"questions. The permutation p asks whether the properties carry *any* signal (shuffled targets rarely "
        f"fit as well); the interval asks how well they would predict *another* handful of pairs, and with 21 "
        f"pairs, each task in six of them, it is wide. So: the properties are related to mergeability for most "
        f"methods, and the coefficients of a single fit are not yet a finding.\n\n"
        + table.round(3).to_markdown(index=False)
    )
    return Solution("06.2", text, facts)


@solution("04.3")
def lora_experts() -> Solution:
    lora = results("experts_lora")
    full = {(e["task"], e["seed"]): e for e in results("experts")["experts"] if e["variant"] == "pretrained"}
    cfg = lora["config"]["lora"]
    rows = []
    for e in lora["experts"]:
        ref = full.get((e["task"], e["seed"]))
        if ref is None or e["seed"] != 0:  # the seed the text names; every task has it
            continue
        metric = "mcc" if "mcc" in e["metrics"] else "accuracy"
        rows.append(
            {
                "task": e["task"],
                "seed": e["seed"],
                "metric": metric,
                "lora": e["metrics"][metric],
                "full": ref["metrics"][metric],
                "gap_points": 100 * (e["metrics"][metric] - ref["metrics"][metric]),
            }
        )
    bench = paths.read_json(paths.ROOT / "benchmarks" / "results" / "lowrank.json")
    star = bench["methods"]["star"]
    facts = {
        "rank": cfg["r"],
        "alpha": cfg["alpha"],
        "targets": cfg["targets"],
        "experts": rows,
        "worst_gap_points": min(r["gap_points"] for r in rows),
        "star_factored_ratio_cpu": star["ratio_cpu"],
        "star_max_relative_error": star["max_relative_error"],
        "bench_rank": bench["rank"],
    }
    gaps = ", ".join(f"{r['task']} {r['gap_points']:+.1f}" for r in sorted(rows, key=lambda r: r["gap_points"]))
    text = (
        f"A LoRA expert changes only the adapted matrices ({', '.join(f'`{t}`' for t in cfg['targets'])} here, as in "
        f"the STAR and DRM papers), each by ΔW = (α/r)·B·A with B of r = {cfg['r']} columns (α = {cfg['alpha']:g}). "
        f"So its task vector on such a matrix has rank at most {cfg['r']}: at most {cfg['r']} non-zero singular "
        f"values, whatever the matrix's size, and every other weight (the rest of the body) has a task vector of "
        f"exactly zero. Three things follow. (1) STAR's η can only choose among those {cfg['r']} directions: "
        f"truncation is a much coarser knob than on a full fine-tune, whose task vectors have full rank with a "
        f"long tail of small singular values, and that tail is what STAR was designed to cut. (2) The SVD needs "
        f"no dense decomposition: QR of B and of Aᵀ and an r×r SVD give it exactly; `benchmarks/lowrank.py` measures "
        f"STAR on three rank-{facts['bench_rank']} experts of BERT-base shapes {facts['star_factored_ratio_cpu']:.0f}× "
        f"faster than the dense float64 SVD at a relative error of {facts['star_max_relative_error']:.1g}. (3) Most experts are weaker: "
        f"the seed-0 LoRA experts against the full fine-tunes of the same seed, "
        f"in points of each task's metric: {gaps}. Merging adapters is therefore a different experiment from "
        f"merging full fine-tunes, and a claim the papers make for LoRA experts is only tested by LoRA experts "
        f"(notebook 07)."
    )
    return Solution("04.3", text, facts)
