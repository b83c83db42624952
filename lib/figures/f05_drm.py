"""Figures of notebook 05: DRM's claims on our expert pools (paper 004), drawn from
``results/05_drm.json``.

Beyond what notebook 04's results hold (``pools``, ``config``, ``records``; see
:mod:`lib.figures.f04_star`): ``config`` has ``default_density`` and ``density_methods``, and
``drm_rows`` maps a pool to :func:`lib.pool.drm_profile` of one matrix (row norms of the split
singular vectors and the fraction of each row pruning keeps, with and without renormalisation).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .. import pool, stats
from ..plotting import color, legend_below, savefig
from .f04_star import band, draw_methods, pool_axes, short_key

NOTEBOOK = "05_drm"


def draw_renorm(results: dict, *, smoke: bool = False) -> list[Path]:
    """The renormalisation ablation (the paper's Table 3) against the number of merged tasks:
    DRM-H and DRM-V at the default density, solid with renormalisation, dashed without."""
    s = pool.subset_scores(results["records"])
    density = results["config"]["default_density"]
    series = [(m, renorm) for m in ("drm_h", "drm_v") for renorm in (True, False)]
    # the per-task pruning ablation (Table 8) shares renorm and density with these runs: only the
    # joint ones are drawn (records from before the prune hyperparameter have no hp_prune column)
    joint = {"prune": "joint"} if "hp_prune" in s.columns else {}
    # the four series lie close together: each is drawn a little to the side of the size it is at,
    # as mean +- std over seeds, filled with renormalisation and hollow without
    offsets = dict(zip(series, np.linspace(-0.15, 0.15, len(series))))
    fig, axes = pool_axes(results)
    for name, ax in axes.items():
        for method, renorm in series:
            r = pool.select(s[s.pool == name], method, renorm=renorm, density=density, **joint)
            if r.empty:
                continue
            g = stats.over_seeds(r, ["size"], sort=True)
            c = color(method)
            ax.errorbar(
                g["size"] + offsets[(method, renorm)],
                g["mean"],
                yerr=g["std"].fillna(0),
                color=c,
                marker="o" if method == "drm_h" else "s",
                markersize=6,
                capsize=3,
                markerfacecolor=c if renorm else "white",
                linestyle="-" if renorm else "--",
                linewidth=1.2,
                label=f"{'DRM-H' if method == 'drm_h' else 'DRM-V'}, {'renorm' if renorm else 'no renorm'}",
            )
        sizes = sorted(s[s.pool == name]["size"].unique())
        ax.set_xticks(sizes)
        ax.set_xlim(min(sizes) - 0.6, max(sizes) + 0.6)
        ax.set_xlabel("number of merged tasks")
        ax.set_ylabel("normalized accuracy")
        legend_below(ax, ncol=2)
    return savefig(fig, f"{NOTEBOOK}_renorm", smoke=smoke)


def draw_density(results: dict, *, smoke: bool = False) -> list[Path]:
    """Normalized accuracy against the fraction of entries kept, one line per method of the density
    sweep and subset size (marker), mean over the subsets per seed, then mean +- std over seeds.
    Only the subset sizes of ``config["density_sizes"]`` (kind -> sizes) are drawn where it is
    given: the default density is also merged at every other size, and those have no curve."""
    s = pool.subset_scores(results["records"])
    swept = results["config"].get("density_sizes")
    markers = "os^Dv"
    fig, axes = pool_axes(results)
    for name, ax in axes.items():
        p = s[s.pool == name]
        if swept is not None:
            p = p[p["size"].isin(swept[results["pools"][name]["kind"]])]
        sizes = sorted(p["size"].unique())
        what = "pairs" if sizes == [2] else "subsets of " + ", ".join(map(str, sizes))
        ax.set_title(f"{name}: {what} (pool of {len(results['pools'][name]['tasks'])} experts)", fontsize=10)
        for spec in results["config"]["density_methods"]:
            r = pool.select(p, spec["method"], **spec.get("fixed", {}))
            for i, (size, g) in enumerate(stats.over_seeds(r, ["size", "hp_density"], sort=True).groupby("size")):
                band(
                    ax,
                    g.hp_density,
                    g["mean"],
                    g["std"],
                    c=color(spec["method"]),
                    marker=markers[i % len(markers)],
                    linestyle=spec.get("linestyle", "-"),
                    label=f"{spec['name']}, {size} tasks",
                )
        default = results["config"]["default_density"]
        ax.axvline(default, color="#999999", linewidth=0.8, linestyle=":", label=f"default density {default:g}")
        ax.set_xscale("log")
        densities = sorted(p.hp_density.dropna().unique()) if "hp_density" in p else []
        ax.set_xticks(densities, [f"{d:g}" for d in densities])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("density (fraction of entries kept, log scale)")
        ax.set_ylabel("normalized accuracy")
        legend_below(ax, ncol=1)
    return savefig(fig, f"{NOTEBOOK}_density", smoke=smoke)


def _few_log_ticks(ax) -> None:
    """A log y axis spanning about a decade, labelled at 1, 2 and 5 times powers of ten as plain
    numbers (matplotlib would label every minor tick in scientific notation)."""
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=8))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def draw_rows(results: dict, *, smoke: bool = False) -> list[Path]:
    """The paper's argument (section 6.1, Figure 3) on one matrix per pool. Top: each task's row
    norm |v_t,i| of the split singular vectors before renormalisation, against the component
    index (grey: the joint singular value). Middle and bottom: the fraction of each row's entries
    pruning keeps, with and without renormalisation (dotted: the density)."""
    entries = results["drm_rows"]
    fig, axes = plt.subplots(3, len(entries), figsize=(5.6 * len(entries), 8.5), squeeze=False, sharex="col")
    for col, (name, prof) in enumerate(entries.items()):
        top, mid, bottom = axes[:, col]
        i = np.arange(1, len(prof["singular_values"]) + 1)
        for t, task in enumerate(prof["tasks"]):
            c = plt.get_cmap("tab10")(t % 10)
            top.plot(i, prof["row_norms"][t], color=c, linewidth=1, label=task)
            mid.plot(i, prof["kept_renorm"][t], color=c, linewidth=1)
            bottom.plot(i, prof["kept_plain"][t], color=c, linewidth=1)
        sv = top.twinx()
        sv.plot(i, prof["singular_values"], color="#999999", linewidth=1.5, linestyle="--")
        sv.set_yscale("log")
        _few_log_ticks(sv)
        sv.set_ylabel("joint singular value (dashed)", color="#777777")
        sv.grid(False)
        top.set_yscale("log")
        _few_log_ticks(top)
        top.set_ylabel("|v_t,i| before renorm")
        top.set_title(f"{name}:\n{short_key(prof['key'])} (DRM-{prof['variant'].upper()})", fontsize=10)
        for ax, label in ((mid, "with renorm"), (bottom, "no renorm")):
            ax.axhline(prof["density"], color="#333333", linewidth=0.8, linestyle=":")
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel(f"share of row kept ({label})")
        bottom.set_xlabel("component i (by joint singular value)")
        legend_below(
            bottom, ncol=3, handles=top.get_legend_handles_labels()[0], labels=top.get_legend_handles_labels()[1]
        )
    return savefig(fig, f"{NOTEBOOK}_rows", smoke=smoke)


def draw(results: dict, *, smoke: bool = False) -> list[Path]:
    return (
        draw_methods(results, name=f"{NOTEBOOK}_methods", smoke=smoke)
        + draw_renorm(results, smoke=smoke)
        + draw_density(results, smoke=smoke)
        + draw_rows(results, smoke=smoke)
    )
