"""DARE's steps: drop and rescale task-vector entries (Yu et al. 2024); the method itself is declared in :mod:`lib.merge.core`.

Each entry of each task vector is kept with probability ``keep`` (dropped with probability
``p = 1 - keep``, the paper's notation and this method's old hyperparameter, still accepted) and
the survivors are scaled by ``1 / keep``, which keeps the task vector's expectation. What follows the drop (``then``), all
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

#: what follows the drop (module docstring)
THEN = ("sum", "ties", "ties_sum", "trim_ties")


def mask_seed(key: str, expert: int, seed: int) -> int:
    """A 63-bit seed that depends only on (key, expert index, seed), stable across runs and
    Python processes (unlike ``hash``, which is salted per process)."""
    digest = hashlib.blake2b(f"{seed}\0{expert}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draws(shape: torch.Size, *, key: str, expert: int, seed: int) -> Tensor:
    """The uniform draws (float32, on the CPU) behind the (key, expert, seed) mask."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(mask_seed(key, expert, seed)))


def keep_mask(shape: torch.Size, p: float, *, key: str, expert: int, seed: int) -> Tensor:
    """Boolean mask (on the CPU) keeping each entry with probability ``1 - p``."""
    return draws(shape, key=key, expert=expert, seed=seed) >= p


def drop_and_rescale(tau: Tensor, p: float, *, key: str, expert: int, seed: int, inplace: bool = False) -> Tensor:
    """``tau`` with the entries outside its (key, expert, seed) mask zeroed and the rest divided by
    ``1 - p``; ``inplace`` (for a tensor the caller owns) does it inside ``tau``, same values."""
    mask = _keep_factor(tau.shape, p, key=key, expert=expert, seed=seed).to(tau.device)
    return tau.mul_(mask).div_(1.0 - p) if inplace else tau * mask / (1.0 - p)


def _keep_factor(shape: torch.Size, p: float, *, key: str, expert: int, seed: int) -> Tensor:
    """:func:`keep_mask` as float32 1.0 / 0.0 (what a product with the bool mask promotes it to,
    so the same products, but a float-by-float multiply costs a third of a float-by-bool one):
    the same draws and the same comparison ``r >= p``, written as 1.0 / 0.0 into the draws'
    own buffer (one pass, no second tensor)."""
    if p <= 0.0:
        return keep_mask(shape, p, key=key, expert=expert, seed=seed)
    r = draws(shape, key=key, expert=expert, seed=seed)
    return torch.ge(r, p, out=r)


def agreeing_sum(taus: Tensor, signs: Tensor) -> Tensor:
    """Sum over experts (dim 0) of the entries that agree with the elected sign (mergekit's
    ``dare_ties`` without normalisation); 0 where none does."""
    return (taus * (torch.sign(taus) == signs)).sum(dim=0)
