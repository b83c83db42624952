"""STAR and DRM (issue 4): the fast Gram-eigendecomposition paths against slow, obviously-correct
references written from the papers with full float64 SVDs, one matrix at a time; and the batched
helpers of :mod:`lib.linalg` they rest on.

The references are the papers' steps verbatim (seed 002, Alg. 1; seed 004, Sec. 4.2, steps 1-7);
they share only TIES' trim / elect / disjoint-mean steps with the fast code, which
``lib.merge.ties`` tests on their own. One liberty: DRM's per-task blocks are read from the
paper's eq. 4 (``D_t = U S V_tᵀ``, so ``V_tᵀ = S⁻¹ Uᵀ D_t``) rather than cut out of the full
``Vᵀ``; the two are equal in exact arithmetic, but only the first is exactly zero for an expert
equal to the base, and the disjoint mean counts any non-zero entry, round-off included (rows below
sqrt(eps) of the largest are zeroed on both sides, see ``lib.merge.drm``; the official algorithm's
own transcription is in ``test_drm_reference.py``). Agreement is required to 1e-4 relative Frobenius error on
low-rank-plus-noise deltas of BERT shapes, where a float32 Gram path would fail (see the module
docstrings of ``lib.merge.star`` and ``lib.merge.drm``).
"""

from __future__ import annotations

import math

import pytest
import torch

from lib.linalg import gram_eigh, map_matrix_stacks, shape_batches, thin_svd
from lib.merge import merge
from lib.merge.drm import drm_h_deltas, drm_v_deltas
from lib.merge.star import kept_rank, star_truncate
from lib.merge.ties import disjoint_mean, elect_sign, trim_topk

TOLERANCE = 1e-4


def relative_error(actual, expected) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def low_rank_plus_noise(n_tasks, m, n, *, rank=16, spike=30.0, seed=0, dtype=torch.float32):
    """``n_tasks`` deltas ``(m, n)``: a rank-``rank`` part with singular values from ``spike`` down
    to ``spike/10`` times the noise's edge, plus i.i.d. noise, at the scale of fine-tuning updates."""
    g = torch.Generator().manual_seed(seed)
    deltas = []
    for _ in range(n_tasks):
        u = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
        strengths = spike * torch.logspace(0, -1, rank, dtype=torch.float64)
        noise = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(max(m, n))
        deltas.append(1e-3 * ((u * strengths) @ v.T + noise))
    return torch.stack(deltas).to(dtype)


# ----------------------------------------------------------------------------- references


def star_reference(tau, eta, rescale=True):
    """Seed 002, Alg. 1, for one matrix: full SVD, smallest rank reaching eta % of the nuclear
    norm, rescale the kept singular values to the nuclear norm, reconstruct."""
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    if s.sum() == 0:
        return torch.zeros_like(tau, dtype=torch.float64)
    r = next(k for k in range(1, len(s) + 1) if s[:k].sum() >= eta / 100 * s.sum() or k == len(s))
    kept = s[:r] * (s.sum() / s[:r].sum() if rescale else 1.0)
    return u[:, :r] @ torch.diag(kept) @ vh[:r]


def _unit(vectors, norms):
    """``vectors / norms``, with 0 where the norm is 0 (an all-zero block row stays zero)."""
    return torch.where(norms > 0, vectors / torch.where(norms > 0, norms, 1.0), 0.0)


def _directions(norms, dtype):
    """Which rows of ``S V_tᵀ`` (columns of ``U_t S``), given their ``norms``, are directions: those
    above sqrt(eps) of the deltas' ``dtype`` times the largest; the others are round-off and set to
    zero (``lib.merge.drm``)."""
    return norms > torch.finfo(dtype).eps ** 0.5 * norms.max()


def drm_h_reference(deltas, density=0.2, lam=1.0, renorm=True, rtol=1e-2, prune="joint"):
    """Seed 004, Sec. 4.2: [D_1 ... D_N] = U S [V_1ᵀ ... V_Nᵀ], cut at rtol * s_max, renormalise
    the rows of each V_tᵀ into S_t, prune (jointly over all tasks, appendix H.3, or per task),
    elect signs, disjoint mean, U (.)"""
    u, s, _ = torch.linalg.svd(torch.cat(list(deltas.double()), dim=1), full_matrices=False)
    r = int((s > rtol * s[0]).sum())
    u, s = u[:, :r], s[:r]
    blocks = (u.T @ deltas.double()) / s[:, None]  # V_tᵀ, (N, r, n), from D_t = U S V_tᵀ (see module doc)
    blocks = blocks * _directions(s[:, None] * blocks.norm(dim=2, keepdim=True), deltas.dtype)
    norms = blocks.norm(dim=2, keepdim=True) if renorm else torch.ones(len(deltas), r, 1, dtype=torch.float64)
    sigma_t = s[None, :, None] * norms  # S_t = S diag(|v_t,i|)
    pruned = sigma_t * trim_topk(_unit(blocks, norms), density, batch_dims=int(prune == "per_task"))
    return lam * u @ disjoint_mean(pruned, elect_sign(pruned))


def drm_v_reference(deltas, density=0.2, lam=1.0, renorm=True, rtol=1e-2, prune="joint"):
    """The vertical variant: [D_1; ...; D_N] = [U_1; ...; U_N] S Vᵀ, renormalise the columns of
    each U_t, and the same steps on U_t S_t."""
    _, s, vh = torch.linalg.svd(torch.cat(list(deltas.double()), dim=0), full_matrices=False)
    r = int((s > rtol * s[0]).sum())
    s, vh = s[:r], vh[:r]
    blocks = (deltas.double() @ vh.T) / s  # U_t, (N, m, r), from D_t = U_t S Vᵀ
    blocks = blocks * _directions(s * blocks.norm(dim=1, keepdim=True), deltas.dtype)
    norms = blocks.norm(dim=1, keepdim=True) if renorm else torch.ones(len(deltas), 1, r, dtype=torch.float64)
    sigma_t = s[None, None, :] * norms
    pruned = sigma_t * trim_topk(_unit(blocks, norms), density, batch_dims=int(prune == "per_task"))
    return lam * disjoint_mean(pruned, elect_sign(pruned)) @ vh


def state_dict_reference(base, experts, merge_matrix, merge_other):
    """base + merge_matrix(deltas of one matrix (N, m, n)) per matrix (conv kernels as (out, rest)),
    base + merge_other(deltas) for the other floating-point tensors."""
    out = {}
    for k, w in base.items():
        if not torch.is_floating_point(w):
            out[k] = w
            continue
        deltas = torch.stack([e[k] for e in experts]).double() - w.double()
        merged = merge_matrix(deltas.flatten(2)).reshape(w.shape) if w.ndim >= 2 else merge_other(deltas)
        out[k] = (w.double() + merged).to(w.dtype)
    return out


# ----------------------------------------------------------------------------- STAR


@pytest.mark.parametrize(
    "shape,spike",
    [((768, 3072), 30.0), ((3072, 768), 3.0), ((96, 64), 30.0), ((64, 96), 1.0)],
    ids=["768x3072-strong", "3072x768-weak", "96x64", "64x96"],
)
def test_star_fast_path_matches_full_svd_reference(shape, spike):
    """A strong low-rank part is where a float32 Gram path drifts to 1.4e-4 (module docstring)."""
    taus = low_rank_plus_noise(2, *shape, spike=spike, seed=1)
    fast = star_truncate(taus, eta=40)
    assert fast.dtype == taus.dtype and fast.shape == taus.shape
    for fast_t, tau in zip(fast, taus):
        assert relative_error(fast_t, star_reference(tau, 40)) <= TOLERANCE


@pytest.mark.parametrize("eta,rescale", [(40, True), (10, False), (90, True), (100, True)])
def test_star_exactly_low_rank_deltas(eta, rescale):
    """LoRA-like deltas: the zero singular values must not leak into the nuclear norm."""
    g = torch.Generator().manual_seed(2)
    taus = torch.randn(3, 384, 16, generator=g) @ torch.randn(3, 16, 384, generator=g) * 1e-3
    fast = star_truncate(taus, eta, rescale)
    for fast_t, tau in zip(fast, taus):
        assert relative_error(fast_t, star_reference(tau, eta, rescale)) <= TOLERANCE


def test_star_state_dict_matches_reference(tiny_base, tiny_experts):
    merged = merge("star", tiny_base, tiny_experts, eta=60)
    expected = state_dict_reference(
        tiny_base,
        tiny_experts,
        merge_matrix=lambda d: torch.stack([star_reference(t, 60) for t in d]).mean(0),
        merge_other=lambda d: d.mean(0),
    )
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("lam", [0.125, -0.5, 2.0])
def test_star_lam_scales_the_merged_task_vector_of_every_tensor(lam, tiny_base, tiny_experts):
    one = merge("star", tiny_base, tiny_experts, eta=60)
    scaled = merge("star", tiny_base, tiny_experts, eta=60, lam=lam)
    for k in (k for k in one if one[k].is_floating_point()):  # integer buffers are the base's
        torch.testing.assert_close(
            scaled[k] - tiny_base[k], lam * (one[k] - tiny_base[k]), atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}"
        )
    assert any(not torch.allclose(scaled[k], one[k]) for k in one)


def test_star_eta_100_without_rescale_is_task_arithmetic(tiny_base, tiny_experts):
    star = merge("star", tiny_base, tiny_experts, eta=100, rescale=False)
    arithmetic = merge("task_arithmetic", tiny_base, tiny_experts, lam=1 / len(tiny_experts))
    for k in arithmetic:
        torch.testing.assert_close(star[k], arithmetic[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize(
    "singular_values,eta,rank",
    [
        ([4.0, 3.0, 2.0, 1.0], 40, 1),
        ([4.0, 3.0, 2.0, 1.0], 41, 2),
        ([4.0, 3.0, 2.0, 1.0], 70, 2),
        ([4.0, 3.0, 2.0, 1.0], 100, 4),
        ([4.0, 3.0, 0.0, 0.0], 100, 2),
        ([0.0, 0.0], 40, 0),
    ],
)
def test_kept_rank_is_the_smallest_rank_reaching_eta(singular_values, eta, rank):
    assert int(kept_rank(torch.tensor(singular_values, dtype=torch.float64), eta)) == rank


def test_star_rescale_restores_the_nuclear_norm():
    taus = low_rank_plus_noise(2, 48, 80, spike=5.0, seed=3, dtype=torch.float64)
    truncated = star_truncate(taus, eta=30)
    torch.testing.assert_close(torch.linalg.matrix_norm(truncated, "nuc"), torch.linalg.matrix_norm(taus, "nuc"))
    assert (torch.linalg.matrix_rank(truncated) < torch.linalg.matrix_rank(taus)).all()


def test_star_keeps_a_rank_one_task_vector():
    tau = torch.outer(torch.arange(1.0, 7.0), torch.linspace(-1, 1, 5))
    torch.testing.assert_close(star_truncate(tau[None], eta=40)[0], tau)


# ----------------------------------------------------------------------------- DRM


DRM_CASES = [  # (n_tasks, m, n): BERT's attention shape, and both Gram sides on small ones
    pytest.param(3, 768, 768, id="3x768x768"),
    pytest.param(3, 384, 96, id="3x384x96"),
    pytest.param(2, 96, 384, id="2x96x384"),
]


@pytest.mark.parametrize("n_tasks,m,n", DRM_CASES)
@pytest.mark.parametrize("variant", ["h", "v"])
def test_drm_fast_path_matches_full_svd_reference(variant, n_tasks, m, n):
    deltas = low_rank_plus_noise(n_tasks, m, n, spike=10.0, seed=4)
    fast, reference = (drm_h_deltas, drm_h_reference) if variant == "h" else (drm_v_deltas, drm_v_reference)
    merged = fast(deltas[None])[0]
    assert merged.dtype == deltas.dtype and merged.shape == (m, n)
    assert relative_error(merged, reference(deltas)) <= TOLERANCE


@pytest.mark.parametrize("variant", ["h", "v"])
@pytest.mark.parametrize(
    "hp",
    [
        dict(renorm=False),
        dict(density=0.5, rtol=0.05),
        dict(density=1.0, rtol=0.0),
        dict(prune="per_task"),
        dict(prune="per_task", renorm=False, density=0.3),
    ],
)
def test_drm_options_match_reference(variant, hp):
    deltas = low_rank_plus_noise(3, 48, 32, rank=4, spike=5.0, seed=5)
    fast, reference = (drm_h_deltas, drm_h_reference) if variant == "h" else (drm_v_deltas, drm_v_reference)
    assert relative_error(fast(deltas[None], **hp)[0], reference(deltas, **hp)) <= TOLERANCE


@pytest.mark.parametrize("variant", ["h", "v"])
def test_drm_with_an_unchanged_expert_matches_reference(variant):
    """An expert equal to the base has all-zero blocks: its rows stay zero instead of 0/0."""
    deltas = low_rank_plus_noise(3, 40, 24, rank=3, seed=6)
    deltas[1] = 0
    fast, reference = (drm_h_deltas, drm_h_reference) if variant == "h" else (drm_v_deltas, drm_v_reference)
    merged = fast(deltas[None])[0]
    assert torch.isfinite(merged).all()
    assert relative_error(merged, reference(deltas)) <= TOLERANCE


@pytest.mark.parametrize("name,reference", [("drm_h", drm_h_reference), ("drm_v", drm_v_reference)])
def test_drm_state_dict_matches_reference(name, reference, tiny_base, tiny_experts):
    merged = merge(name, tiny_base, tiny_experts, lam=0.7, density=0.3)
    expected = state_dict_reference(
        tiny_base,
        tiny_experts,
        merge_matrix=lambda d: reference(d, density=0.3, lam=0.7),
        merge_other=lambda d: 0.7 * d.mean(0),
    )
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", ["drm_h", "drm_v"])
def test_drm_single_expert_at_full_density_and_rank_is_that_expert(name, tiny_base, tiny_experts):
    merged = merge(name, tiny_base, tiny_experts[:1], density=1.0, rtol=0.0)
    for k, v in tiny_experts[0].items():
        if torch.is_floating_point(v):
            torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")


OUT_OF_RANGE = [
    ("star", {"eta": 0}, r"eta must be in \(0.0, 100.0\]"),
    ("star", {"eta": 120}, r"eta must be in \(0.0, 100.0\]"),
    ("star", {"rescale": "yes"}, "rescale must be True or False"),
    ("star", {"lam": math.inf}, "lam must be in"),
    ("drm_h", {"density": 1.5}, r"density must be in \[0.0, 1.0\]"),
    ("drm_v", {"lam": math.nan}, "lam must be in"),
    ("drm_h", {"rtol": 1.0}, r"rtol must be in \[0.0, 1.0\)"),
    ("drm_v", {"renorm": 1}, "renorm must be True or False"),
    ("drm_h", {"prune": "all"}, "prune must be 'joint'"),
]


@pytest.mark.parametrize("name,hp,message", OUT_OF_RANGE)
def test_hyperparameter_out_of_range(name, hp, message, tiny_base, tiny_experts):
    with pytest.raises(ValueError, match=message):
        merge(name, tiny_base, tiny_experts, **hp)


# ----------------------------------------------------------------------------- lib.linalg


@pytest.mark.parametrize("shape", [(5, 40, 12), (5, 12, 40), (2, 3, 16, 16)])
def test_thin_svd_matches_torch_svd(shape):
    a = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    u, s, vh = thin_svd(a)
    u_ref, s_ref, vh_ref = torch.linalg.svd(a.double(), full_matrices=False)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, a.double())
    eye = torch.eye(s.shape[-1], dtype=torch.float64)
    torch.testing.assert_close(u.mT @ u, eye.expand_as(u.mT @ u))
    torch.testing.assert_close(vh @ vh.mT, eye.expand_as(vh @ vh.mT))
    # singular vectors are unique up to sign for distinct singular values
    torch.testing.assert_close((u * u_ref).sum(-2).abs(), torch.ones_like(s))


def test_thin_svd_rtol_zeroes_small_components_per_matrix():
    a = torch.stack([torch.diag(torch.tensor([1.0, 0.5, 0.001])), torch.diag(torch.tensor([1.0, 0.02, 0.011]))])
    u, s, vh = thin_svd(a, rtol=0.01)
    assert (s > 0).sum(-1).tolist() == [2, 3]
    assert u[0, :, 2].abs().max() == 0 and vh[0, 2].abs().max() == 0


def test_gram_eigh_gives_exact_zeros_for_round_off_and_zero_matrices():
    g = torch.Generator().manual_seed(8)
    low_rank = torch.randn(60, 3, generator=g) @ torch.randn(3, 50, generator=g)
    sigma, _, right = gram_eigh(torch.stack([low_rank, torch.zeros(60, 50)]))
    assert right and (sigma[0, 3:] == 0).all() and (sigma[0, :3] > 0).all() and (sigma[1] == 0).all()
    u, s, vh = thin_svd(torch.zeros(1, 4, 6))
    assert not (u.abs().sum() or s.abs().sum() or vh.abs().sum())


def test_shape_batches_group_by_shape_and_bound_the_size():
    shapes = {"a": (4, 4), "b": (2, 8), "c": (4, 4), "d": (4, 4), "e": (100, 100)}
    assert shape_batches(shapes, max_elements=32) == [["a", "c"], ["d"], ["b"], ["e"]]
    with pytest.raises(ValueError, match="max_elements"):
        shape_batches(shapes, 0)


def test_map_matrix_stacks_reads_conv_kernels_as_matrices_and_restores_shapes():
    stacks = {"conv": torch.randn(3, 6, 2, 3, 3), "fc": torch.randn(3, 5, 4)}
    seen = []

    def first_task(batch):
        seen.append(tuple(batch.shape))
        return batch[:, 0]

    out = map_matrix_stacks(
        {k: v.shape[1:] for k, v in stacks.items()}, stacks.__getitem__, first_task, max_elements=1000
    )
    assert sorted(seen) == [(1, 3, 5, 4), (1, 3, 6, 18)]
    for k, v in stacks.items():
        assert torch.equal(out[k], v[0])
