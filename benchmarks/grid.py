"""A SMOKE-sized pool grid on 1 and 2 local worker processes (issue 15): wall times, their ratio,
whether the records are identical, and the measured time per record to plan a cluster run.

The grid is one vision pool (MNIST, Fashion-MNIST and KMNIST experts from the shared random
initialisation, SMOKE mode: 500 evaluation images per task) at one seed: the experts and base
alone, then every subset of 2 and 3 tasks merged by each of ``--methods`` -- what notebooks
04-06 do per pool and seed, on the SMOKE slices. Missing SMOKE experts are trained first (the
serial part, timed apart). Each worker count runs the whole grid into a fresh record store
through ``processes:N`` (:mod:`lib.executors`), so both pay the same start-up: a spawned
interpreter importing torch and loading the pool once per worker, also timed apart.

Printed: per worker count the wall time, the records per second and the per-record seconds
(the store's ``seconds``: merge + evaluation inside the worker, and the pool load for a worker's
first record); the ratio 1 worker / 2 workers; whether the records (without the fields that
measure the run, :data:`lib.runner.MEASURED`) are identical; the median merge and evaluation
seconds per merged record. Nothing is asserted. On a shared machine timings follow its load,
printed beside them.

    python benchmarks/grid.py [--workers 1 2] [--threads N] [--methods average task_arithmetic ties] [--json PATH]

``--threads 1`` gives every worker count one torch thread per worker, separating the gain of
more workers from that of fewer threads (on a loaded machine two torch threads per process can
be slower than one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib import executors, pool, runner  # noqa: E402
from lib.paths import write_json  # noqa: E402
from lib.store import RecordStore  # noqa: E402

TASKS = ["mnist", "fashion_mnist", "kmnist"]


def load() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=["average", "task_arithmetic", "ties"])
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: cores // workers, as processes:N sets them)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    spec = runner.pool_spec(TASKS, seed=0, smoke=True, variant="shared_init")
    configs = runner.pool_grid(
        spec, pool.subset_plan(TASKS, [2, 3], seed=0), [pool.canonical_run(m) for m in args.methods]
    )
    t0 = time.perf_counter()
    runner.CachedExperts.prepare(spec, progress=False)
    prepare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner.CachedExperts.build(spec)
    load_s = time.perf_counter() - t0
    print(
        f"grid: {len(configs)} records (1 alone + {len(configs) - 1} merges of {len(TASKS)} SMOKE vision experts); "
        f"experts ready in {prepare_s:.1f} s, pool loaded in {load_s:.2f} s in this process; load {load()}"
    )

    results, baseline = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.workers:
            store = RecordStore(Path(tmp) / f"workers{n}.sqlite")
            before = load()
            t0 = time.perf_counter()
            with executors.LocalProcesses(n, threads=args.threads) as ex:
                threads = ex.threads
                records = runner.run_grid(configs, store=store, executor=ex, progress=False)
            wall = time.perf_counter() - t0
            seconds = [s for (s,) in store.conn.execute("select seconds from records")]
            merged = pool.models_frame(records)
            merged = merged[~merged.method.isin(pool.ALONE)]
            same = baseline is None or runner.comparable(records) == baseline
            baseline = baseline if baseline is not None else runner.comparable(records)
            results[n] = {
                "wall_s": wall,
                "threads_per_worker": threads,
                "records": len(configs),
                "record_s": seconds,
                "record_s_median": statistics.median(seconds),
                "record_s_sum": sum(seconds),
                "merge_s_median": float(merged.merge_s.median()),
                "eval_s_median": float(merged.eval_s.median()),
                "identical_to_first": same,
                "load_before": before,
                "load_after": load(),
            }
            print(
                f"  processes:{n} ({threads} torch thread{'s' if threads > 1 else ''} each): {wall:6.1f} s wall, {len(configs) / wall:.2f} records/s; per record median "
                f"{results[n]['record_s_median']:.2f} s (sum {results[n]['record_s_sum']:.1f} s; merge "
                f"{results[n]['merge_s_median']:.2f} s + evaluation {results[n]['eval_s_median']:.2f} s); "
                f"records identical: {same}; load {before} -> {load()}"
            )
    if len(results) >= 2:
        a, b = min(results), max(results)
        print(f"speed-up of {b} workers over {a}: {results[a]['wall_s'] / results[b]['wall_s']:.2f}x (wall-time ratio)")
    if args.json:
        write_json(
            args.json,
            {
                "config": {"tasks": TASKS, "methods": args.methods, "records": len(configs)},
                "prepare_s": prepare_s,
                "pool_load_s": load_s,
                "runs": results,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
