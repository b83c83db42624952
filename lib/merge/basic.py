"""The simplest merge: a (weighted) average of the experts (task arithmetic is in :mod:`lib.merge.core`)."""

from __future__ import annotations

import torch

from . import register


def check_weights(weights=None, *, normalised: bool = True):
    """``weights``: None, or a list of finite numbers (one per expert); non-negative and not all
    zero when they are normalised to sum to one (an average), any sign otherwise (task
    arithmetic: a negative weight negates a task)."""
    if weights is None:
        return
    numbers = isinstance(weights, (list, tuple)) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in weights
    )
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64) if numbers else None
    if (
        w is None
        or w.ndim != 1
        or len(w) == 0
        or not torch.isfinite(w).all()
        or (normalised and ((w < 0).any() or w.sum() <= 0))
    ):
        raise ValueError(
            f"weights must be a list of finite{', non-negative' if normalised else ''} numbers{', not all zero' if normalised else ''} "
            f"(one per expert, e.g. [0.7, 0.3]), got {weights!r}"
        )


def per_expert(weights, n: int) -> list[float]:
    """``weights`` as floats, checked to have one entry per expert."""
    if len(weights) != n:
        raise ValueError(f"weights must have one entry per expert ({n}), got {len(weights)}: {list(weights)!r}")
    return [float(x) for x in weights]


@register(
    "average",
    family="average",
    description="arithmetic (or weighted) mean of the experts: the report's Standard merge",
    reference="Wortsman et al., Model soups, ICML 2022, arXiv:2203.05482; https://github.com/mlfoundations/model-soups",
    needs_base=False,
    check=check_weights,
    elementwise=True,
    weights=None,
)
def average(base, experts, *, weights):
    n = len(experts)
    w = (
        torch.full((n,), 1.0 / n, dtype=torch.float64)
        if weights is None
        else torch.tensor(per_expert(weights, n), dtype=torch.float64)
    )
    w = (w / w.sum()).tolist()
    # one accumulator instead of a stack of all N experts: the merge's only temporary
    mean = experts[0] * w[0]
    for weight, e in zip(w[1:], experts[1:]):
        mean.add_(e, alpha=weight)
    return mean
