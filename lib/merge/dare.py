"""DARE: drop and rescale task-vector entries (Yu et al. 2024), then sum or one of three TIES variants.

Each entry of each task vector is dropped with probability ``p`` and the survivors are scaled by
``1 / (1 - p)``, which keeps the task vector's expectation. What follows the drop (``then``), all
scaled by ``lam`` and added to the base:

``"sum"``        the sum of the dropped-and-rescaled task vectors: DARE + task arithmetic (the
                 paper's default with ``lam = 1``; seed 002's Table 2 runs TA+DARE with
                 ``lam = 0.125``). MergeLM's ``mask_merging`` with ``task_arithmetic``, PEFT's
                 and mergekit's ``dare_linear``.
``"ties"``       elect signs by summed mass, disjoint mean of the agreeing entries: PEFT's
                 ``dare_ties`` (drop, then TIES without its magnitude trim).
``"ties_sum"``   elect signs, *sum* the agreeing entries without dividing by their count:
                 mergekit's ``dare_ties`` (its default ``normalize: false``).
``"trim_ties"``  the whole of TIES on the dropped task vectors: keep each expert's top-``density``
                 magnitudes over the whole model (as ``ties`` with ``scope="model"``), elect
                 signs, disjoint mean: MergeLM's ``mask_merging`` with ``ties_merging`` (DARE's
                 own DARE-TIES), and seed 002's "TIES+DARE" (``k = 20``: ``density = 0.2``).

``density`` is used by ``"trim_ties"`` only. Where the three TIES variants elect no sign (summed
mass exactly 0) the entry merges to 0 (:mod:`lib.merge.ties`); PEFT and mergekit elect +, MergeLM
the model-wide majority sign. The references draw their masks from torch's global generator, so
no seed reproduces their masks; the distribution is the same.

The mask of (key, expert) is drawn from its own CPU generator seeded by a stable hash of the
key, the expert's index and ``seed``, never from a stream shared across keys: merging key by key
(the streaming command line) gives exactly the whole-model result, and the result does not
depend on the device or on which other keys are selected. ``"trim_ties"``'s model-wide
thresholds come from a prepass that draws the same masks.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from . import check_finite_number, check_range, register, run_items, stack
from .ties import TaskVectorItems, disjoint_mean, elect_sign, kept_count, kth_largest_magnitude, ties_merge_taus

#: what follows the drop (module docstring)
THEN = ("sum", "ties", "ties_sum", "trim_ties")


def mask_seed(key: str, expert: int, seed: int) -> int:
    """A 63-bit seed that depends only on (key, expert index, seed), stable across runs and
    Python processes (unlike ``hash``, which is salted per process)."""
    digest = hashlib.blake2b(f"{seed}\0{expert}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keep_mask(shape: torch.Size, p: float, *, key: str, expert: int, seed: int) -> Tensor:
    """Boolean mask (on the CPU) keeping each entry with probability ``1 - p``."""
    generator = torch.Generator().manual_seed(mask_seed(key, expert, seed))
    return torch.rand(shape, generator=generator) >= p


def drop_and_rescale(tau: Tensor, p: float, *, key: str, expert: int, seed: int) -> Tensor:
    mask = keep_mask(tau.shape, p, key=key, expert=expert, seed=seed).to(tau.device)
    return tau * mask / (1.0 - p)


def agreeing_sum(taus: Tensor, signs: Tensor) -> Tensor:
    """Sum over experts (dim 0) of the entries that agree with the elected sign (mergekit's
    ``dare_ties`` without normalisation); 0 where none does."""
    return (taus * (torch.sign(taus) == signs)).sum(dim=0)


def _check(p, seed, then, lam, density):
    check_range("p", p, 0.0, 1.0, high_open=True)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if then not in THEN:
        raise ValueError(
            f"then must be 'sum' (add the rescaled task vectors), 'ties' (elect sign, disjoint mean; PEFT's dare_ties), "
            f"'ties_sum' (elect sign, sum the agreeing entries; mergekit's dare_ties) or 'trim_ties' (TIES' magnitude "
            f"trim at density, elect sign, disjoint mean; MergeLM's), got {then!r}")
    check_finite_number("lam", lam)
    check_range("density", density, 0.0, 1.0)


def dropped_thresholds(items, *, p, seed, then, lam=1.0, density=0.2):
    """Prepass of ``dare``: for ``then="trim_ties"`` each expert's model-wide magnitude threshold
    over its dropped-and-rescaled task vectors (the k-th largest, ``k = ceil(density * n)``);
    None otherwise."""
    _check(p, seed, then, lam, density)
    if then != "trim_ties":
        return None

    def drop(key, expert, tau):
        return drop_and_rescale(tau, p, key=key, expert=expert, seed=seed)

    return kth_largest_magnitude(TaskVectorItems(items, drop, method="dare with then='trim_ties'"),
                                 lambda n: kept_count(n, density))


@register(
    "dare",
    description="DARE: drop task-vector entries with rate p, rescale by 1/(1-p), then sum or TIES (PEFT's, mergekit's or MergeLM's DARE-TIES), times lam",
    prepass=dropped_thresholds,
    check=_check,
    p=0.9,
    seed=0,
    then="sum",
    lam=1.0,
    density=0.2,
)
def dare(base, experts, *, context=None, p=0.9, seed=0, then="sum", lam=1.0, density=0.2):
    if then == "trim_ties" and context is None:
        context = dropped_thresholds(run_items(base, experts), p=p, seed=seed, then=then, lam=lam, density=density)
    out = {}
    for k in base:  # task vectors of one key at a time, not of the whole model
        dropped = torch.stack(
            [drop_and_rescale(tau, p, key=k, expert=i, seed=seed) for i, tau in enumerate(stack(experts, k) - base[k])]
        )
        if then == "sum":
            merged = dropped.sum(dim=0)
        elif then == "ties":
            merged = disjoint_mean(dropped, elect_sign(dropped))
        elif then == "ties_sum":
            merged = agreeing_sum(dropped, elect_sign(dropped))
        else:
            merged = ties_merge_taus(dropped, density, thresholds=context, inplace=True)
        out[k] = base[k] + lam * merged
    return out
