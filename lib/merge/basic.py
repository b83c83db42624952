"""The two simplest merges: a (weighted) average of the experts and task arithmetic."""

from __future__ import annotations

import torch

from . import check_finite_number, register, stack, task_vectors


def _check_weights(weights=None):
    if weights is None:
        return
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.ndim != 1 or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be a list of finite, non-negative numbers, not all zero (one per expert), got {weights!r}")


@register("average", description="arithmetic (or weighted) mean of the experts: the report's Standard merge",
          needs_base=False, check=_check_weights, weights=None)
def average(base, experts, *, context=None, weights=None):
    n = len(experts)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have one entry per expert ({n}), got {len(w)}")
    w = w / w.sum()
    ref = experts[0]
    return {k: torch.einsum("n,n...->...", w.to(ref[k]), stack(experts, k)) for k in ref}


@register("task_arithmetic", description="base + lam * sum of task vectors (Ilharco et al. 2023)",
          check=lambda lam: check_finite_number("lam", lam), lam=1.0)
def task_arithmetic(base, experts, *, context=None, lam=1.0):
    taus = task_vectors(base, experts)
    return {k: base[k] + lam * sum(t[k] for t in taus) for k in base}
