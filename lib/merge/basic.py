"""The two simplest merges: a (weighted) average of the experts and task arithmetic."""

from __future__ import annotations

import torch

from . import check_finite_number, register


def _check_weights(weights=None):
    if weights is None:
        return
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.ndim != 1 or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be a list of finite, non-negative numbers, not all zero (one per expert), got {weights!r}")


@register("average", description="arithmetic (or weighted) mean of the experts: the report's Standard merge",
          needs_base=False, check=_check_weights, elementwise=True, weights=None)
def average(base, experts, *, context=None, weights=None):
    n = len(experts)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have one entry per expert ({n}), got {len(w)}")
    w = (w / w.sum()).tolist()
    out = {}
    for k in experts[0]:
        # one accumulator per key instead of a stack of all N experts: the merge's only temporary
        mean = experts[0][k] * w[0]
        for weight, e in zip(w[1:], experts[1:]):
            mean.add_(e[k], alpha=weight)
        out[k] = mean
    return out


@register("task_arithmetic", description="base + lam * sum of task vectors (Ilharco et al. 2023)",
          check=lambda lam: check_finite_number("lam", lam), elementwise=True, lam=1.0)
def task_arithmetic(base, experts, *, context=None, lam=1.0):
    out = {}
    for k in base:
        # Two buffers per key rather than N task vectors: the sum is accumulated in the same order
        # as sum(expert - base), so the result is bit for bit what it was before.
        total = experts[0][k] - base[k]
        tau = torch.empty_like(total)
        for e in experts[1:]:
            total.add_(torch.sub(e[k], base[k], out=tau))
        out[k] = total.mul_(lam).add_(base[k])
    return out
