"""Figures of notebook 00, the Marchenko–Pastur primer, drawn from ``results/00_marchenko_pastur.json``."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..plotting import color, legend_below, legend_beside, savefig
from ..spectral import mp_pdf

NOTEBOOK = "00_marchenko_pastur"


def draw_esd(results: dict, *, smoke: bool = False) -> list[Path]:
    """Histogram of pure-noise eigenvalues against the MP density, one panel per aspect ratio."""
    items = results["esd"]
    fig, axes = plt.subplots(1, len(items), figsize=(3.6 * len(items), 3.2), squeeze=False)
    for item, ax in zip(items, axes[0]):
        eig = np.asarray(item["eigenvalues"])
        ax.hist(eig, bins=60, density=True, color=color("noise"), label="eigenvalues")
        x = np.linspace(0.0, item["lambda_plus"] * 1.1, 500)
        ax.plot(x, mp_pdf(x, item["q"]), color=color("mp"), label="Marchenko–Pastur")
        ax.axvline(item["lambda_plus"], color=color("signal"), linestyle="--", linewidth=1, label=r"$\lambda_+$")
        ax.set_title(f"{item['rows']}x{item['cols']}, q = {item['q']:.2f}  (KS {item['ks']:.3f})")
        ax.set_xlabel(r"eigenvalue of $W^\top W / N$ ($\sigma^2 = 1$)")
    axes[0][0].set_ylabel("density")
    legend_beside(axes[0][-1])
    return savefig(fig, f"{NOTEBOOK}_esd", smoke=smoke)


def draw_tracy_widom(results: dict, *, smoke: bool = False) -> list[Path]:
    """Where the largest noise eigenvalue lands, draw after draw: often past the asymptotic edge,
    almost never past the detection threshold."""
    tw = results["tracy_widom"]
    top = np.asarray(tw["top"])
    fig, ax = plt.subplots(figsize=(8.4, 3.6))
    ax.hist(top, bins=40, color=color("noise"), label=f"largest eigenvalue,\n{len(top)} noise draws")
    ax.axvline(
        tw["lambda_plus"],
        color=color("mp"),
        linestyle="--",
        label=rf"$\lambda_+$ = {tw['lambda_plus']:.3f}"
        + f"\n(exceeded in {100 * tw['frac_above_edge']:.0f}% of draws)",
    )
    ax.axvline(
        tw["threshold"],
        color=color("signal"),
        label=f"detection threshold = {tw['threshold']:.3f}\n(exceeded in {100 * tw['frac_above_threshold']:.1f}%)",
    )
    ax.set_title(f"Tracy–Widom fluctuations of the bulk edge, {tw['rows']}x{tw['cols']}")
    ax.set_xlabel(r"largest eigenvalue ($\sigma^2 = 1$)")
    ax.set_ylabel("draws")
    legend_beside(ax)
    return savefig(fig, f"{NOTEBOOK}_tracy_widom", smoke=smoke)


def draw_spike(results: dict, *, smoke: bool = False) -> list[Path]:
    """A planted rank-one signal of growing strength: the top eigenvalue follows the BBP curve and
    is counted as signal once it clears the threshold."""
    sp = results["spike"]
    t = np.asarray(sp["strengths"])
    found = np.asarray(sp["n_signal"]) > 0
    top = np.asarray(sp["lambda_max"])
    # the threshold and the edge scale with the noise level, which is fitted to each matrix (sp["threshold"]
    # and sp["lambda_plus"] are for sigma2 = 1), so a spike just under the sigma2 = 1 line can be detected
    sigma2 = np.asarray(sp["sigma2"])
    first = int(np.argmax(found)) if found.any() else None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
    ax.plot(t, sp["bbp"], color=color("mp"), label="BBP prediction")
    ax.plot(t[~found], top[~found], "o", color=color("noise"), label="top eigenvalue: bulk")
    ax.plot(t[found], top[found], "o", color=color("signal"), label="top eigenvalue: signal")
    ax.plot(
        t,
        sp["lambda_plus"] * sigma2,
        color=color("mp"),
        linestyle="--",
        linewidth=1,
        label=r"$\lambda_+$ at the fitted $\sigma^2$",
    )
    ax.plot(
        t,
        sp["threshold"] * sigma2,
        color=color("signal"),
        linestyle=":",
        linewidth=1.2,
        label="detection threshold at the fitted $\\sigma^2$",
    )
    ax.axvline(
        sp["bbp_transition"],
        color="#999999",
        linewidth=0.8,
        label=f"BBP transition $t = q^{{1/4}}$ = {sp['bbp_transition']:.3f}",
    )
    ax.axvline(
        sp["detection_strength"],
        color=color("signal"),
        linewidth=0.8,
        linestyle="-.",
        label=f"predicted detection at $\\sigma^2 = 1$: t = {sp['detection_strength']:.3f}",
    )
    if first is not None:
        ax.annotate(
            f"first detected: t = {t[first]:.3f},\n"
            + rf"$\lambda$ = {top[first]:.3f} > {sp['threshold'] * sigma2[first]:.3f}",
            (t[first], top[first]),
            xytext=(t[0], 0.55 * top.max() + 0.45 * top.min()),
            fontsize=8,
            arrowprops={"arrowstyle": "->", "color": "#555555", "linewidth": 0.8},
        )
    ax.set_xlabel(r"signal strength $t$ (singular value / $\sigma\sqrt{N}$)")
    ax.set_ylabel(r"largest eigenvalue (in units of the true $\sigma^2 = 1$)")
    ax.set_title(f"One planted spike in {sp['rows']}x{sp['cols']} noise")
    legend_below(ax, ncol=2)
    ax2.plot(t, sp["snr"], "o-", color=color("mp"), label="our SNR (mp)")
    ax2.axvline(
        sp["detection_strength"],
        color=color("signal"),
        linewidth=0.8,
        linestyle="-.",
        label="predicted detection at $\\sigma^2 = 1$",
    )
    if first is not None:
        ax2.axvline(t[first], color=color("signal"), linewidth=0.8, label=f"first detected, t = {t[first]:.3f}")
    ax2.set_xlabel(r"signal strength $t$")
    ax2.set_ylabel("SNR = signal / bulk eigenvalue mass")
    legend_below(ax2, ncol=1)
    return savefig(fig, f"{NOTEBOOK}_spike", smoke=smoke)


def draw_shape_bias(results: dict, *, smoke: bool = False) -> list[Path]:
    """SNR of pure-noise matrices of BERT's (and ResNet's) shapes under each definition: noise
    should score zero whatever its shape."""
    items = results["shape_bias"]
    labels = [f"{r}x{c}" for r, c in (item["shape"] for item in items)]
    methods = [
        ("report_text", "report NLP (report_text)"),
        ("max_median", "report ResNet (max/median)"),
        ("mp", "ours (mp)"),
    ]
    x = np.arange(len(items))
    width = 0.8 / len(methods)
    means = {m: np.array([np.mean(item[f"snr_{m}"]) for item in items]) for m, _ in methods}
    positive = np.concatenate([v[v > 0] for v in means.values()])
    # zero cannot sit on a log axis: exact zeros are marked "0" on a floor a decade below the smallest non-zero
    # mean, so a small SNR (the report's 0.001 on square noise) is a bar and a zero is not
    floor = 10 ** (np.floor(np.log10(positive.min())) - 1) if positive.size else 1e-3
    fig, ax = plt.subplots(figsize=(9.5, 3.8))
    for i, (method, label) in enumerate(methods):
        values, xs = means[method], x + (i - 1) * width
        ax.bar(
            xs[values > 0],
            values[values > 0],
            width,
            color=color(method if method != "max_median" else "base"),
            label=label,
            bottom=0,
        )
        for xz in xs[values == 0]:
            ax.text(xz, floor * 1.5, "0", ha="center", va="bottom", fontsize=8, color=color(method))
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(x, labels)
    ax.set_ylabel(f"SNR of pure noise (mean of {len(items[0]['snr_mp'])} draws)")
    ax.set_title("The same noise, different shapes: only the MP reading stays at zero (marked 0)")
    legend_beside(ax)
    return savefig(fig, f"{NOTEBOOK}_shape_bias", smoke=smoke)


def _short(name: str) -> str:
    return (
        name.replace("encoder.layer.", "L")
        .replace(".weight", "")
        .replace("attention.self.", "")
        .replace("attention.output.dense", "attn_out")
        .replace("intermediate.dense", "ffn_in")
        .replace("output.dense", "ffn_out")
        .replace("embeddings.", "emb.")
    )


def draw_minilm_scan(results: dict, *, smoke: bool = False) -> list[Path]:
    """SNR of every MiniLM weight matrix, pre-trained against entry-shuffled, under our definition
    and the report's: real structure scores high, shuffled noise should score zero."""
    real, null = results["minilm"]["real"], results["minilm"]["shuffled"]
    names = [_short(r["name"]) for r in real]
    x = np.arange(len(names))
    floor = 1e-3
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.16 * len(names)), 7.2), sharex=True)
    for ax, key, title in [(axes[0], "snr_mp", "ours (mp)"), (axes[1], "snr_report_text", "report NLP (report_text)")]:
        ax.plot(x, np.maximum([r[key] for r in real], floor), "o", color=color("signal"), label="pre-trained")
        ax.plot(x, np.maximum([r[key] for r in null], floor), "x", color=color("noise"), label="entries shuffled")
        ax.set_yscale("log")
        ax.set_ylabel(f"SNR, {title}")
        legend_beside(ax)
    axes[1].set_xticks(x, names, rotation=90, fontsize=8)
    axes[0].set_title("all-MiniLM-L6-v2: learned structure versus the same entries shuffled (floor = exactly 0)")
    return savefig(fig, f"{NOTEBOOK}_minilm_scan", smoke=smoke)


def draw_minilm_esd(results: dict, *, smoke: bool = False) -> list[Path]:
    """One pre-trained layer and its shuffled copy against their fitted MP densities."""
    esd = results["minilm"]["esd"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in [(axes[0], "real", "pre-trained"), (axes[1], "shuffled", "entries shuffled")]:
        item = esd[key]
        eig = np.asarray(item["eigenvalues"])
        right = max(2.0 * item["threshold"], float(np.quantile(eig, 0.95)))
        shown = eig[eig <= right]
        ax.hist(
            shown,
            bins=60,
            density=True,
            color=color("noise"),
            label=f"eigenvalues ({len(eig) - len(shown)} beyond the axis)",
        )
        xs = np.linspace(0.0, right, 500)
        ax.plot(
            xs,
            mp_pdf(xs, item["q"], item["sigma2"]) * len(eig) / max(len(shown), 1),
            color=color("mp"),
            label="fitted MP",
        )
        ax.axvline(
            item["threshold"],
            color=color("signal"),
            linestyle="--",
            linewidth=1,
            label=f"threshold: {item['n_signal']} of {len(eig)} above",
        )
        ax.set_title(f"{_short(esd['name'])}, {title}")
        ax.set_xlabel("eigenvalue")
        legend_below(ax, ncol=1)
    axes[0].set_ylabel("density")
    return savefig(fig, f"{NOTEBOOK}_minilm_esd", smoke=smoke)


def draw(results: dict, *, smoke: bool = False) -> list[Path]:
    out = []
    for fn in (draw_esd, draw_tracy_widom, draw_spike, draw_shape_bias, draw_minilm_scan, draw_minilm_esd):
        out += fn(results, smoke=smoke)
    return out
