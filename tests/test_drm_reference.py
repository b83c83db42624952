"""DRM (issue 16) against a slow reference transcribed from the official algorithm
(yophis/decom-renorm-merge, ``right_drm``; ``left_drm`` is the same on the transposes): a full
float64 SVD of the concatenated deltas, the split ``Vᵀ`` renormalised row by row, one top-k over
the stacked blocks (or one per block), sign election by mass and the disjoint mean.

The reference takes each convention on which :mod:`lib.merge.drm` departs from the official code
as a switch, so one function states both: ``OURS`` (what the fast path must match to 1e-6) and
``OFFICIAL`` (what the official code does: round-off rows renormalised, ``round(d L) + 1`` entries
kept, zero-mass entries given the matrix's majority sign, the deltas' disjoint mean at density 1).
One liberty shared by both: magnitudes are ranked by their float32 rounding, as
:func:`lib.merge.ties.trim_topk` ranks them, so that float64 values which round to the same
float32 cannot make the two sides keep different entries.

And the property the official code lacks: DRM-H(Q D) = Q DRM-H(D) for an orthogonal ``Q`` (DRM-V:
DRM-V(D Q) = DRM-V(D) Q), also for tasks whose column spaces are orthogonal, where one task's
coordinates of another task's components are pure round-off.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_star_drm import low_rank_plus_noise, relative_error

from lib.merge import merge
from lib.merge.drm import drm_h_deltas, drm_v_deltas, prune_in_joint_basis

TOLERANCE = 1e-6
OURS = dict(zero_round_off=True, kept="ceil", zero_mass="zero", full_density="drm")
OFFICIAL = dict(zero_round_off=False, kept="round+1", zero_mass="majority", full_density="deltas")


def kept_mask(magnitudes, density, kept):
    """Which of the ``magnitudes`` (a flat float32 tensor) a top-``density`` trim keeps: every one at
    least as large as the k-th largest, ``k = ceil(d L)`` (ours) or ``round(d L) + 1`` (the
    official ``zero_out_non_topk``: at least the ``(L - round(d L))``-th smallest)."""
    n = magnitudes.numel()
    k = math.ceil(density * n * (1 - 1e-12)) if kept == "ceil" else round(density * n) + 1
    if k <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    threshold = magnitudes.sort(descending=True).values[min(k, n) - 1]
    return magnitudes >= threshold


def official_drm_h(
    deltas,
    density=0.2,
    *,
    rtol=1e-2,
    renorm=True,
    prune="joint",
    zero_round_off=True,
    kept="ceil",
    zero_mass="zero",
    full_density="drm",
):
    """The official ``right_drm`` for one matrix's deltas ``(N, m, n)``, in float64, with the
    conventions as switches (module docstring). Returns the merged delta ``(m, n)`` before lam."""
    x = deltas.double()
    n_tasks, m, n = x.shape
    if density == 1.0 and full_density == "deltas":  # the official code skips DRM at density 1
        return x.sum(0) / (x != 0).sum(0).clamp(min=1)
    u, s, vh = torch.linalg.svd(torch.cat(list(x), dim=1), full_matrices=False)  # [D_1 ... D_N]
    r = int((s > rtol * s.max()).sum())
    u, s, vh = u[:, :r], s[:r], vh[:r]
    blocks = vh.reshape(r, n_tasks, n).transpose(0, 1)  # V_tᵀ, (N, r, n)
    norms = blocks.norm(dim=-1, keepdim=True)
    if zero_round_off:  # a row of S V_tᵀ below sqrt(eps) of the largest one is round-off
        row = s[:, None] * norms
        blocks = blocks * (row > torch.finfo(deltas.dtype).eps ** 0.5 * row.max())
        norms = blocks.norm(dim=-1, keepdim=True)
    if renorm:
        directions = torch.where(norms > 0, blocks / torch.where(norms > 0, norms, 1.0), 0.0)
        weights = s[:, None] * norms  # S_t = S diag(|v_t,i|)
    else:
        directions, weights = blocks, s[:, None].expand(n_tasks, r, 1)
    magnitudes = directions.abs().float()
    if prune == "joint":
        mask = kept_mask(magnitudes.flatten(), density, kept).reshape(directions.shape)
    else:
        mask = torch.stack([kept_mask(t.flatten(), density, kept).reshape(t.shape) for t in magnitudes])
    pruned = weights * directions * mask
    signs = pruned.sum(0).sign()
    if zero_mass == "majority":
        signs[signs == 0] = signs.sum().sign()
    agree = (pruned.sign() == signs) & (pruned != 0)
    return u @ ((pruned * agree).sum(0) / agree.sum(0).clamp(min=1))


def official_drm_v(deltas, density=0.2, **kw):
    """``left_drm``: the same on the transposed deltas (a shared row basis)."""
    return official_drm_h(deltas.mT, density, **kw).mT


def fast_and_reference(variant):
    return (drm_h_deltas, official_drm_h) if variant == "h" else (drm_v_deltas, official_drm_v)


# ----------------------------------------------------------------------------- fast path = reference


@pytest.mark.parametrize("prune", ["joint", "per_task"])
@pytest.mark.parametrize("variant", ["h", "v"])
@pytest.mark.parametrize(
    "n_tasks,m,n", [pytest.param(3, 768, 768, id="3x768x768"), pytest.param(2, 768, 3072, id="2x768x3072")]
)
def test_fast_path_matches_the_official_algorithm_on_bert_shapes(n_tasks, m, n, variant, prune):
    deltas = low_rank_plus_noise(n_tasks, m, n, spike=10.0, seed=11)
    fast, reference = fast_and_reference(variant)
    merged = fast(deltas[None], prune=prune)[0]
    assert merged.dtype == deltas.dtype and merged.shape == (m, n)
    assert relative_error(merged, reference(deltas, prune=prune, **OURS)) <= TOLERANCE


@pytest.mark.parametrize("variant", ["h", "v"])
@pytest.mark.parametrize(
    "hp",
    [
        dict(density=1.0),
        dict(density=0.5, rtol=0.0),
        dict(density=0.1, renorm=False),
        dict(density=0.3, prune="per_task", rtol=0.05),
    ],
)
def test_options_match_the_official_algorithm(variant, hp):
    deltas = low_rank_plus_noise(3, 96, 64, rank=6, spike=5.0, seed=12, dtype=torch.float64)
    fast, reference = fast_and_reference(variant)
    hp = dict(hp)
    density = hp.pop("density")
    assert (
        relative_error(fast(deltas[None], density=density, **hp)[0], reference(deltas, density, **hp, **OURS))
        <= TOLERANCE
    )


@pytest.mark.parametrize("prune", ["joint", "per_task"])
def test_unchanged_expert_matches_the_official_algorithm(prune):
    """An expert equal to the base: its split ``Vᵀ`` block is round-off (the official code would
    renormalise it to unit rows), its coordinates ``Uᵀ D_t`` exact zeros; both are zero here. Per
    task it then changes nothing; jointly its zero entries count in the ranked total, as in the
    official code, so the other tasks keep more of theirs."""
    deltas = low_rank_plus_noise(3, 80, 48, rank=4, seed=13)
    deltas[2] = 0
    merged = drm_h_deltas(deltas[None], prune=prune)[0]
    assert relative_error(merged, official_drm_h(deltas, prune=prune, **OURS)) <= TOLERANCE
    without = drm_h_deltas(deltas[None, :2], prune=prune)[0]
    assert (relative_error(merged, without) <= TOLERANCE) == (prune == "per_task")


# ----------------------------------------------------------------------------- rotation equivariance


def orthogonal_tasks(n_tasks, m, n, rank, *, seed):
    """Deltas ``(N, m, n)`` whose column spaces are mutually orthogonal (rank ``rank`` each, distinct
    singular values), in float64."""
    g = torch.Generator().manual_seed(seed)
    columns = torch.linalg.qr(torch.randn(m, n_tasks * rank, generator=g, dtype=torch.float64))[0]
    deltas = []
    for t in range(n_tasks):
        v = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
        strengths = 0.5 + 10 * torch.rand(rank, generator=g, dtype=torch.float64)
        deltas.append((columns[:, t * rank : (t + 1) * rank] * strengths) @ v.T)
    return torch.stack(deltas)


def random_orthogonal(size, seed):
    return torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[
        0
    ]


def rotation_error(variant, deltas, q, **hp):
    """Relative distance between DRM of the rotated deltas and the rotated DRM: ``Q D`` for DRM-H
    (the column space turns), ``D Q`` for DRM-V (the row space turns)."""
    if variant == "h":
        return relative_error(drm_h_deltas((q @ deltas)[None], **hp)[0], q @ drm_h_deltas(deltas[None], **hp)[0])
    return relative_error(drm_v_deltas((deltas @ q)[None], **hp)[0], drm_v_deltas(deltas[None], **hp)[0] @ q)


@pytest.mark.parametrize("prune", ["joint", "per_task"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("variant", ["h", "v"])
@pytest.mark.parametrize("kind", ["orthogonal", "low_rank_plus_noise"])
def test_drm_is_rotation_equivariant(kind, variant, density, prune):
    """Measured before round-off rows were zeroed (orthogonal column spaces, 128x80): 26 % to 49 %
    off, for the official code's conventions see ``test_official_conventions_are_not_rotation_equivariant``."""
    m, n = 128, 80
    if kind == "orthogonal":
        deltas = orthogonal_tasks(2, m, n, 6, seed=14)
        deltas = deltas if variant == "h" else deltas.mT.contiguous()  # DRM-V: orthogonal row spaces
    else:
        deltas = low_rank_plus_noise(3, m, n, rank=6, seed=15, dtype=torch.float64)
    q = random_orthogonal(deltas.shape[1] if variant == "h" else deltas.shape[2], seed=16)
    assert rotation_error(variant, deltas, q, density=density, prune=prune) <= TOLERANCE


def test_official_conventions_are_not_rotation_equivariant():
    """The same rotation through the official conventions: the round-off rows of each task in the
    other's components are renormalised to unit length and vote (measured at density 1 and 0.2
    in the report of issue 16)."""
    deltas = orthogonal_tasks(2, 128, 80, 6, seed=14)
    q = random_orthogonal(128, seed=16)
    for density in (0.5, 0.2):
        rotated = official_drm_h(q @ deltas, density, **OFFICIAL)
        assert relative_error(rotated, q @ official_drm_h(deltas, density, **OFFICIAL)) > 0.05


def test_orthogonal_tasks_at_full_density_and_rank_add_up():
    """Every component belongs to one task and the other's coordinates are zero: nothing conflicts,
    every disjoint mean has one voter, and DRM-H at density 1 without a rank cut is the sum of the
    deltas (task arithmetic with lam = 1), in any rotation."""
    deltas = orthogonal_tasks(2, 64, 40, 5, seed=17)
    q = random_orthogonal(64, seed=18)
    for d in (deltas, q @ deltas):
        assert relative_error(drm_h_deltas(d[None], density=1.0, rtol=0.0)[0], d.sum(0)) <= TOLERANCE


# ----------------------------------------------------------------------------- pruning conventions


def test_joint_pruning_keeps_ceil_of_all_entries_and_per_task_of_each_block():
    g = torch.Generator().manual_seed(19)
    coordinates = torch.randn(3, 7, 11, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.2]).reshape(
        3, 1, 1
    )
    scale = coordinates.norm(dim=-1, keepdim=True)
    joint = prune_in_joint_basis(coordinates, scale, 0.2, "joint")
    per_task = prune_in_joint_basis(coordinates, scale, 0.2, "per_task")
    assert int((joint != 0).sum()) == math.ceil(0.2 * 3 * 7 * 11)  # 47 of 231, wherever they are
    assert (per_task != 0).sum((1, 2)).tolist() == [math.ceil(0.2 * 7 * 11)] * 3  # 16 of each 77
    assert not torch.equal(joint != 0, per_task != 0)


def test_default_is_joint_pruning(tiny_base, tiny_experts):
    default = merge("drm_h", tiny_base, tiny_experts)
    joint = merge("drm_h", tiny_base, tiny_experts, prune="joint")
    per_task = merge("drm_h", tiny_base, tiny_experts, prune="per_task")
    assert all(torch.equal(default[k], joint[k]) for k in default)
    assert not torch.equal(default["fc2.weight"], per_task["fc2.weight"])


def test_prune_must_be_joint_or_per_task(tiny_base, tiny_experts):
    with pytest.raises(ValueError, match="prune must be 'joint'"):
        merge("drm_v", tiny_base, tiny_experts, prune="individual")
