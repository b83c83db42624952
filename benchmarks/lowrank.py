"""Low-rank task vectors, factored against dense: STAR and DRM-H on rank-16 LoRA experts of
BERT-base shapes (the 72 attention and MLP matrices of 12 layers), through :func:`lib.lora.merge_lowrank`
(QRs of the factors and small SVDs), timed against the float64 full-SVD reference of the same
merge on the densified task vectors, in the same run. Prints the CPU time of each (one torch
thread by default, so the ratio survives a loaded machine; wall time and load average beside it),
their ratio and the largest relative Frobenius error of a merged delta (target: >= 50x at <= 1e-6),
and writes them atomically to ``benchmarks/results/lowrank.json`` (``lowrank.L<layers>.json`` for
another size, ``--json ''`` to skip).

    python benchmarks/lowrank.py              # 3 experts, rank 16, 12 layers
    python benchmarks/lowrank.py --layers 2   # a quick look

The reference is what the methods cost without the factors: STAR takes ``torch.linalg.svd`` of
every ``768 x 768`` and ``768 x 3072`` task vector, DRM-H of every concatenation ``[D_1 D_2 D_3]``,
then the same rank rule, rescale, renormalisation, pruning and disjoint mean
(:mod:`lib.merge.star`, :mod:`lib.merge.drm`), one matrix at a time (densified, decomposed, its
error taken, dropped), so the dense DRM-H reference holds one ``768 x 9216`` concatenation at a
time. Not asserted in the tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # lib from this checkout, not an installed copy

import torch  # noqa: E402

from lib.lora import Adapter, LowRank, merge_lowrank  # noqa: E402
from lib.merge.drm import direction_rtol, merge_in_joint_basis, pruning_scale, task_coordinates  # noqa: E402
from lib.merge.star import kept_rank  # noqa: E402
from lib.paths import write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HIDDEN, INTERMEDIATE = 768, 3072


def bert_shapes(layers: int) -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[f"{p}{name}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}intermediate.dense.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}output.dense.weight"] = (HIDDEN, INTERMEDIATE)
    return shapes


def lora_experts(shapes, n_experts: int, rank: int, seed: int = 0) -> list[Adapter]:
    """float32 LoRA experts with a spread of singular values, as trained adapters have (A and B
    Gaussian with columns of decaying size), scale alpha/r = 2."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -1.5, rank)
    experts = []
    for _ in range(n_experts):
        deltas = {}
        for k, (m, n) in shapes.items():
            b = torch.randn(m, rank, generator=g) * decay / m**0.5
            a = torch.randn(rank, n, generator=g) / n**0.5
            deltas[k] = LowRank(b, a, 2.0, (m, n))
        experts.append(Adapter(deltas))
    return experts


def dense_deltas(experts, key) -> torch.Tensor:
    return torch.stack([e.deltas[key].dense(torch.float64) for e in experts])


def star_reference(deltas: torch.Tensor, eta: float = 40) -> torch.Tensor:
    """STAR by full float64 SVDs: truncate each task vector to its rank, rescale, average."""
    u, s, vh = torch.linalg.svd(deltas, full_matrices=False)
    rank = kept_rank(s, eta)
    kept = torch.arange(s.shape[-1]) < rank[:, None]
    weights = s * kept * (s.sum(-1, keepdim=True) / (s * kept).sum(-1, keepdim=True))
    return ((u * weights[:, None, :]) @ vh).mean(0)


def drm_h_reference(deltas: torch.Tensor, density: float = 0.2, rtol: float = 1e-2) -> torch.Tensor:
    """DRM-H by a full float64 SVD of the concatenation, then the module's steps 2-4."""
    n_tasks, m, n = deltas.shape
    joint = deltas.transpose(0, 1).reshape(m, n_tasks * n)
    u, s, _ = torch.linalg.svd(joint, full_matrices=False)
    s = torch.where(s > rtol * s[0], s, torch.zeros_like(s))
    coordinates = task_coordinates(u, s, joint, n_tasks, round_off=direction_rtol(torch.float32, torch.float64))
    rank = coordinates.shape[1]
    return u[:, :rank] @ merge_in_joint_basis(coordinates, pruning_scale(coordinates, s[:rank], True), density)


def timed(fn):
    """``(result, CPU seconds, wall seconds)`` of ``fn()`` (CPU time is what a loaded machine leaves
    comparable; the benchmark runs on one thread)."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=["star", "drm_h"], choices=["star", "drm_h"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU-time ratios)")
    parser.add_argument(
        "--json", default=None, help="result JSON (default benchmarks/results/lowrank[.L<layers>].json; '' to skip)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = bert_shapes(args.layers)
    experts = lora_experts(shapes, args.experts, args.rank)
    base = {k: torch.zeros(s) for k, s in shapes.items()}  # the merged delta does not depend on the base
    load = os.getloadavg()
    print(
        f"{len(shapes)} matrices of BERT-base shapes, {args.experts} rank-{args.rank} LoRA experts, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {load[0]:.1f}",
        flush=True,
    )
    record = {
        "benchmark": "lowrank",
        "matrices": len(shapes),
        "layers": args.layers,
        "experts": args.experts,
        "rank": args.rank,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_before": list(load),
        "methods": {},
    }
    for method in args.methods:
        reference = {"star": star_reference, "drm_h": drm_h_reference}[method]
        merge_lowrank(method, base, experts)  # warm-up; the best of three runs is timed
        runs = [timed(lambda: merge_lowrank(method, base, experts)) for _ in range(3)]
        merged = runs[0][0]
        factored_cpu, factored_wall = min(r[1] for r in runs), min(r[2] for r in runs)
        # the reference one matrix at a time (densify, full float64 SVD, the method's steps), its
        # error taken at once so no more than one dense result is held
        dense_cpu = dense_wall = worst = 0.0
        for k in shapes:
            ref, cpu, wall = timed(lambda: reference(dense_deltas(experts, k)))
            dense_cpu, dense_wall = dense_cpu + cpu, dense_wall + wall
            worst = max(worst, float((merged.deltas[k].dense(torch.float64) - ref).norm() / ref.norm()))
            del ref
        load = os.getloadavg()
        record["methods"][method] = {
            "factored_cpu_s": factored_cpu,
            "factored_wall_s": factored_wall,
            "reference_cpu_s": dense_cpu,
            "reference_wall_s": dense_wall,
            "ratio_cpu": dense_cpu / factored_cpu,
            "ratio_wall": dense_wall / factored_wall,
            "max_relative_error": worst,
            "load_after": list(load),
            "target": {"ratio": 50, "max_relative_error": 1e-6},
            "meets_target": bool(dense_cpu / factored_cpu >= 50 and worst <= 1e-6),
        }
        print(
            f"{method:6s} factored {factored_cpu:8.3f} s CPU ({factored_wall:.3f} s wall)   "
            f"full float64 SVD {dense_cpu:8.2f} s CPU ({dense_wall:.2f} s wall)   "
            f"ratio {dense_cpu / factored_cpu:7.1f}x CPU ({dense_wall / factored_wall:.1f}x wall)   "
            f"max relative error {worst:.1e}   load {load[0]:.1f}",
            flush=True,
        )
    if args.json != "":
        out = (
            Path(args.json)
            if args.json
            else RESULTS
            / (
                "lowrank.json"
                if (args.layers, args.experts, args.rank) == (12, 3, 16)
                else f"lowrank.L{args.layers}.json"
            )
        )
        write_json(out, record)
        print(f"  -> {out}")


if __name__ == "__main__":
    main()
