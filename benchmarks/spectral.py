"""lib.spectral.scan against a per-matrix full SVD (the report's approach) and against the floor of
any exact route (float32 Gram products + ``eigvalsh`` of the same matrices) on BERT-base-shaped
weights: 12 layers x {4 x 768x768 attention, 768x3072 and 3072x768 feed-forward}.

Both paths produce the Marchenko–Pastur reading of every matrix: the SVD path takes
``svdvals(W)**2 / N`` one matrix at a time, ``scan`` the eigenvalues of the smaller Gram matrix
in stacks of equal shape on the selected device. Both run in the same process, alternating, and
each is timed as the best of ``--repeats`` runs (the machine may be shared: the load average is
printed with the numbers). Prints, never asserts.

On a GPU (``--device cuda``) ``scan`` is also timed on the CPU, so the GPU's gain over the same
routine is printed beside its gain over the SVD. ``--reference-dtype float64`` takes the
reference SVD in float64 (issue 20's target). The figures go to ``benchmarks/results/spectral.json``
(``spectral.quick.json`` with ``--quick``, ``weightwatcher.json`` with ``--weightwatcher``; ``--json PATH`` elsewhere).

    python benchmarks/spectral.py            # BERT-base: 72 matrices
    python benchmarks/spectral.py --quick    # one layer, one repeat: a smoke check
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lib import spectral
from lib.device import get_device
from lib.paths import write_json

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {"attention": [(768, 768)] * 4, "ffn_in": [(3072, 768)], "ffn_out": [(768, 3072)]}


def bert_like_weights(layers: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gaussian noise plus a planted rank-8 signal per matrix (spikes to find, a bulk to fit)."""
    gen = torch.Generator().manual_seed(seed)
    strengths = torch.linspace(1.5, 4.0, 8).tolist()
    return {
        f"layer.{layer}.{kind}.{i}.weight": 0.02 * spectral.planted_spikes(rows, cols, strengths, generator=gen)
        for layer in range(layers)
        for kind, shapes in SHAPES.items()
        for i, (rows, cols) in enumerate(shapes)
    }


def tall(w: torch.Tensor) -> torch.Tensor:
    # LAPACK's SVD of a wide matrix is several times slower than of its (tall) transpose; the
    # reference gets the faster orientation so that the comparison is not flattered
    return w if w.shape[0] >= w.shape[1] else w.T


def svd_readings(weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, spectral.Spectrum]:
    """The reference: a full SVD of every matrix, one at a time, in ``dtype``."""
    return {
        name: spectral.from_eigenvalues(torch.linalg.svdvals(tall(w).to(dtype)) ** 2 / max(w.shape), w.shape)
        for name, w in weights.items()
    }


def gram_matrices(weights: dict[str, torch.Tensor], device) -> None:
    """Only the first step of ``scan``, the stacked Gram products: what any Gram-based path
    (full or partial spectrum) pays before its first eigenvalue."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for w in weights.values():
        by_shape.setdefault(tuple(w.shape), []).append(tall(w))
    for mats in by_shape.values():
        stack = torch.stack(mats).to(device)
        stack.mT @ stack


def exact_floor(weights: dict[str, torch.Tensor], device) -> None:
    """The floor of any exact full-spectrum route: the float32 Gram product of every matrix and one
    batched ``eigvalsh`` per shape of those same Gram matrices, nothing else (no checks, no
    scaling, no reading of the spectra)."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for w in weights.values():
        by_shape.setdefault(tuple(w.shape), []).append(tall(w))
    for mats in by_shape.values():
        grams = torch.stack([(m := x.to(device)).T @ m for x in mats])
        torch.linalg.eigvalsh(grams)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def cpu_timed(fn: Callable[[], object]) -> float:
    """CPU seconds of this process (all threads): on a shared machine steadier than wall time."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def race(
    weights: dict[str, torch.Tensor], repeats: int, device, reference_dtype: torch.dtype = torch.float32
) -> tuple[float, float, dict, object]:
    """Best-of-``repeats`` seconds of both paths, alternating so that a change in machine load
    hits both alike; also returns the last result of each. ``scan`` returns its table on the
    CPU, so a GPU's time includes the transfers and the wait for the device."""
    svd_times, scan_times = [], []
    for _ in range(repeats):
        t, reference = timed(lambda: svd_readings(weights, reference_dtype))
        svd_times.append(t)
        t, table = timed(lambda: spectral.scan(weights, device=device))
        scan_times.append(t)
    return min(svd_times), min(scan_times), reference, table


def weightwatcher_comparison(mp_fit: bool = True) -> dict:
    """``spectral.layer_metrics`` and ``scan`` beside WeightWatcher's ``analyze()`` on MiniLM's body,
    layer by layer (WeightWatcher is not a dependency: ``pip install weightwatcher``; skipped
    without it). Prints the largest difference of every shared metric and both noise fits' spike
    counts.

    Why our fit calls several times more eigenvalues signal: ``scan`` sets the noise level so that
    the *median* of the eigenvalues below the threshold matches the Marchenko–Pastur median
    (:func:`lib.spectral._bulk_median_sigma2`). Pre-trained weights are heavy-tailed, so the lower
    half of the spectrum is narrower than the whole, the fitted sigma² is small, the bulk edge low,
    and much of the upper spectrum lies above it. WeightWatcher's ``mp_fit`` fits the MP density to
    a kernel density estimate of the *whole* spectrum, heavy tail included, which widens the fitted
    bulk and raises its edge; only the far tail stays above it. Neither is wrong for pure noise
    plus spikes (both then find the planted spikes); they differ in what they call the bulk of a
    spectrum that has none."""
    from transformers import AutoModel

    from lib import models

    body = AutoModel.from_pretrained(str(models.default_text_model_path()))
    t_ours, ours = timed(lambda: spectral.layer_metrics(body))
    t_scan, table = timed(lambda: spectral.scan(body))
    print(f"layer_metrics on MiniLM: {t_ours:.2f} s ({len(ours)} matrices, float64 spectra); scan {t_scan:.2f} s")
    try:
        import weightwatcher
    except ImportError:
        print("weightwatcher is not installed (pip install weightwatcher): comparison skipped")
        return {"layer_metrics_s": t_ours, "scan_s": t_scan}
    watcher = weightwatcher.WeightWatcher(model=body)
    t_ww, details = timed(lambda: watcher.analyze(mp_fit=mp_fit))
    print(f"WeightWatcher analyze(mp_fit={mp_fit}): {t_ww:.2f} s ({len(details)} layers)")
    ours = ours.assign(layer=ours.name.str.removesuffix(".weight")).set_index("layer")
    details = details.set_index("longname")
    shared = [k for k in details.index if k in ours.index]
    figures = {
        "layer_metrics_s": t_ours,
        "scan_s": t_scan,
        "weightwatcher_s": t_ww,
        "layers": len(shared),
        "load": os.getloadavg()[0],
    }
    for ours_col, ww_col in [
        ("alpha", "alpha"),
        ("alpha_weighted", "alpha_weighted"),
        ("xmin", "xmin"),
        ("stable_rank", "stable_rank"),
        ("log_spectral_norm", "log_spectral_norm"),
        ("log_norm", "log_norm"),
        ("entropy", "entropy"),
        ("rank_loss", "rank_loss"),
    ]:
        if ww_col not in details:
            continue
        a, b = ours.loc[shared, ours_col].astype(float), details.loc[shared, ww_col].astype(float)
        rel = ((a - b).abs() / b.abs().clip(lower=1e-12)).max()
        print(
            f"  {ours_col:18s} largest relative difference {rel:.1e}   (ours median {a.median():.4g}, WW {b.median():.4g})"
        )
        figures[f"{ours_col}_max_rel_diff"] = float(rel)
    if "num_spikes" in details:
        ours_spikes = int(
            table.assign(layer=table.name.str.removesuffix(".weight")).set_index("layer").loc[shared, "n_signal"].sum()
        )
        ww_spikes = int(details.loc[shared, "num_spikes"].sum())
        print(
            f"  eigenvalues called signal: scan {ours_spikes}, WeightWatcher {ww_spikes} "
            f"({ours_spikes / max(ww_spikes, 1):.1f} x; see this function's docstring for why)"
        )
        figures |= {"scan_signal": ours_spikes, "weightwatcher_spikes": ww_spikes}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one layer, one repeat, no per-shape breakdown")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: lib.device.get_device())")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--reference-dtype",
        choices=["float32", "float64"],
        default="float32",
        help="dtype of the reference SVD (default float32, the weights' own)",
    )
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-shape breakdown")
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="write the figures to this JSON file, atomically (default benchmarks/results/spectral.json, "
        "spectral.quick.json with --quick, weightwatcher.json with --weightwatcher)",
    )
    parser.add_argument(
        "--weightwatcher",
        action="store_true",
        help="only compare layer_metrics and scan with WeightWatcher on MiniLM (needs weightwatcher)",
    )
    args = parser.parse_args()
    results = ROOT / "benchmarks" / "results"
    if args.weightwatcher:
        figures = weightwatcher_comparison()
        print(f"results: {write_json(args.json or results / 'weightwatcher.json', figures)}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    layers, repeats = (1, 1) if args.quick else (args.layers, args.repeats)
    device = get_device(args.device)
    reference_dtype = getattr(torch, args.reference_dtype)

    weights = bert_like_weights(layers)
    print(
        f"{len(weights)} matrices ({layers} BERT-base layers), float32, device {device}, "
        f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}"
    )
    spectral.scan(
        {"warm-up": torch.randn(256, 64)}, device=device
    )  # first-call costs (library loading) out of the race

    t_svd, t_scan, reference, table = race(weights, repeats, device, reference_dtype)
    ours = dict(zip(weights, spectral.spectra(list(weights.values()), device=device)))
    eig_err = max(
        float((ours[k].eigenvalues - ref.eigenvalues).abs().max() / ref.lambda_max) for k, ref in reference.items()
    )
    snr_err = max(abs(row.snr - reference[row.name].snr) / reference[row.name].snr for row in table.itertuples())
    same_counts = all(row.n_signal == reference[row.name].n_signal for row in table.itertuples())

    print(f"full SVD, one matrix at a time  : {t_svd:8.2f} s   (best of {repeats}, {args.reference_dtype}, CPU)")
    print(f"scan (Gram eigenvalues, batched): {t_scan:8.2f} s   (best of {repeats})")
    print(f"speed ratio                     : {t_svd / t_scan:8.2f} x")
    t_gram = min(timed(lambda: gram_matrices(weights, device))[0] for _ in range(repeats))
    print(
        f"Gram products alone             : {t_gram:8.2f} s   (ceiling for any Gram-based path: {t_svd / t_gram:.1f} x)"
    )
    # the floor and the stages of scan, interleaved, best of repeats (wall and CPU seconds): what
    # scan pays beyond the floor is the checks (one max-magnitude pass per matrix), the round-off
    # cut and conversions (inside _gram_spectra), and reading the spectra (median fit, threshold,
    # table; scan less _gram_spectra)
    stages = {
        "floor": lambda: exact_floor(weights, device),
        "gram_spectra": lambda: spectral._gram_spectra(list(weights.values()), device=device, entry_var=False),
        "scan": lambda: spectral.scan(weights, device=device),
    }
    wall = {k: [] for k in stages}
    cpu = {k: [] for k in stages}
    for _ in range(repeats):
        for k, fn in stages.items():
            wall[k].append(timed(fn)[0])
            cpu[k].append(cpu_timed(fn))
    wall, cpu = {k: min(v) for k, v in wall.items()}, {k: min(v) for k, v in cpu.items()}
    print(f"exact floor (Gram + eigvalsh)   : {wall['floor']:8.2f} s   ({cpu['floor']:.2f} CPU s)")
    print(
        f"scan / floor                    : {wall['scan'] / wall['floor']:8.2f} x   "
        f"({cpu['scan'] / cpu['floor']:.2f} x in CPU time; target <= 1.2)"
    )
    print(f"  of which checks, cut, dtypes  : {cpu['gram_spectra'] - cpu['floor']:8.2f} CPU s")
    print(
        f"  of which reading the spectra  : {cpu['scan'] - cpu['gram_spectra']:8.2f} CPU s  (median fit, threshold, table)"
    )
    print(f"largest eigenvalue difference   : {eig_err:.1e}  (relative to the matrix's largest eigenvalue)")
    print(f"largest SNR difference          : {snr_err:.1e}  (relative); n_signal identical: {same_counts}")
    figures = {
        "matrices": len(weights),
        "layers": layers,
        "device": str(device),
        "repeats": repeats,
        "reference_dtype": args.reference_dtype,
        "threads": torch.get_num_threads(),
        "svd_s": t_svd,
        "scan_s": t_scan,
        "scan_vs_svd": t_svd / t_scan,
        "gram_s": t_gram,
        "floor_s": wall["floor"],
        "scan_vs_floor": wall["scan"] / wall["floor"],
        "floor_cpu_s": cpu["floor"],
        "scan_cpu_s": cpu["scan"],
        "gram_spectra_cpu_s": cpu["gram_spectra"],
        "scan_vs_floor_cpu": cpu["scan"] / cpu["floor"],
        "max_eigenvalue_error": eig_err,
        "max_snr_error": snr_err,
        "n_signal_identical": bool(same_counts),
    }
    if device.type != "cpu":  # the same routine on the CPU: what the device itself gains
        t_scan_cpu = min(timed(lambda: spectral.scan(weights, device="cpu"))[0] for _ in range(repeats))
        print(
            f"scan on the CPU                 : {t_scan_cpu:8.2f} s   ({device} is {t_scan_cpu / t_scan:.1f} x faster)"
        )
        figures |= {"scan_cpu_s": t_scan_cpu, "scan_vs_scan_cpu": t_scan_cpu / t_scan}
    print(f"load average after              : {os.getloadavg()[0]:.1f}")
    if not (args.quick or args.no_breakdown):
        print("by shape:")
        figures["by_shape"] = {}
        for kind, shapes in SHAPES.items():
            group = {k: w for k, w in weights.items() if f".{kind}." in k}
            t_ref, t_ours, _, _ = race(group, repeats, device, reference_dtype)
            rows, cols = shapes[0]
            print(
                f"  {kind:9s} {rows}x{cols}: {len(group):3d} matrices  SVD {t_ref:6.2f} s  scan {t_ours:6.2f} s  "
                f"ratio {t_ref / t_ours:5.2f} x"
            )
            figures["by_shape"][f"{kind} {rows}x{cols}"] = {"svd_s": t_ref, "scan_s": t_ours}
    print(
        f"results: {write_json(args.json or results / ('spectral.quick.json' if args.quick else 'spectral.json'), figures)}"
    )


if __name__ == "__main__":
    main()
