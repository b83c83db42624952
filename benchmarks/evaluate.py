"""lib.evaluate.evaluate against its floor: a bare loop over the same pre-tokenised, length-sorted
batches through the same MiniLM classifier, on SST-2 validation (the full split, 872 phrases).

``evaluate`` adds to the bare loop: finding the cached batches, moving the model, the logits'
copy to float32 on the CPU, putting the examples back in the split's order, and the metrics.
The first call also tokenises the split (once per process: ``lib.evaluate`` keeps the batches in
memory keyed by task, split, length cap, tokenizer and data folder), which is timed separately.
Both paths are timed alternately, best of ``--repeats``, in wall and CPU seconds (the machine
may be shared). The benchmark also times the bare loop at other thread counts and batch sizes,
which is what would lower the floor itself; it prints, never asserts.

    python benchmarks/evaluate.py            # SST-2 validation, 3 repeats
    python benchmarks/evaluate.py --quick    # one repeat, no sweep of threads and batch sizes
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from lib import batching, cache, train
from lib import evaluate as evaluation
from lib.paths import write_json


def bare_loop(model, batches) -> list[torch.Tensor]:
    """The floor: the forward passes over the batches and nothing else."""
    with torch.inference_mode():
        return [model(**inputs).logits for inputs, _ in batches]


def best(fn, repeats: int) -> tuple[float, float]:
    """Best wall and best CPU seconds of ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    task, split = "sst2", "validation"
    model = train._architecture(task, head_seed=0).eval()

    start = time.perf_counter()
    first = evaluation.evaluate(model, task, split, smoke=False)
    first_s = time.perf_counter() - start
    n = first["n"]
    batches = evaluation._eval_batches(
        task, split, smoke=False, max_length=cache.RECIPES[task].max_length, model_name=None, data_dir=None
    )
    print(
        f"SST-2 {split}: {n} examples in {len(batches)} length-sorted batches of {cache.EVAL_BATCH['text']}, "
        f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}"
    )

    wall = {"evaluate": [], "bare": []}
    cpu = {"evaluate": [], "bare": []}
    for _ in range(repeats):  # alternating, so that a change in load hits both alike
        for name, fn in (
            ("evaluate", lambda: evaluation.evaluate(model, task, split, smoke=False)),
            ("bare", lambda: bare_loop(model, batches)),
        ):
            w, c = best(fn, 1)
            wall[name].append(w)
            cpu[name].append(c)
    wall, cpu = {k: min(v) for k, v in wall.items()}, {k: min(v) for k, v in cpu.items()}
    same = evaluation.evaluate(model, task, split, smoke=False) == first
    bare = torch.cat([x.float() for x in bare_loop(model, batches)]).numpy()
    logits, idx = evaluation.predict(model, task, split, smoke=False)
    order = np.concatenate([i for _, i in batches])
    identical = bool(np.array_equal(logits[np.searchsorted(idx, order)], bare))  # back to the batches' order

    print(
        f"first evaluate (tokenises)   : {first_s:7.2f} s  ({first_s - wall['evaluate']:.2f} s of it tokenising "
        f"and batching, once per process)"
    )
    print(
        f"evaluate                     : {wall['evaluate']:7.2f} s  ({n / wall['evaluate']:6.1f} examples/s; "
        f"{cpu['evaluate']:.2f} CPU s)"
    )
    print(
        f"bare loop, same batches      : {wall['bare']:7.2f} s  ({n / wall['bare']:6.1f} examples/s; "
        f"{cpu['bare']:.2f} CPU s)"
    )
    print(
        f"evaluate / bare loop         : {wall['evaluate'] / wall['bare']:7.2f} x  "
        f"({cpu['evaluate'] / cpu['bare']:.2f} x in CPU time; target <= 1.1)"
    )
    print(f"same metrics on every call: {same}; logits equal the bare loop's bit for bit: {identical}")
    figures = {
        "task": task,
        "split": split,
        "n": n,
        "threads": torch.get_num_threads(),
        "first_s": first_s,
        "evaluate_s": wall["evaluate"],
        "bare_s": wall["bare"],
        "evaluate_cpu_s": cpu["evaluate"],
        "bare_cpu_s": cpu["bare"],
        "ratio": wall["evaluate"] / wall["bare"],
        "ratio_cpu": cpu["evaluate"] / cpu["bare"],
        "metrics": first,
        "identical": identical,
    }

    if not args.quick:  # what lowers the floor itself: threads and batch sizes (padding differs)
        threads = torch.get_num_threads()
        figures["sweep"] = []
        enc = batching.encode(task, split, max_length=cache.RECIPES[task].max_length)
        subset = evaluation.eval_indices(task, split, smoke=False)
        for n_threads in sorted({1, threads}):
            torch.set_num_threads(n_threads)
            for size in (32, 64, 128, 256):
                sized = [
                    (batching.collate(enc, subset[b]), subset[b])
                    for b in batching.sorted_batches(enc.lengths[subset], size)
                ]
                w, c = best(lambda sized=sized: bare_loop(model, sized), repeats)
                print(
                    f"  bare loop, {n_threads} thread(s), batches of {size:3d}: {n / w:6.1f} examples/s "
                    f"({w:.2f} s, {c:.2f} CPU s)"
                )
                figures["sweep"].append({"threads": n_threads, "batch": size, "wall_s": w, "cpu_s": c})
        torch.set_num_threads(threads)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        write_json(args.json, figures)


if __name__ == "__main__":
    main()
