"""Figures shared by notebooks 01-03 (the SNR-routed merges of the Sapienza report).

Every function takes the notebook's results dict and returns the saved paths. What the dict
holds (written by the notebooks through :mod:`lib.sweep`):

``notebook``   the notebook's stem, used as the prefix of every figure name
``config``     ``snr_methods`` (ours first), ``strategies``, ``references``, ...
``tasks``      task -> ``{"metrics": [...], "n_eval": int, ...}`` (the metrics to plot, in order)
``records``    tidy sweep records (:func:`lib.sweep.run_sweep`), all seeds
``layers``     per-layer SNR rows: ``expert``, ``key``, ``rows``, ``cols``, ``snr_method``, ``snr``
``esd``        a few layers' spectra: ``expert``, ``key``, ``why``, ``eigenvalues``, ``q``,
               ``sigma2``, ``lambda_plus``
``head_variants`` (notebook 02) variant -> records of the same merges evaluated another way
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter, SymmetricalLogLocator

from .. import sweep
from ..plotting import color, matrix_name, savefig
from ..spectral import mp_pdf

#: how the SNR definitions are named in legends and titles
SNR_NAMES = {
    "mp": "ours (MP bulk fitted, shape-aware)",
    "report_text": "report's (variance sigma^2, no shape correction)",
    "max_median": "report's ResNet (lambda_max / lambda_median)",
}
#: the merges drawn as reference lines, and their line styles
REFERENCE_STYLE = {"linestyle": "--", "linewidth": 1.1}
#: below this the per-layer SNR axis is linear, above it logarithmic
SNR_LINTHRESH = 0.01


def panels(results: dict) -> list[tuple[str, str]]:
    """(task, metric) pairs in the order of ``results["tasks"]``: one row of panels each."""
    return [(task, metric) for task, spec in results["tasks"].items() for metric in spec["metrics"]]


def metric_label(results: dict, task: str, metric: str) -> str:
    n = results["tasks"][task].get("n_eval")
    return f"{task} {metric}" + (f" (n={n})" if n else "")


def _summary(records) -> pd.DataFrame:
    return sweep.summarize(records)


def _band(ax, x, mean, std, *, label, c, marker="o"):
    ax.plot(x, mean, marker=marker, markersize=3, color=c, label=label, linewidth=1.4)
    if np.isfinite(std).any():
        ax.fill_between(x, mean - std, mean + std, color=c, alpha=0.18, linewidth=0)


def _reference_lines(ax, results: dict, summary: pd.DataFrame, task: str, metric: str) -> None:
    """Horizontal lines for the reference merges, each expert (and the base) alone, and, for
    accuracy, the score of always answering the majority class."""
    sel = summary[(summary.task == task) & (summary.metric == metric)]
    majority = results["tasks"][task].get("majority")
    if metric == "accuracy" and majority is not None:
        ax.axhline(majority, color=color("base"), linewidth=2.5, alpha=0.6, label="majority class")
    refs = sel[(sel.model == "merged") & sel.top.isna() & sel.threshold.isna()]
    for _, row in refs.iterrows():
        ax.axhline(row["mean"], color=color(row["method"]), label=row["method"], **REFERENCE_STYLE)
    for _, row in sel[sel.model != "merged"].iterrows():
        if row["method"] == "expert":  # the task's own expert, against the other expert(s)
            own = row["model"] == task
            style = dict(
                linestyle="-." if own else ":", linewidth=1.0, label="own expert alone" if own else "other expert alone"
            )
        else:
            style = dict(linestyle=":", linewidth=1.4, label=f"{row['model']} alone")
        ax.axhline(row["mean"], color=color(row["method"]), **style)


#: two lines closer than this (in the metric's units) at every point are drawn on top of each other
SAME = 1e-3


def _line_values(line) -> np.ndarray:
    return np.asarray(line.get_ydata(), dtype=float)


def _mark_coincident(axes) -> None:
    """Say in the legend which lines hide under others. A curve equal to an earlier curve at every
    point of every panel (snr_low_a and snr_max pick the same layers for two experts) is drawn with
    hollow markers and labelled "= <the other>"; a horizontal reference line at the height of an
    earlier one in every panel (task arithmetic at chance, on the majority-class line) is labelled
    so too. Lines whose label starts with "_" are ignored."""
    panels = [ax for ax in np.ravel(axes) if ax.get_visible()]
    labels = list(
        dict.fromkeys(
            line.get_label() for ax in panels for line in ax.get_lines() if not line.get_label().startswith("_")
        )
    )

    def lines_of(ax):
        return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}

    same = {}
    for i, late in enumerate(labels):
        for early in labels[:i]:
            hits = []
            for ax in panels:
                mine = lines_of(ax)
                if late in mine and early in mine:
                    a, b = _line_values(mine[late]), _line_values(mine[early])
                    flat_a, flat_b = np.ptp(a) == 0, np.ptp(b) == 0
                    if a.shape == b.shape and np.allclose(a, b, atol=SAME, rtol=0):
                        hits.append(True)
                    elif flat_a and flat_b and abs(a[0] - b[0]) <= SAME:
                        hits.append(True)
                    else:
                        hits.append(False)
            if hits and all(hits):
                same[late] = early
                break
    for ax in panels:
        for label, line in lines_of(ax).items():
            if label in same:
                line.set_label(f"{label} (= {same[label]}, drawn on it)")
                line.set_linestyle((0, (4, 3)))  # dashed, so the line it covers shows through the gaps
                line.set_zorder(3)
                if line.get_marker() not in (None, "None", "", " "):
                    line.set_markerfacecolor("none")
                    line.set_markersize(7)


def _legend(fig, axes) -> None:
    """One legend for the figure, each label once, outside the panels."""
    seen = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(seen.values(), seen.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5))


def draw_top_sweep(results: dict, *, smoke: bool = False) -> list[Path]:
    """Metric vs the fraction of layers counted as high-SNR, one line (mean +- std over seeds)
    per strategy; one column per SNR definition, so the shape bias shows as the difference
    between the columns; reference merges and experts alone as horizontal lines."""
    summary = _summary(results["records"])
    swept = summary[summary.top.notna()]
    snr_methods = [m for m in results["config"]["snr_methods"] if m in set(swept.snr_method)]
    rows = panels(results)
    # panels of a row share their y axis, so the two SNR definitions compare at a glance
    fig, axes = plt.subplots(
        len(rows),
        len(snr_methods),
        figsize=(5.2 * len(snr_methods), 2.9 * len(rows)),
        squeeze=False,
        sharex=True,
        sharey="row",
    )
    for (task, metric), axrow in zip(rows, axes):
        for snr_method, ax in zip(snr_methods, axrow):
            sel = swept[(swept.task == task) & (swept.metric == metric) & (swept.snr_method == snr_method)]
            for method, g in sel.groupby("method", sort=False):
                g = g.sort_values("top")
                _band(
                    ax, 100 * g.top.to_numpy(), g["mean"].to_numpy(), g["std"].to_numpy(), label=method, c=color(method)
                )
            _reference_lines(ax, results, summary, task, metric)
            ax.set_title(f"{task}: SNR {SNR_NAMES.get(snr_method, snr_method)}", fontsize=9)
            ax.set_ylabel(metric_label(results, task, metric))
    for ax in axes[-1]:
        ax.set_xlabel("top: % of layers counted as high-SNR")
    _mark_coincident(axes)
    _legend(fig, axes)
    return savefig(fig, f"{results['notebook']}_top_sweep", smoke=smoke)


def draw_threshold_sweep(results: dict, *, smoke: bool = False) -> list[Path]:
    """Metric vs an absolute SNR threshold (the report's ResNet experiment: a layer is high-SNR
    when its SNR exceeds the threshold), one line per strategy."""
    summary = _summary(results["records"])
    swept = summary[summary.threshold.notna()]
    rows = panels(results)
    fig, axes = plt.subplots(len(rows), 1, figsize=(6.0, 2.9 * len(rows)), squeeze=False, sharex=True)
    for (task, metric), (ax,) in zip(rows, axes):
        sel = swept[(swept.task == task) & (swept.metric == metric)]
        for method, g in sel.groupby("method", sort=False):
            g = g.sort_values("threshold")
            _band(ax, g.threshold.to_numpy(), g["mean"].to_numpy(), g["std"].to_numpy(), label=method, c=color(method))
        _reference_lines(ax, results, summary, task, metric)
        snr_method = ", ".join(sorted(set(sel.snr_method.dropna())))
        ax.set_title(f"{task}: absolute threshold on SNR {snr_method}", fontsize=9)
        ax.set_ylabel(metric_label(results, task, metric))
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(sel.threshold)), [f"{t:g}" for t in sorted(set(sel.threshold))])
        ax.xaxis.set_minor_formatter(NullFormatter())  # only the thresholds themselves are labelled
    axes[-1][0].set_xlabel("SNR threshold (layers above it are high-SNR)")
    _mark_coincident(axes)
    _legend(fig, axes)
    return savefig(fig, f"{results['notebook']}_threshold_sweep", smoke=smoke)


def draw_layer_snr(results: dict, *, smoke: bool = False) -> list[Path]:
    """Top row: every layer's SNR for each expert, one panel per SNR definition. Bottom row: the
    same SNR against the layer's aspect ratio min(rows, cols) / max(rows, cols): a definition
    without shape correction ranks layers by their shape rather than by what they learned."""
    layers = pd.DataFrame(results["layers"])
    # our SNR is infinite for a matrix with no noise bulk at all: drawn at 10x the largest finite one
    layers["infinite"] = ~np.isfinite(layers.snr)
    finite_max = layers.snr.where(~layers.infinite).groupby(layers.snr_method).transform("max")
    layers["snr"] = layers.snr.clip(upper=10 * finite_max)
    layers["aspect"] = layers[["rows", "cols"]].min(axis=1) / layers[["rows", "cols"]].max(axis=1)
    snr_methods = [m for m in results["config"]["snr_methods"] if m in set(layers.snr_method)]
    # one seed is enough to show the profile; the first is drawn
    layers = layers[layers.seed == layers.seed.min()] if "seed" in layers else layers
    n_keys = layers.key.nunique()
    fig, axes = plt.subplots(
        2, len(snr_methods), figsize=(max(6.5, 0.17 * n_keys) * len(snr_methods), 8.0), squeeze=False
    )
    experts = list(dict.fromkeys(layers.expert))
    markers = ("o", "s", "^", "D")
    for j, snr_method in enumerate(snr_methods):
        sel = layers[layers.snr_method == snr_method]
        for i, expert in enumerate(experts):
            g = sel[sel.expert == expert]
            c = plt.get_cmap("tab10")(i)
            axes[0][j].plot(
                np.arange(len(g)),
                g.snr.to_numpy(),
                marker=markers[i % 4],
                markersize=3,
                linewidth=0.8,
                color=c,
                label=f"{expert} expert",
            )
            axes[1][j].scatter(
                g.aspect, g.snr, s=14, marker=markers[i % 4], color=c, alpha=0.7, label=f"{expert} expert"
            )
        names = [matrix_name(k) for k in dict.fromkeys(sel.key)]
        axes[0][j].set_xticks(np.arange(len(names)), names, rotation=90, fontsize=8)
        axes[0][j].set_xlim(-0.7, len(names) - 0.3)
        n_inf = int(sel.infinite.sum())
        axes[0][j].set_title(
            f"SNR {SNR_NAMES.get(snr_method, snr_method)}, per weight matrix"
            + (f"\n{n_inf} infinite (no noise bulk), drawn at the top" if n_inf else ""),
            fontsize=9,
        )
        axes[1][j].set_xlabel("aspect ratio min(rows, cols) / max(rows, cols)")
        for ax in axes[:, j]:
            ax.set_ylabel("SNR (symmetric log scale)")
            # SNRs span zero (pure noise) to ~1e10 (the report's SNR of a very flat matrix)
            ax.set_yscale("symlog", linthresh=SNR_LINTHRESH)
            ax.set_ylim(bottom=0)  # no SNR is negative
            ax.yaxis.set_major_locator(SymmetricalLogLocator(linthresh=SNR_LINTHRESH, base=10, subs=[1.0]))
            ax.yaxis.get_major_locator().numticks = 8
    _legend(fig, axes)
    return savefig(fig, f"{results['notebook']}_layer_snr", smoke=smoke)


def draw_esd(results: dict, *, smoke: bool = False) -> list[Path]:
    """The eigenvalue histogram of a few telling layers of each expert (one row per expert) with
    the fitted Marchenko-Pastur density: eigenvalues beyond the detection threshold are the
    "signal" our SNR counts."""
    items = pd.DataFrame(results["esd"])
    experts = list(dict.fromkeys(items.expert))
    ncols = int(items.groupby("expert", sort=False).size().max())
    fig, axes = plt.subplots(len(experts), ncols, figsize=(4.6 * ncols, 3.6 * len(experts)), squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    for i, expert in enumerate(experts):
        for ax, (_, item) in zip(axes[i], items[items.expert == expert].iterrows()):
            ax.set_visible(True)
            _esd_panel(ax, item)
        axes[i][0].set_ylabel("density")
    _legend(fig, axes)
    return savefig(fig, f"{results['notebook']}_esd", smoke=smoke)


def _esd_panel(ax, item) -> None:
    """Histogram of log10(eigenvalue): spectra span several decades once a layer has learned
    something, and on a log axis the bulk and the spikes are both visible. The MP density is
    transformed accordingly: the density of log10(x) is p(x) * x * ln(10)."""
    eig = np.asarray(item["eigenvalues"], dtype=float)
    positive = eig[eig > 0]
    edge, threshold = float(item["lambda_plus"]), float(item["threshold"])
    logs = np.log10(positive)
    ax.hist(logs, bins=50, density=True, color=color("noise"), alpha=0.9, label="eigenvalues (log10)")
    lo = max(float(item["sigma2"]) * (1 - np.sqrt(item["q"])) ** 2, positive.min() if len(positive) else edge / 10)
    x = np.geomspace(lo, edge, 400)
    # the histogram is normalised over all positive eigenvalues; the MP law describes the bulk only
    bulk_share = float(np.mean(positive <= threshold)) if len(positive) else 1.0
    ax.plot(
        np.log10(x),
        mp_pdf(x, item["q"], item["sigma2"]) * x * np.log(10) * bulk_share,
        color=color("mp"),
        label="fitted MP density",
    )
    ax.axvline(np.log10(edge), color=color("mp"), linestyle=":", linewidth=1, label=r"bulk edge $\lambda_+$")
    ax.axvline(np.log10(threshold), color=color("signal"), linestyle="--", linewidth=1, label="detection threshold")
    spikes = logs[positive > threshold]
    ax.plot(spikes, np.zeros(len(spikes)), "|", color=color("signal"), markersize=12, label="signal eigenvalues")
    zeros = len(eig) - len(positive)
    note = f"; {zeros} zero eigenvalues not shown" if zeros else ""
    ax.set_title(
        f"{item['expert']}: {matrix_name(item['key'])} {tuple(item['shape'])}\n{item['why']}\n"
        f"{int(item['n_signal'])} of {len(eig)} eigenvalues are signal{note}",
        fontsize=9,
    )
    ax.set_xlabel("log10 eigenvalue of the Gram matrix / N")


def _run_name(run: str) -> str:
    """``snr_winner(snr_method=report_text, top=0.25)`` -> ``snr_winner\nreport_text\ntop 25%``: a tick
    label, one line each (side by side, the SNR name and the fraction are wider than a group of bars)."""
    method, _, args = run.partition("(")
    parts = dict(a.split("=", 1) for a in args.rstrip(")").split(", ") if "=" in a)
    detail = [x for x in (parts.get("snr_method"), f"top {float(parts['top']):.0%}" if "top" in parts else None) if x]
    return "\n".join([method, *detail])


def draw_head_variants(results: dict, *, smoke: bool = False) -> list[Path]:
    """The same merges evaluated in different ways (notebook 02: each task's own head over the
    merged body, against the report's re-initialised two-class head on collapsed labels). One
    panel per variant, one group of bars per merge, one bar per (task, metric); dotted lines
    mark the score of always predicting the majority class where the results give it."""
    variants: dict = results["head_variants"]
    summaries = {}
    for variant, spec in variants.items():
        s = _summary(spec["records"])
        s["bar"] = s.task + " " + s.metric
        summaries[variant] = s
    # the same merge sits at the same place, and a (task, metric) keeps its colour, in every panel
    runs = sorted(set().union(*(s.run for s in summaries.values())))
    bar_colors = {
        bar: plt.get_cmap("tab10")(i)
        for i, bar in enumerate(dict.fromkeys(b for s in summaries.values() for b in s.bar))
    }
    fig, axes = plt.subplots(1, len(variants), figsize=(4.8 * len(variants), 3.8), squeeze=False, sharey=True)
    for (variant, spec), ax in zip(variants.items(), axes[0]):
        s = summaries[variant]
        bars = list(dict.fromkeys(s.bar))
        width = 0.8 / len(bars)
        for i, bar in enumerate(bars):
            g = s[s.bar == bar].set_index("run").reindex(runs)
            ax.bar(
                np.arange(len(runs)) + i * width,
                g["mean"],
                width,
                yerr=g["std"].fillna(0),
                label=bar,
                color=bar_colors[bar],
                alpha=0.85,
            )
        for label, value in spec.get("majority", {}).items():
            ax.axhline(value, color="black", linestyle=":", linewidth=1, label=f"majority class: {label}")
        ax.set_xticks(np.arange(len(runs)) + 0.4 - width / 2, [_run_name(r) for r in runs], fontsize=8)
        ax.set_title(spec.get("title", variant), fontsize=9)
    axes[0][0].set_ylabel("score")
    _legend(fig, axes)
    return savefig(fig, f"{results['notebook']}_head_variants", smoke=smoke)


def draw_common(results: dict, *, smoke: bool = False, extra: Sequence = ()) -> list[Path]:
    """The figures every notebook of the series draws, then ``extra`` drawing functions."""
    out = []
    for fn in (draw_top_sweep, draw_layer_snr, draw_esd, *extra):
        out += fn(results, smoke=smoke)
    return out
