"""Figures of notebook 07: STAR's and DRM's claims on LoRA experts (issue 17), drawn from
``results/07_lora.json``, beside the full fine-tunes of notebook 04 where the results hold them.

What the results dict holds (written by the notebook):

``pools``       ``{"text-lora": {"kind", "variant", "tasks"}}``
``config``      ``etas``, ``default_eta``, ``compare`` (``[{"run": label, "name": legend}]``), ...
``records``     :mod:`lib.pool` records of every seed (experts alone, base, merges)
``star_ranks``  pool -> ``{"seed", "etas", "rows"}`` (:func:`lib.pool.star_ranks`)
``low_rank``    setting (``"LoRA"``, ``"full fine-tune"``) -> rows of
                :func:`lib.lora_pool.task_vector_ranks`
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..plotting import savefig
from . import f04_star
from .f04_star import draw_methods, short_key

NOTEBOOK = "07_lora"


def draw_eta_sweep(results: dict, *, smoke: bool = False) -> list[Path]:
    """Normalized accuracy of STAR against eta, one line per number of merged LoRA experts
    (solid: rescaled, dashed: not), mean +- std over seeds: notebook 04's figure on the LoRA pools."""
    return f04_star.draw_eta_sweep(results, smoke=smoke, notebook=NOTEBOOK)


def draw_rescale(results: dict, *, smoke: bool = False) -> list[Path]:
    """STAR with minus without rescaling, in normalized points, against eta (notebook 04's figure)."""
    return f04_star.draw_rescale(results, smoke=smoke, notebook=NOTEBOOK)


def draw_ranks(results: dict, *, smoke: bool = False) -> list[Path]:
    """The rank STAR keeps at the default eta of every adapted matrix (rows) of every LoRA expert
    (columns), out of the adapter's rank: the analogue of the STAR paper's Figure 3."""
    out = []
    eta = results["config"]["default_eta"]
    for pool_name, entry in results["star_ranks"].items():
        df = pd.DataFrame(entry["rows"])
        df = df[df.nonzero > 0]
        if df.empty:
            continue
        df["at_default"] = df.kept.map(lambda k: k[entry["etas"].index(eta)])
        grid = df.pivot_table(index="order", columns="expert", values="at_default", sort=False)
        experts = list(dict.fromkeys(df.expert))
        grid = grid[experts]
        labels = df.drop_duplicates("order").set_index("order").key.map(short_key).reindex(grid.index)
        fig, ax = plt.subplots(figsize=(3.0 + 1.0 * len(experts), 1.6 + 0.24 * len(grid)))
        values = grid.to_numpy(float)
        im = ax.imshow(values, aspect="auto", cmap="magma_r", vmin=0, vmax=max(1.0, float(np.nanmax(values))))
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, "" if np.isnan(v) else f"{int(v)}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(grid)), labels, fontsize=8)
        ax.grid(False)
        ax.set_title(f"{pool_name} (seed {entry['seed']}): rank kept at eta={eta}", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05, label="kept rank")
        out += savefig(fig, f"{NOTEBOOK}_ranks", smoke=smoke)
    return out


def draw_low_rank(results: dict, *, smoke: bool = False) -> list[Path]:
    """How low-rank the task vectors are in each setting: the fraction of each matrix's squared
    Frobenius norm in its top 16 singular directions, and its stable rank, one histogram per
    setting (LoRA experts, full fine-tunes of the same tasks and seed)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.2))
    for setting, rows in results.get("low_rank", {}).items():
        df = pd.DataFrame(rows)
        if df.empty:
            continue
        ax1.hist(df.top16_energy, bins=np.linspace(0, 1, 21), alpha=0.6, label=f"{setting} ({len(df)} matrices)")
        ax2.hist(np.log10(df.stable_rank), bins=20, alpha=0.6, label=setting)
    ax1.set_xlabel("share of ||tau||_F^2 in the top 16 directions")
    ax1.set_ylabel("matrices")
    ax1.legend(loc="upper left", fontsize=8)
    ax2.set_xlabel("log10 stable rank (sum s^2 / s_max^2)")
    ax2.legend(loc="upper right", fontsize=8)
    return savefig(fig, f"{NOTEBOOK}_low_rank", smoke=smoke)


def draw(results: dict, *, smoke: bool = False) -> list[Path]:
    return (
        draw_eta_sweep(results, smoke=smoke)
        + draw_rescale(results, smoke=smoke)
        + draw_methods(results, name=f"{NOTEBOOK}_methods", smoke=smoke)
        + draw_ranks(results, smoke=smoke)
        + draw_low_rank(results, smoke=smoke)
    )
