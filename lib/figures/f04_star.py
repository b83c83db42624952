"""Figures of notebook 04: STAR's claims on our expert pools (paper 002), drawn from
``results/04_star.json``. :func:`draw_methods` (normalized accuracy against the number of merged
tasks, one line per method) is shared with notebook 05.

What the results dict holds (written by the notebook through :mod:`lib.pool`):

``pools``       pool name -> ``kind``, ``variant``, ``tasks``
``config``      ``etas``, ``default_eta``, ``compare`` (``[{"run": label, "name": legend}]``), ...
``records``     :mod:`lib.pool` records of every seed (experts alone, base, merges)
``star_ranks``  pool -> ``{"seed", "etas", "rows"}`` with rows from :func:`lib.pool.star_ranks`
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm

from .. import pool, stats
from ..plotting import color, legend_below, savefig

NOTEBOOK = "04_star"
#: where a sweep's band (one standard deviation over seeds) is drawn
BAND_ALPHA = 0.15


def pool_axes(results: dict, *, height: float = 3.4, width: float = 4.2, **kwargs):
    """One panel per pool, side by side, titled with the pool and its tasks."""
    names = list(results["pools"])
    fig, axes = plt.subplots(1, len(names), figsize=(width * len(names), height), squeeze=False, **kwargs)
    for ax, name in zip(axes[0], names):
        ax.set_title(f"{name}: {len(results['pools'][name]['tasks'])} experts", fontsize=10)
    return fig, dict(zip(names, axes[0]))


def size_colors(sizes) -> dict[int, tuple]:
    sizes = sorted(set(int(s) for s in sizes))
    cmap = plt.get_cmap("viridis")
    return {s: cmap(i / max(1, len(sizes) - 1) * 0.9) for i, s in enumerate(sizes)}


def band(ax, x, mean, std, *, c, label=None, linestyle="-", marker="o"):
    x, mean, std = np.asarray(x, float), np.asarray(mean, float), np.nan_to_num(np.asarray(std, float))
    ax.plot(x, mean, color=c, linestyle=linestyle, marker=marker, markersize=3, linewidth=1.4, label=label)
    ax.fill_between(x, mean - std, mean + std, color=c, alpha=BAND_ALPHA, linewidth=0)


def draw_eta_sweep(results: dict, *, smoke: bool = False, notebook: str = NOTEBOOK) -> list[Path]:
    """Normalized accuracy against eta, one line per number of merged tasks (solid: with
    rescaling, dashed: without); ``notebook`` names the file (07 draws its LoRA pools with it)."""
    s = pool.select(pool.subset_scores(results["records"]), "star")
    fig, axes = pool_axes(results)
    colors = size_colors(s["size"])
    for name, ax in axes.items():
        p = s[s.pool == name]
        for (size, rescale), g in stats.over_seeds(p, ["size", "hp_rescale", "hp_eta"], sort=True).groupby(
            ["size", "hp_rescale"]
        ):
            band(
                ax,
                g.hp_eta,
                g["mean"],
                g["std"],
                c=colors[size],
                linestyle="-" if rescale else "--",
                label=f"{size} tasks" if rescale else None,
            )
        ax.axvline(results["config"]["default_eta"], color="#999999", linewidth=0.8, linestyle=":")
        ax.set_xlabel("eta (% of the nuclear norm kept; dotted: the default)")
        ax.set_ylabel("normalized accuracy")
        legend_below(ax, ncol=2, title="merged (dashed: no rescale)")
    return savefig(fig, f"{notebook}_eta_sweep", smoke=smoke)


def draw_best_eta(results: dict, *, smoke: bool = False) -> list[Path]:
    """The best eta of each merged subset against the number of merged tasks (dots: subsets and
    seeds; line: mean +- std), the analogue of the paper's Figure 5."""
    best = pool.best_setting(results["records"], "star", "eta", rescale=True)
    fig, axes = pool_axes(results)
    rng = np.random.default_rng(0)
    for name, ax in axes.items():
        b = best[best.pool == name]
        ax.scatter(
            b["size"] + rng.uniform(-0.12, 0.12, len(b)), b.best, s=12, color=color("star"), alpha=0.4, linewidth=0
        )
        g = b.groupby("size")["best"].agg(["mean", "std"]).reset_index()
        ax.errorbar(g["size"], g["mean"], yerr=g["std"].fillna(0), color=color("star"), marker="o", capsize=3)
        t = pool.trend(b, "size", "best")
        rho = f"{t['spearman']:+.2f}" if np.isfinite(t["spearman"]) else "n/a (one best eta)"
        trend = (
            f"slope {t['slope']:+.1f} eta per task, Spearman {rho}"
            if np.isfinite(t["slope"])
            else "one subset size: no trend"
        )
        ax.set_title(f"{ax.get_title()}\n{trend}", fontsize=9)
        ax.set_xticks(sorted(b["size"].unique()))
        ax.set_xlim(b["size"].min() - 0.5, b["size"].max() + 0.5)
        ax.set_xlabel("number of merged tasks")
        ax.set_ylabel("best eta")
    return savefig(fig, f"{NOTEBOOK}_best_eta", smoke=smoke)


def draw_rescale(results: dict, *, smoke: bool = False, notebook: str = NOTEBOOK) -> list[Path]:
    """The rescale ablation: normalized accuracy with minus without rescaling, in points, against
    eta, one line per number of merged tasks (above 0: rescaling helps); ``notebook`` names the file."""
    diff = pool.rescale_gain(results["records"]).rename("normalized").reset_index()
    fig, axes = pool_axes(results)
    colors = size_colors(diff["size"]) if len(diff) else {}
    for name, ax in axes.items():
        for size, g in stats.over_seeds(diff[diff.pool == name], ["size", "hp_eta"], sort=True).groupby("size"):
            band(ax, g.hp_eta, g["mean"], g["std"], c=colors[size], label=f"{size} tasks")
        ax.axhline(0, color="#333333", linewidth=0.8)
        ax.set_xlabel("eta")
        ax.set_ylabel("rescale - no rescale (normalized points)")
        legend_below(ax, ncol=2, title="merged")
    return savefig(fig, f"{notebook}_rescale", smoke=smoke)


def draw_methods(results: dict, *, name: str, smoke: bool = False) -> list[Path]:
    """Normalized accuracy against the number of merged tasks for the runs in
    ``results["config"]["compare"]`` and the base (mean over subsets per seed, then mean +- std
    over seeds; dots: single subsets), the analogue of STAR's Figure 4 and DRM's Figure 2."""
    s = pool.subset_scores(results["records"])
    compare = results["config"]["compare"] + [{"run": "base", "name": "base (pre-trained body)"}]
    fig, axes = pool_axes(results, sharey=False)
    for pool_name, ax in axes.items():
        p = s[s.pool == pool_name]
        drawn = set()  # methods with a line already: a second setting of one (lam=0.125, renorm=False) is dashed
        for spec in compare:
            r = p[p.run == spec["run"]]
            if r.empty:
                continue
            method = r.method.iloc[0]
            c = color(method)
            ax.scatter(r["size"], r.normalized, s=8, color=c, alpha=0.25, linewidth=0)
            g = stats.over_seeds(r, ["size"], sort=True)
            band(
                ax,
                g["size"],
                g["mean"],
                g["std"],
                c=c,
                label=spec["name"],
                linestyle=":" if spec["run"] == "base" else "--" if method in drawn else "-",
            )
            drawn.add(method)
        ax.axhline(1.0, color="#000000", linewidth=0.8, linestyle="-.")
        ax.set_xticks(sorted(p["size"].unique()))
        ax.set_xlabel("number of merged tasks")
        ax.set_ylabel("normalized accuracy (1 = every expert alone)")
    axes[list(axes)[-1]].legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return savefig(fig, name, smoke=smoke)


def short_key(key: str) -> str:
    """A weight's name without the parts every row shares: ``L3 attention.self.query``."""
    key = key.removeprefix("bert.").removesuffix(".weight").replace("encoder.layer.", "L")
    return key.replace("attention.self.", "attn.").replace("attention.output.dense", "attn.out")


def draw_ranks(results: dict, *, smoke: bool = False) -> list[Path]:
    """Per pool: the rank STAR keeps of every weight matrix of every expert at the default eta
    (numbers in the cells, the paper's Figure 3), and the median kept fraction of the task
    vector's rank against eta."""
    out = []
    eta = results["config"]["default_eta"]
    for pool_name, entry in results["star_ranks"].items():
        df = pd.DataFrame(entry["rows"])
        etas = entry["etas"]
        df["at_default"] = df.kept.map(lambda k: k[etas.index(eta)])
        grid = df.pivot_table(index="order", columns="expert", values="at_default", sort=False)
        experts = list(dict.fromkeys(df.expert))
        grid = grid[experts]
        labels = df.drop_duplicates("order").set_index("order").key.map(short_key).reindex(grid.index)
        fig, (ax, ax2) = plt.subplots(
            1,
            2,
            figsize=(5.0 + 1.1 * len(experts), 1.8 + 0.26 * len(grid)),
            gridspec_kw={"width_ratios": [len(experts) + 2, 4]},
        )
        values = grid.to_numpy(float)
        im = ax.imshow(np.maximum(values, 1), aspect="auto", cmap="magma_r", norm=LogNorm(1, max(2, values.max())))
        for (i, j), v in np.ndenumerate(values):
            ax.text(
                j,
                i,
                f"{int(v)}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if v > np.sqrt(max(2, values.max())) else "black",
            )
        ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(grid)), labels, fontsize=8)
        ax.grid(False)
        ax.set_title(f"{pool_name} (seed {entry['seed']}): rank kept at eta={eta}")
        fig.colorbar(im, ax=ax, fraction=0.04, label="kept rank")
        for expert in experts:
            e = df[df.expert == expert]
            frac = pool.kept_fraction(e.kept.tolist(), e.nonzero.to_numpy())
            ax2.plot(etas, np.median(frac, axis=0), marker="o", markersize=3, label=expert)
        ax2.set_xlabel("eta")
        ax2.set_ylabel("kept rank / rank of the task vector (median)")
        ax2.set_yscale("log")
        ax2.legend(loc="lower right")  # the curves rise from lower left to upper right
        out += savefig(fig, f"{NOTEBOOK}_ranks_{pool_name.replace('/', '_')}", smoke=smoke)
    return out


def draw(results: dict, *, smoke: bool = False) -> list[Path]:
    return (
        draw_eta_sweep(results, smoke=smoke)
        + draw_best_eta(results, smoke=smoke)
        + draw_rescale(results, smoke=smoke)
        + draw_methods(results, name=f"{NOTEBOOK}_methods", smoke=smoke)
        + draw_ranks(results, smoke=smoke)
    )
