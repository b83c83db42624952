"""Figures of notebook 06 (predicting mergeability), drawn from ``results/06_mergeability.json``.

What the results dict holds (written by the notebook through :mod:`lib.mergeability`):

``properties``  one row per expert pair: ``pair`` and every pairwise property
``layers``      one row per (pair, tensor): ``pair``, ``key``, ``cosine``, ``subspace_overlap``
``fits``        merge method -> the leave-one-pair-out Lasso (:func:`lib.mergeability.fit_methods`):
                ``features``, ``pairs``, ``measured``, ``predicted``, ``coefficients``,
                ``fold_coefficients``, ``r2``, ``r2_interval``, ``permutation_p``, ``spearman``,
                ``alpha``, ``univariate``
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from ..mergeability import p_text
from ..plotting import color, matrix_name, savefig

NOTEBOOK = "06_mergeability"
#: how many of the worst-predicted pairs the predicted-against-measured panels name
LABELLED = 3


def fit_title(method: str, fit: dict) -> str:
    low, high = fit["r2_interval"]
    level = fit.get("interval_level", 0.9)
    p = p_text(fit)
    return (
        f"{method}: LOO R² = {fit['r2']:.2f}, {level:.0%} interval [{low:.2f}, {high:.2f}]\n"
        f"permutation p {'' if p.startswith('≤') else '= '}{p}, {len(fit['pairs'])} pairs"
    )


def method_panels(n: int, width: float, height: float, *, extra_width: float = 0.0, per_row: int = 3, **kw):
    """A figure of ``n`` per-method panels of ``width`` x ``height`` inches, three to a row (six
    side by side are too small to read): the figure, its ``(rows, cols)`` axes and the ``n`` used
    axes in order; the rest of the last row is hidden."""
    cols = max(1, min(per_row, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + extra_width, height * rows), squeeze=False, **kw)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes, list(axes.flat[:n])


def draw_coefficients(results: dict, *, smoke: bool = False) -> list[Path]:
    """Per merge method, the Lasso coefficient of every property on all pairs (bars, in units of
    normalized accuracy per standard deviation of the property) and its value in each
    leave-one-pair-out fit (dots): a property whose dots scatter around zero is not a finding."""
    fits = results["fits"]
    features = next(iter(fits.values()))["features"]
    fig, axes, used = method_panels(len(fits), 4.2, 0.32 * len(features) + 1.8, extra_width=1.8, sharey=True)
    y = np.arange(len(features))
    for (method, fit), ax in zip(fits.items(), used):
        coef = np.asarray(fit["coefficients"])
        folds = np.asarray(fit["fold_coefficients"])
        ax.barh(y, coef, color=color(method), alpha=0.75, label="all pairs")
        jitter = np.linspace(-0.25, 0.25, len(folds)) if len(folds) > 1 else np.zeros(1)
        for j, fold in zip(jitter, folds):
            ax.plot(fold, y + j, ".", color="black", markersize=2.5, alpha=0.6)
        selected = (folds != 0).mean(axis=0)
        for yi, share in zip(y, selected):
            ax.annotate(
                f"{100 * share:.0f}%",
                (1.01, yi),
                xycoords=("axes fraction", "data"),
                fontsize=8,
                ha="left",
                va="center",
                color="#555555",
                annotation_clip=False,
            )
        ax.axvline(0, color="black", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(4, symmetric=True))
        ax.set_title(fit_title(method, fit), fontsize=9)
        ax.set_xlabel("coefficient per SD of the property")
    axes[0][0].set_yticks(y, features)  # shared by every panel
    axes[0][0].invert_yaxis()
    fig.suptitle(
        "Lasso coefficients (bars: all pairs; dots: each leave-one-pair-out fit; %: share of fits selecting it)",
        fontsize=9,
    )
    return savefig(fig, f"{NOTEBOOK}_coefficients", smoke=smoke)


def draw_predicted(results: dict, *, smoke: bool = False) -> list[Path]:
    """Measured normalized accuracy of every pair against the prediction of the model fitted
    without that pair; the diagonal is a perfect prediction, the dotted line the mean of the
    measurements (the prediction that needs no property at all)."""
    fits = results["fits"]
    fig, axes, used = method_panels(len(fits), 4.3, 4.3)
    for (method, fit), ax in zip(fits.items(), used):
        measured, predicted = np.asarray(fit["measured"]), np.asarray(fit["predicted"])
        ax.scatter(measured, predicted, color=color(method), s=18, zorder=3)
        # 21 names on one panel cannot be read: the pairs predicted worst get a marker each, named below the panel
        worst = np.argsort(-np.abs(measured - predicted))[:LABELLED]
        for marker, i in zip("^sD", worst):
            ax.scatter(
                measured[i],
                predicted[i],
                s=70,
                marker=marker,
                facecolor="none",
                edgecolor="black",
                zorder=4,
                label=f"{fit['pairs'][i]} (off by {predicted[i] - measured[i]:+.2f})",
            )
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), borderaxespad=0.0, title="worst predicted")
        lo = min(measured.min(), predicted.min())
        hi = max(measured.max(), predicted.max())
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", linewidth=0.8)
        ax.axhline(measured.mean(), color=color("base"), linestyle=":")
        ax.set_title(fit_title(method, fit), fontsize=9)
        ax.set_xlabel("measured normalized accuracy")
        ax.set_aspect("equal", adjustable="datalim")
    for row in axes:
        row[0].set_ylabel("predicted (pair left out)")
    fig.suptitle(
        "each pair predicted by the model fitted without it; solid: perfect prediction, dotted: the mean of "
        "the pairs (no property used)",
        fontsize=10,
    )
    return savefig(fig, f"{NOTEBOOK}_predicted", smoke=smoke)


def draw_layers(results: dict, *, smoke: bool = False) -> list[Path]:
    """Per pair (rows) and weight matrix (columns, in the model's order): the cosine of the two
    task vectors on that matrix and the overlap of their top singular subspaces. Where along the
    depth do the two fine-tunings write in the same directions?"""
    df = pd.DataFrame(results["layers"])
    df = df[df.subspace_overlap.notna()]  # matrices only: 1-D tensors have no subspace
    keys = list(dict.fromkeys(df.key))
    pairs = list(dict.fromkeys(df.pair))
    fig, axes = plt.subplots(
        2, 1, figsize=(max(7.0, 0.17 * len(keys) + 3.5), 2 * (0.17 * len(pairs) + 2.4)), squeeze=False
    )
    panels = (
        ("cosine", "task-vector cosine", "cosine of the two task vectors, per weight matrix"),
        ("subspace_overlap", "top-k subspace overlap", "overlap of their top-k singular subspaces, per weight matrix"),
    )
    for (column, label, title), ax in zip(panels, axes[:, 0]):
        grid = df.pivot_table(index="pair", columns="key", values=column, sort=False).reindex(index=pairs, columns=keys)
        values = grid.to_numpy(float)
        low, high = np.nanmin(values), np.nanmax(values)
        if low >= 0:  # the colour scale spans the data, from 0: a -1..1 scale would leave 0..0.6 in two shades
            cmap, limits = "viridis", (0.0, float(np.ceil(10 * high) / 10) or 1.0)
        else:
            bound = float(np.ceil(10 * max(abs(low), abs(high))) / 10)
            cmap, limits = "RdBu_r", (-bound, bound)
        image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=limits[0], vmax=limits[1], interpolation="nearest")
        ax.set_yticks(range(len(pairs)), pairs, fontsize=8)
        ax.set_xticks(range(len(keys)), [matrix_name(k) for k in keys], rotation=90, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(False)
        fig.colorbar(image, ax=ax, label=label, fraction=0.025, pad=0.01)
    return savefig(fig, f"{NOTEBOOK}_layers", smoke=smoke)


def draw_univariate(results: dict, *, smoke: bool = False) -> list[Path]:
    """Spearman correlation of each property alone with the normalized accuracy, per method: the
    plain reading to hold the sparse model against."""
    fits = results["fits"]
    features = next(iter(fits.values()))["features"]
    grid = np.array([[fit["univariate"][f] for f in features] for fit in fits.values()]).T
    fig, ax = plt.subplots(figsize=(1.2 * len(fits) + 3.4, 0.34 * len(features) + 1.6))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, "–" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(fits)), list(fits), rotation=30, ha="right")
    ax.set_yticks(range(len(features)), features)
    ax.grid(False)
    fig.colorbar(image, ax=ax, label="Spearman ρ with normalized accuracy")
    ax.set_title(f"each property alone ({len(next(iter(fits.values()))['pairs'])} pairs)", fontsize=9)
    return savefig(fig, f"{NOTEBOOK}_univariate", smoke=smoke)


def draw(results: dict, *, smoke: bool = False) -> list[Path]:
    return [
        p for fn in (draw_coefficients, draw_predicted, draw_univariate, draw_layers) for p in fn(results, smoke=smoke)
    ]
