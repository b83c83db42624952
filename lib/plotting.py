"""One figure style, one palette, one ``savefig``.

Every figure of the project is drawn by a function that takes the contents of a
``results/*.json`` file, so the notebook that produced the numbers and ``make figures`` draw
exactly the same picture.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib.pyplot as plt

from . import paths

#: a colour per merge method / role, shared by every figure so a method looks the same everywhere
PALETTE = {
    "average": "#7f7f7f",
    "task_arithmetic": "#17becf",
    "ties": "#9467bd",
    "dare": "#8c564b",
    "star": "#e377c2",
    "drm_h": "#bcbd22",
    "drm_v": "#dbdb8d",
    "snr_base_reset": "#1f77b4",
    "snr_winner": "#2ca02c",
    "snr_low_a": "#ff7f0e",
    "snr_low_b": "#d62728",
    "snr_max": "#98df8a",
    "snr_weighted": "#aec7e8",
    "expert": "#000000",
    "base": "#c7c7c7",
    "noise": "#c7c7c7",
    "signal": "#d62728",
    "mp": "#1f77b4",
    "report_text": "#ff7f0e",
    "max_median": "#ff7f0e",
}


def color(name: str, default: str = "#333333") -> str:
    return PALETTE.get(name, default)


def set_style() -> None:
    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "figure.figsize": (7.0, 4.2),
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 8,
            "legend.frameon": False,
            "font.size": 9,
        }
    )


set_style()


def matrix_name(key: str) -> str:
    """A weight matrix's name as the figures write it: ``bert.encoder.layer.3.attention.output.dense.weight``
    -> ``L3.attn_out``, ``embeddings.word_embeddings`` -> ``emb.word_embeddings``, ``layer2.0.conv1``."""
    key = key.removeprefix("bert.").removesuffix(".weight")
    return (
        key.replace("encoder.layer.", "L")
        .replace("attention.self.", "")
        .replace("attention.output.dense", "attn_out")
        .replace("intermediate.dense", "ffn_in")
        .replace("output.dense", "ffn_out")
        .replace("embeddings.", "emb.")
    )


def matrix_kind(name: str) -> str:
    """The role of a matrix, the same in every layer: ``encoder.layer.3.attention.self.query.weight``
    -> ``attention.self.query``; names without a layer number keep their module path."""
    from .statedict import module_of  # torch, which the figures of results/*.json do not need

    return re.sub(r"^.*?\.\d+\.", "", module_of(name)) or name


def plot_scan(table, title: str = ""):
    """Bar chart of the SNR of every matrix in depth order (log scale above 1: SNRs span orders
    of magnitude), coloured by the role of the matrix (query, key, value, feed-forward, ...), one
    tick per layer: where along the depth the signal above the noise bulk sits, and which kinds
    of matrix carry it."""
    from .statedict import module_of

    names = list(table["name"])
    kinds = [matrix_kind(n) for n in names]
    palette = dict(zip(dict.fromkeys(kinds), plt.get_cmap("tab20").colors * 5))
    fig, ax = plt.subplots(figsize=(max(9.0, 0.08 * len(names) + 3.0), 4.6))
    for kind, c in palette.items():
        idx = [i for i, k in enumerate(kinds) if k == kind]
        ax.bar(idx, [table["snr"].iloc[i] for i in idx], color=c, label=kind, width=0.85)
    ticks = {}
    for i, n in enumerate(names):
        layer = re.search(r"\.(\d+)\.", n)
        ticks.setdefault(layer.group(1) if layer else module_of(n).split(".")[0], i)
    ax.set_xticks(list(ticks.values()), list(ticks.keys()), fontsize=7, rotation=45)
    ax.set_yscale("symlog", linthresh=1.0)  # linear below 1 (noise-like, and 0 stays drawable), log above
    ax.set_xlabel("matrix, in depth order (ticks: first matrix of each layer)")
    ax.set_ylabel("SNR (signal / Marchenko-Pastur bulk)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def legend_beside(ax, **kwargs):
    """The legend to the right of ``ax``, outside it, where it can hide no data (``tight_layout``
    makes room for it); for a row of panels, call it on the last one."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def legend_below(ax, ncol: int, **kwargs):
    """The legend under ``ax`` (below its tick labels and axis label), in ``ncol`` columns. Call it
    after the ticks and the x label are set: the gap is their measured height, in points, so it
    holds when ``tight_layout`` shrinks the axes to make room for a tall legend (a fixed fraction
    of the axes height does not: it put a five-row legend on the axis label)."""
    from matplotlib.transforms import offset_copy

    fig = ax.figure
    below = ax.get_window_extent().y0 - ax.xaxis.get_tightbbox(fig.canvas.get_renderer()).y0  # pixels
    anchor = offset_copy(ax.transAxes, fig=fig, y=-(max(below, 0.0) * 72 / fig.dpi + 4), units="points")
    return ax.legend(
        loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=anchor, borderaxespad=0.0, ncol=ncol, **kwargs
    )


def savefig(
    fig,
    name: str | None = None,
    *,
    path: str | Path | None = None,
    smoke: bool | None = None,
    formats=("png",),
    close: bool = True,
) -> list[Path]:
    """Save ``fig`` as ``figures/<name>.<fmt>`` (``figures/smoke/`` in SMOKE mode), atomically;
    or, with ``path`` instead of ``name``, exactly at ``path`` in the format its suffix names
    (PNG without a suffix) -- e.g. a plot the user asked for on the command line.

    The figure stays open when ``close=False`` so that a notebook can still display it.
    """
    if (name is None) == (path is None):
        raise ValueError("give savefig a figure name (saved under figures/) or a path, not both or neither")
    if path is not None:
        path = Path(path)
        targets = [(path, path.suffix.lstrip(".") or "png")]
    else:
        folder = paths.figures_dir(smoke)
        targets = [(folder / f"{name}.{fmt}", fmt) for fmt in formats]
    fig.tight_layout()
    out = []
    for target, fmt in targets:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, bbox_inches="tight")
        out.append(paths.atomic_write_bytes(target, buf.getvalue()))
    if close:
        plt.close(fig)
    return out
