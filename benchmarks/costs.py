"""Cost curves of the merge methods (issue 22): CPU time, wall time and peak memory of
``lib.merge.merge`` against the number of experts and against the matrix size.

Methods: ``average``, ``ties`` (model-wide trim, its default), ``star``, ``drm_h`` and
``snr_weighted`` (the SNR strategies all read the Marchenko-Pastur SNR of every expert's task
vector of every matrix, which is what they cost; ``snr_weighted`` also mixes the experts by it).
Two sweeps of synthetic task vectors (a base of N(0, 0.02²) entries; each expert adds a rank-8
signal and N(0, 1e-3²) noise, the shape of a fine-tune's delta):

* experts: N = 1, 2, 4, 8, 16 on one 768x3072 matrix (BERT-base's feed-forward output);
* size: N = 2 on 768x768 and 768x3072 (BERT-base's attention and feed-forward matrices) and on
  one 4096x4096 matrix (a Llama-shaped attention projection).

Every point runs in a fresh subprocess with one torch thread, so that points do not share an
allocator or a high-water mark and CPU time is the work itself. Time: ``time.process_time`` (CPU)
and ``time.perf_counter`` (wall) around the ``merge`` call, after a warm-up merge of a small
matrix; the minimum of up to five repeats while they take under a second in all. Peak memory: the
process's resident-set high-water mark (``VmHWM``, what ``resource.getrusage().ru_maxrss`` reports
for a live process) reset through ``/proc/self/clear_refs`` just before the first ``merge`` call,
less the resident memory at that moment: the extra memory the merge itself needed, torch's
allocations included (``tracemalloc`` does not see those). Where ``/proc`` cannot be reset the
high-water mark includes building the inputs, and the JSON says so (``peak_memory``).

For each method the slope of log(CPU time) and of log(peak memory) against log(N) and against
log(entries of the matrix) is fitted by least squares over the points and stored beside them: 1
is linear growth, 1.5 the ``min(m, n)² · max(m, n)`` of a Gram eigendecomposition at fixed aspect.

    python benchmarks/costs.py [--quick] [--plot-only]

writes ``benchmarks/results/costs.json`` and ``figures/costs.png`` (atomically).  ``--quick``
(N up to 4, no 4096 point, about a minute) writes ``benchmarks/results/costs.quick.json`` and
``figures/smoke/costs.png`` instead, so that it never replaces the full run. ``--plot-only``
redraws the figure from the JSON. Timings on a shared machine vary with its load: the load
average is stored with every point; CPU time is the figure to compare.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("average", "ties", "snr_weighted", "star", "drm_h")
EXPERTS = (1, 2, 4, 8, 16)
EXPERTS_SHAPE = (768, 3072)
SIZES = ((768, 768), (768, 3072), (4096, 4096))
SIZE_EXPERTS = 2
RESULTS = ROOT / "benchmarks" / "results"
#: a method's points stop after one whose CPU time exceeds this (seconds); the rest are skipped
POINT_LIMIT_S = 240.0


# ------------------------------------------------------------------------------ one point (child)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def synthetic(n_experts: int, rows: int, cols: int, seed: int = 0):
    """A base matrix and ``n_experts`` experts: base + rank-8 signal + 1e-3 noise, built in place."""
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g).mul_(0.02)
    experts = []
    for _ in range(n_experts):
        left, right = torch.randn(rows, 8, generator=g), torch.randn(8, cols, generator=g)
        expert = torch.randn(rows, cols, generator=g).mul_(1e-3).add_(base)
        expert.addmm_(left, right, alpha=0.5 / math.sqrt(rows * cols))  # spikes well above the noise bulk
        experts.append({"w": expert})
    return {"w": base}, experts


def measure_point(method: str, n_experts: int, rows: int, cols: int) -> dict:
    import resource

    import torch

    from lib.merge import merge

    torch.set_num_threads(1)
    small_base, small_experts = synthetic(n_experts, 64, 96, seed=1)
    merge(method, small_base, small_experts)  # warm-up: lazy imports, LAPACK's first call
    base, experts = synthetic(n_experts, rows, cols)
    del small_base, small_experts
    rss_before = _status_kib("VmRSS")
    reset = _reset_high_water_mark()
    cpu, wall, repeats, total = math.inf, math.inf, 0, 0.0
    while repeats < 5 and (repeats == 0 or total < 1.0):
        c0, w0 = time.process_time(), time.perf_counter()
        out = merge(method, base, experts)
        c1, w1 = time.process_time(), time.perf_counter()
        if repeats == 0:
            high_water = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        del out
        cpu, wall, repeats, total = min(cpu, c1 - c0), min(wall, w1 - w0), repeats + 1, total + (c1 - c0)
    peak_mib = (high_water - (rss_before or 0)) / 1024 if reset and rss_before else high_water / 1024
    return {
        "method": method,
        "experts": n_experts,
        "rows": rows,
        "cols": cols,
        "entries": rows * cols,
        "cpu_s": cpu,
        "wall_s": wall,
        "repeats": repeats,
        "peak_extra_mib": peak_mib,
        "inputs_mib": (n_experts + 1) * rows * cols * 4 / 2**20,
        "peak_memory": "VmHWM after reset less VmRSS before the merge" if reset else "ru_maxrss of the whole process",
        "load": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------ the sweep (parent)


def run_point(method: str, n_experts: int, rows: int, cols: int) -> dict:
    cmd = [sys.executable, __file__, "--point", method, str(n_experts), str(rows), str(cols)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"point {method} N={n_experts} {rows}x{cols} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def slope(xs, ys) -> float | None:
    """Least-squares slope of log(ys) against log(xs); None with fewer than two usable points."""
    import numpy as np

    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    return float(np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)[0])


def growth(points: list[dict]) -> dict:
    """Per method: the fitted log-log slopes of CPU time and peak memory against N and size."""
    out = {}
    for method in METHODS:
        by_n = [p for p in points if p["method"] == method and p["sweep"] == "experts"]
        by_size = [p for p in points if p["method"] == method and p["sweep"] == "size"]
        out[method] = {
            "cpu_vs_experts": slope([p["experts"] for p in by_n], [p["cpu_s"] for p in by_n]),
            "memory_vs_experts": slope([p["experts"] for p in by_n], [p["peak_extra_mib"] for p in by_n]),
            "cpu_vs_entries": slope([p["entries"] for p in by_size], [p["cpu_s"] for p in by_size]),
            "memory_vs_entries": slope([p["entries"] for p in by_size], [p["peak_extra_mib"] for p in by_size]),
        }
    return out


def sweep(experts=EXPERTS, sizes=SIZES) -> list[dict]:
    plan = [("experts", m, n, *EXPERTS_SHAPE) for m in METHODS for n in experts]
    plan += [("size", m, SIZE_EXPERTS, r, c) for m in METHODS for r, c in sizes]
    points, too_slow = [], set()
    for sweep_name, method, n, rows, cols in plan:
        if (sweep_name, method) in too_slow:
            print(
                f"{sweep_name:7s} {method:13s} N={n:2d} {rows}x{cols}: skipped (an earlier point took > {POINT_LIMIT_S:.0f} s)"
            )
            continue
        p = run_point(method, n, rows, cols) | {"sweep": sweep_name}
        points.append(p)
        print(
            f"{sweep_name:7s} {method:13s} N={n:2d} {rows:4d}x{cols:<4d}  CPU {p['cpu_s']:8.3f} s  wall {p['wall_s']:8.3f} s  "
            f"peak extra {p['peak_extra_mib']:7.1f} MiB (inputs {p['inputs_mib']:6.1f} MiB)  load {p['load']:.1f}",
            flush=True,
        )
        if p["cpu_s"] > POINT_LIMIT_S:
            too_slow.add((sweep_name, method))
    return points


def print_growth(slopes: dict) -> None:
    def f(x):
        return "  n/a" if x is None else f"{x:5.2f}"

    print("log-log slopes (1 = linear):     CPU vs N   memory vs N   CPU vs entries   memory vs entries")
    for method, s in slopes.items():
        print(
            f"  {method:13s}                   {f(s['cpu_vs_experts'])}        {f(s['memory_vs_experts'])}"
            f"           {f(s['cpu_vs_entries'])}             {f(s['memory_vs_entries'])}"
        )


# ------------------------------------------------------------------------------------- the figure


def draw(results: dict):
    """The cost curves from a costs JSON: CPU time and peak extra memory against the number of
    experts (left) and the matrix's entries (right), log-log, one line per method labelled with
    its fitted slopes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from lib import plotting

    fig, axes = plt.subplots(2, 2, figsize=(9.0, 6.0), sharex="col")
    markers = dict(zip(METHODS, "osD^v"))
    for method in METHODS:
        s = results["growth"][method]
        label = (
            f"{method}: time ~ N^{s['cpu_vs_experts']:.2f}, size^{s['cpu_vs_entries']:.2f}"
            if s["cpu_vs_experts"] is not None and s["cpu_vs_entries"] is not None
            else method
        )
        for col, sweep_name, x in ((0, "experts", "experts"), (1, "size", "entries")):
            pts = sorted(
                (p for p in results["points"] if p["method"] == method and p["sweep"] == sweep_name), key=lambda p: p[x]
            )
            if not pts:
                continue
            style = dict(marker=markers[method], color=plotting.color(method, f"C{METHODS.index(method)}"), ms=4)
            axes[0, col].plot(
                [p[x] for p in pts], [p["cpu_s"] for p in pts], label=label if col == 0 else None, **style
            )
            axes[1, col].plot([p[x] for p in pts], [max(p["peak_extra_mib"], 0.1) for p in pts], **style)
    rows, cols = results["experts_shape"]
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_yscale("log")
    axes[0, 0].set_ylabel("CPU time of merge (s)")
    axes[1, 0].set_ylabel("peak extra memory (MiB)")
    axes[1, 0].set_xlabel(f"experts N (one {rows}x{cols} matrix)")
    axes[1, 1].set_xlabel(
        f"entries of the matrix (N = {results['size_experts']}; "
        + ", ".join(f"{r}x{c}" for r, c in results["sizes"])
        + ")"
    )
    axes[0, 0].set_title("against the number of experts", fontsize=10)
    axes[0, 1].set_title("against the matrix size", fontsize=10)
    for ax in axes[:, 0]:
        ax.set_xticks(results_experts(results), [str(n) for n in results_experts(results)])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    fig.tight_layout()
    # below the panels, outside every axes (savefig's bbox_inches="tight" keeps it in the image)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8)
    return fig


def results_experts(results: dict) -> list[int]:
    return sorted({p["experts"] for p in results["points"] if p["sweep"] == "experts"})


def save_figure(results: dict, quick: bool) -> Path:
    from lib import plotting

    fig = draw(results)
    return plotting.savefig(fig, "costs", smoke=quick)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N up to 4, no 4096x4096 point; writes costs.quick.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from the JSON")
    parser.add_argument("--point", nargs=4, metavar=("METHOD", "N", "ROWS", "COLS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        method, n, rows, cols = args.point
        print(json.dumps(measure_point(method, int(n), int(rows), int(cols))))
        return 0
    from lib.paths import read_json, write_json

    target = RESULTS / ("costs.quick.json" if args.quick else "costs.json")
    if args.plot_only:
        if not target.exists():
            print(
                f"error: {target} does not exist; run benchmarks/costs.py{' --quick' if args.quick else ''} first",
                file=sys.stderr,
            )
            return 1
        print(f"figure: {save_figure(read_json(target), args.quick)}")
        return 0
    import torch

    experts = EXPERTS[:3] if args.quick else EXPERTS
    sizes = SIZES[:2] if args.quick else SIZES
    print(
        f"torch {torch.__version__}, 1 torch thread per point, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    start = time.perf_counter()
    points = sweep(experts, sizes)
    slopes = growth(points)
    print_growth(slopes)
    results = {
        "benchmark": "costs",
        "torch": torch.__version__,
        "quick": args.quick,
        "methods": list(METHODS),
        "experts_shape": list(EXPERTS_SHAPE),
        "size_experts": SIZE_EXPERTS,
        "sizes": [list(s) for s in sizes],
        "time": "CPU seconds (time.process_time) of one merge call, 1 torch thread, min over repeats",
        "memory": "peak resident memory above the level before the merge, fresh subprocess per point",
        "wall_s_total": time.perf_counter() - start,
        "growth": slopes,
        "points": points,
    }
    print(f"results: {write_json(target, results)}")
    print(f"figure: {save_figure(results, args.quick)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
