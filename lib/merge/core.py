"""Generalized task arithmetic: sparsify x consensus x ``lam``, the core behind task arithmetic, TIES and DARE.

Every method of this family merges one key's task vectors ``tau_t = expert_t - base`` in three
steps and returns ``base + lam * merged``:

1. sparsify each ``tau_t``: nothing; a random drop (DARE: keep each entry with probability
   ``keep``, rescale the survivors by ``1 / keep``, :mod:`lib.merge.dare`); a magnitude trim
   (TIES: keep the ``density`` fraction of largest ``|tau|``, over each expert's whole model with
   ``scope="model"`` or per tensor with ``scope="tensor"``, :mod:`lib.merge.ties`); or a drop,
   then a trim (MergeLM's DARE-TIES);
2. consensus over experts: none (the sum); or a sign election by total mass (TIES', PEFT's
   ``"total"``) followed by the mean (``"mean"``, TIES' disjoint mean) or the sum (``"sum"``,
   mergekit's ``dare_ties``) of the entries that agree with it;
3. scale by ``lam`` and add to the base.

A method is a :class:`Recipe` made from its hyperparameters, declared with :func:`declare` in a
line (the end of this file), as mergekit's ``GeneralizedTaskArithmeticMerge`` and PEFT's
``merge_utils`` compose theirs. Conventions (kept counts, ties at the threshold, zero-mass signs,
the mask seeds) are stated in :mod:`lib.merge.ties` and :mod:`lib.merge.dare`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import check_finite_number, check_range, register
from .basic import check_weights, per_expert
from .dare import THEN, agreeing_sum, drop_and_rescale
from .ties import (
    TaskVectorItems,
    disjoint_mean,
    elect_sign,
    floor_kept_count,
    kept_count,
    kth_largest_magnitude,
    trim_below,
    trim_topk,
)

#: consensus: how the (sparsified) task vectors of the experts become one
CONSENSUS = (None, "mean", "sum")


@dataclass(frozen=True)
class Recipe:
    """One configuration of the core (module docstring); ``None`` turns a step off."""

    keep: float | None = None  # random drop: probability an entry survives
    seed: int = 0
    density: float | None = None  # magnitude trim: fraction of the entries kept
    scope: str = "model"
    consensus: str | None = None
    lam: float = 1.0
    weights: tuple[float, ...] | None = None  # per-expert factors of the task vectors

    @property
    def model_wide(self) -> bool:
        """Whether the trim needs each expert's threshold over the whole model (a prepass)."""
        return self.density is not None and self.scope == "model"

    @property
    def elementwise(self) -> bool:
        """A drop draws its mask for the whole tensor and a per-tensor trim ranks it whole."""
        return self.keep is None and (self.density is None or self.scope == "model")


def merge_tensor(recipe: Recipe, base: Tensor, experts: list[Tensor], *, key: str, thresholds=None) -> Tensor:
    """One key merged by ``recipe``: ``base + lam * consensus(sparsify(experts - base))``;
    ``thresholds`` are the prepass's per-expert magnitude thresholds (``scope="model"``)."""
    r = recipe
    weights = None if r.weights is None else per_expert(r.weights, len(experts))
    if r.keep is None and r.density is None and r.consensus is None:
        return weighted_sum(base, experts, weights).mul_(r.lam).add_(base)
    # task vectors of one key at a time, subtracted in place in their stack: N copies of the tensor, not 2N
    taus = torch.stack(experts).sub_(base)
    if weights is not None:
        taus.mul_(torch.tensor(weights, dtype=taus.dtype, device=taus.device).reshape(-1, *[1] * base.ndim))
    if r.keep is not None:
        for i, tau in enumerate(taus):  # inside the stack: no second copy of it
            drop_and_rescale(tau, 1.0 - r.keep, key=key, expert=i, seed=r.seed, inplace=True)
    if r.density is not None:
        if r.scope == "model":
            taus = trim_below(taus, thresholds, inplace=True)
        else:
            taus = trim_topk(taus, r.density, batch_dims=1, count=floor_kept_count, inplace=True)
    if r.consensus is None:
        merged = taus.sum(dim=0)
    elif r.consensus == "mean":
        merged = disjoint_mean(taus, elect_sign(taus), inplace=True)
    else:
        merged = agreeing_sum(taus, elect_sign(taus))
    # merged is a new tensor: scaled and shifted in place (the same values as base + lam * merged)
    return (merged if r.lam == 1 else merged.mul_(r.lam)).add_(base)


def weighted_sum(base: Tensor, experts: list[Tensor], weights=None) -> Tensor:
    """``sum_t w_t (expert_t - base)`` with two buffers rather than N task vectors, accumulated in
    the order of ``sum(expert - base)`` (``weights`` None: all 1)."""
    total = experts[0] - base
    if weights is not None:
        total.mul_(weights[0])
    tau = torch.empty_like(total)
    for i, e in enumerate(experts[1:], start=1):
        torch.sub(e, base, out=tau)
        total.add_(tau if weights is None else tau.mul_(weights[i]))
    return total


def model_thresholds(recipe: Recipe, items, *, method: str) -> list[float] | None:
    """Each expert's model-wide magnitude threshold over its (dropped, when the recipe drops)
    task vectors: the k-th largest, ``k = ceil(density * n)`` (:func:`lib.merge.ties.kept_count`);
    None where the recipe needs none. Reads ``items`` twice (:func:`kth_largest_magnitude`)."""
    if not recipe.model_wide:
        return None
    drop = None
    if recipe.keep is not None:

        def drop(key, expert, tau):
            return drop_and_rescale(tau, 1.0 - recipe.keep, key=key, expert=expert, seed=recipe.seed)

    return kth_largest_magnitude(TaskVectorItems(items, drop, method=method), lambda n: kept_count(n, recipe.density))


def declare(
    name: str, recipe: Callable[..., Recipe], *, check: Callable[..., None], prepass: bool = False, **registration
) -> None:
    """Register ``name`` as the core with ``recipe(**hp)``: its per-tensor function, its prepass
    (when ``prepass``: some hyperparameters trim against model-wide thresholds), its
    ``elementwise`` flag (:class:`Recipe`), and its registry entry (:func:`lib.merge.register`)."""
    label = registration.pop("prepass_label", name)

    def fn(base, experts, *, key, context=None, **hp):
        return merge_tensor(recipe(**hp), base, experts, key=key, thresholds=context)

    def thresholds(items, **hp):
        check(**hp)
        return model_thresholds(recipe(**hp), items, method=label)

    fn.__name__ = fn.__qualname__ = name
    register(
        name,
        family="task_arithmetic",
        check=check,
        prepass=thresholds if prepass else None,
        elementwise=lambda **hp: recipe(**hp).elementwise,
        **registration,
    )(fn)


# ----------------------------------------------------------------------------------- the methods


def _check_task_arithmetic(lam, weights):
    check_finite_number("lam", lam)
    check_weights(weights, normalised=False)


def _check_ties(density, lam, scope):
    check_range("density", density, 0.0, 1.0)
    check_finite_number("lam", lam)
    if scope not in ("model", "tensor"):
        raise ValueError(
            f"scope must be 'model' (one magnitude threshold per expert over all tensors) or 'tensor', got {scope!r}"
        )


def _check_dare(keep, seed, then, lam, density):
    check_range("keep", keep, 0.0, 1.0, low_open=True)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if then not in THEN:
        raise ValueError(
            f"then must be 'sum' (add the rescaled task vectors), 'ties' (elect sign, disjoint mean; PEFT's dare_ties), "
            f"'ties_sum' (elect sign, sum the agreeing entries; mergekit's dare_ties) or 'trim_ties' (TIES' magnitude "
            f"trim at density, elect sign, disjoint mean; MergeLM's), got {then!r}"
        )
    check_finite_number("lam", lam)
    check_range("density", density, 0.0, 1.0)


def _keep_from_p(p) -> float:
    """DARE's old hyperparameter ``p`` (drop rate) as ``keep``; rounded so that ``p=0.9`` reads
    ``keep=0.1``, and ``1 - keep`` gives back ``p`` exactly for every ``p >= 0.5``."""
    check_range("p", p, 0.0, 1.0, high_open=True)
    return round(1.0 - float(p), 12)


#: what DARE's ``then`` means in the core: (trim after the drop, consensus)
DARE_THEN = {"sum": (False, None), "ties": (False, "mean"), "ties_sum": (False, "sum"), "trim_ties": (True, "mean")}


def _dare(keep, seed, then, lam, density):
    trim, consensus = DARE_THEN[then]
    return Recipe(keep=keep, seed=seed, density=density if trim else None, consensus=consensus, lam=lam)


declare(
    "task_arithmetic",
    lambda lam, weights: Recipe(lam=lam, weights=None if weights is None else tuple(weights)),
    check=_check_task_arithmetic,
    version=1,
    description="base + lam * sum of (weighted) task vectors (Ilharco et al. 2023)",
    reference="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089; "
    "https://github.com/mlfoundations/task_vectors",
    lam=1.0,
    weights=None,
)
declare(
    "ties",
    lambda density, lam, scope: Recipe(density=density, scope=scope, consensus="mean", lam=lam),
    check=_check_ties,
    prepass=True,
    prepass_elementwise=True,
    version=1,
    description="TIES: trim each task vector to its top-density magnitudes, elect signs by mass, disjoint mean (Yadav et al. 2023)",
    reference="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023, arXiv:2306.01708; "
    "https://github.com/prateeky2806/ties-merging",
    density=0.2,
    lam=1.0,
    scope="model",
)
declare(
    "dare",
    _dare,
    check=_check_dare,
    prepass=True,
    prepass_label="dare with then='trim_ties'",
    version=1,
    aliases={"p": ("keep", _keep_from_p)},
    description="DARE: keep task-vector entries with probability keep, rescale by 1/keep, then sum or TIES "
    "(PEFT's, mergekit's or MergeLM's DARE-TIES), times lam",
    reference="Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, "
    "ICML 2024, arXiv:2311.03099; https://github.com/yule-BUAA/MergeLM",
    keep=0.1,
    seed=0,
    then="sum",
    lam=1.0,
    density=0.2,
)
