"""Low-rank task vectors, factored against dense: STAR and DRM-H on rank-16 LoRA experts of
BERT-base shapes (the 72 attention and MLP matrices of 12 layers), through :func:`lib.lora.merge_lowrank`
(QRs of the factors and small SVDs), timed against the float64 full-SVD reference of the same
merge on the densified task vectors, in the same run. Prints the time of each, their ratio and
the largest relative Frobenius error of a merged delta.

    python benchmarks/lowrank.py              # 3 experts, rank 16, 12 layers
    python benchmarks/lowrank.py --layers 2   # a quick look

The reference is what the methods cost without the factors: STAR takes ``torch.linalg.svd`` of
every ``768 x 768`` and ``768 x 3072`` task vector, DRM-H of every concatenation ``[D_1 D_2 D_3]``,
then the same rank rule, rescale, renormalisation, pruning and disjoint mean
(:mod:`lib.merge.star`, :mod:`lib.merge.drm`). Not asserted in the tests.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from lib.lora import Adapter, LowRank, merge_lowrank
from lib.merge.drm import direction_rtol, merge_in_joint_basis, pruning_scale, task_coordinates
from lib.merge.star import kept_rank

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    shapes = bert_shapes(args.layers)
    experts = lora_experts(shapes, args.experts, args.rank)
    base = {k: torch.zeros(s) for k, s in shapes.items()}  # the merged delta does not depend on the base
    print(f"{len(shapes)} matrices of BERT-base shapes, {args.experts} rank-{args.rank} LoRA experts, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for method, reference in (("star", star_reference), ("drm_h", drm_h_reference)):
        merge_lowrank(method, base, experts)  # warm-up; the best of three runs is timed
        factored = math.inf
        for _ in range(3):
            start = time.perf_counter()
            merged = merge_lowrank(method, base, experts)
            factored = min(factored, time.perf_counter() - start)
        start, worst = time.perf_counter(), 0.0
        references = {k: reference(dense_deltas(experts, k)) for k in shapes}
        dense = time.perf_counter() - start
        for k, ref in references.items():
            worst = max(worst, float((merged.deltas[k].dense(torch.float64) - ref).norm() / ref.norm()))
        print(f"{method:6s} factored {factored:8.3f} s   full float64 SVD {dense:8.2f} s   "
              f"ratio {dense / factored:7.1f}x   max relative error {worst:.1e}")


if __name__ == "__main__":
    main()
