"""DARE: drop and rescale task-vector entries (Yu et al. 2024), optionally followed by TIES.

Each entry of each task vector is dropped with probability ``p`` and the survivors are scaled by
``1 / (1 - p)``, which keeps the task vector's expectation. ``then="sum"`` adds the rescaled task
vectors to the base (task arithmetic with lam = 1, as in the paper); ``then="ties"`` elects signs
and takes the disjoint mean of them instead (DARE-TIES: the random drop replaces TIES' magnitude
trim).

The mask of (key, expert) is drawn from its own CPU generator seeded by a stable hash of the
key, the expert's index and ``seed``, never from a stream shared across keys: merging key by key
(the streaming command line) gives exactly the whole-model result, and the result does not
depend on the device or on which other keys are selected.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from . import check_range, register
from .ties import disjoint_mean, elect_sign


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


def _check(p, seed, then):
    check_range("p", p, 0.0, 1.0, high_open=True)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if then not in ("sum", "ties"):
        raise ValueError(f"then must be 'sum' (add the rescaled task vectors) or 'ties' (elect sign, disjoint mean), got {then!r}")


@register(
    "dare",
    description="DARE: drop task-vector entries with rate p, rescale by 1/(1-p), then sum (or TIES' sign election and disjoint mean)",
    check=_check,
    p=0.9,
    seed=0,
    then="sum",
)
def dare(base, experts, *, context=None, p=0.9, seed=0, then="sum"):
    out = {}
    for k in base:  # task vectors of one key at a time, not of the whole model
        dropped = torch.stack(
            [drop_and_rescale(e[k] - base[k], p, key=k, expert=i, seed=seed) for i, e in enumerate(experts)]
        )
        merged = dropped.sum(dim=0) if then == "sum" else disjoint_mean(dropped, elect_sign(dropped))
        out[k] = base[k] + merged
    return out
