"""The two simplest merges: a (weighted) average of the experts and task arithmetic."""

from __future__ import annotations

import torch

from . import check_finite_number, register


def _check_weights(weights=None, *, normalised: bool = True):
    """``weights``: None, or a list of finite numbers (one per expert); non-negative and not all
    zero when they are normalised to sum to one (an average), any sign otherwise (task
    arithmetic: a negative weight negates a task)."""
    if weights is None:
        return
    numbers = isinstance(weights, (list, tuple)) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in weights)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64) if numbers else None
    if w is None or w.ndim != 1 or len(w) == 0 or not torch.isfinite(w).all() or (normalised and ((w < 0).any() or w.sum() <= 0)):
        raise ValueError(f"weights must be a list of finite{', non-negative' if normalised else ''} numbers{', not all zero' if normalised else ''} "
                         f"(one per expert, e.g. [0.7, 0.3]), got {weights!r}")


def _per_expert(weights, n: int) -> list[float]:
    if len(weights) != n:
        raise ValueError(f"weights must have one entry per expert ({n}), got {len(weights)}: {list(weights)!r}")
    return [float(x) for x in weights]


@register("average", description="arithmetic (or weighted) mean of the experts: the report's Standard merge",
          needs_base=False, check=_check_weights, elementwise=True, weights=None)
def average(base, experts, *, context=None, weights=None):
    n = len(experts)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else torch.tensor(_per_expert(weights, n), dtype=torch.float64)
    w = (w / w.sum()).tolist()
    out = {}
    for k in experts[0]:
        # one accumulator per key instead of a stack of all N experts: the merge's only temporary
        mean = experts[0][k] * w[0]
        for weight, e in zip(w[1:], experts[1:]):
            mean.add_(e[k], alpha=weight)
        out[k] = mean
    return out


def _check_task_arithmetic(lam, weights):
    check_finite_number("lam", lam)
    _check_weights(weights, normalised=False)


@register("task_arithmetic", description="base + lam * sum of (weighted) task vectors (Ilharco et al. 2023)",
          check=_check_task_arithmetic, elementwise=True, lam=1.0, weights=None)
def task_arithmetic(base, experts, *, context=None, lam=1.0, weights=None):
    """``base + lam * sum_t w_t (expert_t - base)``; ``weights`` (default: all 1) are per-expert
    factors, not normalised, as mergekit's per-model ``weight`` for its ``task_arithmetic``."""
    w = None if weights is None else _per_expert(weights, len(experts))
    out = {}
    for k in base:
        # Two buffers per key rather than N task vectors: the sum is accumulated in the same order
        # as sum(expert - base), so the result is bit for bit what it was before.
        total = experts[0][k] - base[k]
        if w is not None:
            total.mul_(w[0])
        tau = torch.empty_like(total)
        for i, e in enumerate(experts[1:], start=1):
            torch.sub(e[k], base[k], out=tau)
            total.add_(tau if w is None else tau.mul_(w[i]))
        out[k] = total.mul_(lam).add_(base[k])
    return out
