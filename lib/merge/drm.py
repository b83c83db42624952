"""DRM: Decom-Renorm-Merge (Chaichana et al. 2025, seed 004), horizontal and vertical variants.

For one weight matrix and N experts with deltas ``D_t = expert_t - base`` (``m x n``), DRM-H:

1. decompose the horizontal concatenation ``[D_1 ... D_N] = U S [V_1ᵀ ... V_Nᵀ]`` (a shared
   column basis ``U``), keeping the singular values above ``rtol * sigma_max``;
2. renormalise each row ``v_{t,i}`` of every block ``V_tᵀ`` to unit length and move its norm into
   that task's singular values, ``S_t = S diag(|v_{t,i}|)``;
3. prune: keep the top-``density`` fraction of the entries of the renormalised ``Ṽ_tᵀ`` by
   magnitude, ranked jointly over the blocks of all tasks (``prune="joint"``) or within each
   task's block (``prune="per_task"``);
4. elect signs on ``S_t Ṽ_tᵀ`` by summed mass and take the disjoint mean (TIES' steps,
   :mod:`lib.merge.ties`); 5. reconstruct ``base + lam * U (merged)``.

DRM-V does the same on the vertical concatenation ``[D_1; ...; D_N] = [U_1; ...; U_N] S Vᵀ`` (a shared
row basis ``Vᵀ``) with the columns of each ``U_t`` renormalised; it is DRM-H applied to the
transposed deltas, which is how it is computed here. With ``renorm=False`` step 2 is skipped:
``V_tᵀ`` is pruned as split and scaled by the shared ``S``.

Decisions, each beside what the official code (yophis/decom-renorm-merge, ``right_drm`` and
``left_drm``) does:

* Pruning is joint by default, as the paper's appendix H.3 chooses ("our method employs joint
  pruning", Table 8) and as the official code does (one top-k over the stacked blocks of all
  tasks); ``prune="per_task"`` is the "individual pruning" of Table 8 and of the wording of the
  paper's step 4. On low-rank-plus-noise deltas of 3 experts (768x768, 768x3072, 3072x768, H and
  V, density 0.2) the two merged deltas differ by 1.6 % to 2.5 % (relative Frobenius); more where
  the tasks' rows differ in how concentrated their entries are, since joint ranking then moves
  kept entries from one task to another.
* Rank cut: ``rtol=1e-2`` drops the singular values not above ``1e-2 * sigma_max``, which is the
  official code's cut; appendix H.1 says that rank truncation is not employed in DRM, which is
  ``rtol=0`` here (every component above round-off, see :mod:`lib.linalg`).
* Round-off directions are zero, not renormalised. Where the tasks' column spaces are (nearly)
  orthogonal, a component of one task has coordinates ``Uᵀ D_t`` in another task that are pure
  round-off; renormalising them to unit length makes them survive pruning and vote in the
  disjoint mean, so the merge depends on the coordinates of the deltas. For two tasks with
  orthogonal column spaces (rank 6 each, 128x80, or rank 16, 768x768; float64) and a random
  orthogonal ``Q``, DRM-H(QD) should be Q DRM-H(D): the official code's result is 22 % to 34 %
  off at density 0.5 and 0.2 (43 % at density 1 if it did not skip DRM there), this module's was
  49 %, 33 % and 26 % at density 1, 0.5 and 0.2 before this rule. Here a row whose norm is not
  above :func:`direction_rtol` times the largest row norm of the matrix (over all tasks) is set to
  zero before renormalisation, and the merge is rotation-equivariant to 1e-6
  (``tests/test_drm_reference.py``): on this point this module is more faithful to DRM's
  definition than the official code. Measured on BERT shapes: round-off rows reach 1.4e-7 of the
  largest row for float32 deltas and 5e-13 for float64 ones; the smallest genuine row of
  low-rank-plus-noise deltas was 5.6e-3; the tolerance (sqrt(eps): 3.5e-4 for float32 deltas,
  1.5e-8 for float64) sits between. An expert equal to the base has all-zero rows, which stay
  zero (the official code renormalises the round-off of its split ``Vᵀ`` block there).
* Kept count and ties: ``ceil(density * entries)`` of the ranked entries (jointly:
  ``N * r * n``), with every entry tied with the last kept also kept
  (:func:`lib.merge.ties.trim_topk`); the official ``zero_out_non_topk`` keeps the entries at
  least as large as the ``(L - round(density * L))``-th smallest, i.e. ``round(density * L) + 1``
  of ``L`` (Python's half-to-even ``round``), one more than the nominal fraction.
* An entry whose summed mass is exactly 0 merges to 0; the official code gives it the majority of
  the matrix's elected signs (a measure-zero event for real deltas, but not for zero rows).
* At ``density=1`` DRM is still DRM (decompose, renormalise, elect signs, disjoint mean in the
  joint basis, nothing pruned), so the result is continuous in ``density``; the official code
  skips the decomposition there and returns the disjoint mean of the raw deltas (without its
  merging coefficient).
* Matrices are all floating-point tensors with two or more dimensions, conv kernels read as
  ``(out, in*kh*kw)``; the official code decomposes the ``nn.Linear`` weights it is given.
* Other tensors (biases, norm affine, running statistics): ``base + lam * mean of the deltas``, the
  paper's "weighted averaging with the weights lambda_t" for one shared ``lam``. The official code
  elects signs and takes a disjoint mean there as well.
* A task's block is computed as ``S V_tᵀ = Uᵀ D_t`` (the paper's eq. 4 solved for ``V_t``) rather
  than cut out of a full SVD's ``Vᵀ``; the two are equal up to round-off, which the rule above
  zeroes in either. The official code computes in float32 by default; this module in float64
  (below).

Where none of these edge cases arises, the result is the official algorithm's: on the
low-rank-plus-noise deltas above, a float64 transcription of the official code (with its kept
count, zero-mass signs and renormalised round-off) and this module differ by 2.5e-8 (the float32
rounding of the output) to 1.4e-3 (where the official code's one extra kept entry matters).

Fast and exact. Instead of a full SVD of the ``m x N n`` concatenation, :func:`lib.linalg.left_singular`
takes ``eigh`` of its smaller Gram matrix (``sum_t D_t D_tᵀ``, ``m x m``, or the ``N n x N n`` one),
batched over same-shape keys. Then ``S_t Ṽ_tᵀ`` with its row norms is just ``Uᵀ D_t``. DRM's result
depends on the basis chosen inside clusters of nearly equal singular values (it prunes entries of
singular vectors), so the eigenvectors must be accurate to well below the cluster gaps: with a
float32 Gram the merge differed from a float64 SVD reference by 1.7 % to 7.6 % (relative
Frobenius) on low-rank-plus-noise deltas of 3 experts with shapes 768x768, 768x3072 and 3072x768
(H and V); with a float64 Gram (:data:`PRECISION`) by 6e-12 or less. Like TIES, DRM is
discontinuous where an entry crosses the pruning threshold: perturbing BERT-shaped float32 deltas
by their rounding (1e-6 relative) flips an entry or two per matrix and moves the merge by about
1e-3, so agreement to 1e-4 is a statement about identical inputs. Speed (``benchmarks/merge.py``,
BERT-base shapes, shared 2-core CPU): 2.6x (8 experts) to 3.9x (3 experts) faster than the
full-SVD reference.

Low-rank deltas (LoRA, ``D_t = s_t B_t A_t``, :mod:`lib.lora`) take :func:`drm_h_lowrank`: the
concatenation has rank at most ``N r`` and its ``U, S`` come from QRs of the factors and one small
SVD (:func:`lib.linalg.concat_left_singular`); the coordinates ``Uᵀ D_t = (Uᵀ B_t) s_t A_t`` cost
``O(N r n)`` each, and steps 2-4 are the ones above on them. The merged delta ``U (merged)`` is
returned as its two factors, of rank at most ``N r``. It equals :func:`drm_h_deltas` on the
densified deltas (``tests/test_lora.py``) wherever both keep the same components, i.e. wherever no
singular value lies between the two round-off cuts (:mod:`lib.linalg`), which with the default
``rtol=1e-2`` cannot happen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..linalg import concat_left_singular, left_singular
from . import PRECISION, check_finite_number, check_range, register
from .ties import disjoint_mean, elect_sign, trim_topk

#: how step 3 ranks the entries: over the blocks of all tasks at once, or within each task's block
PRUNE = ("joint", "per_task")


def direction_rtol(*dtypes: torch.dtype) -> float:
    """The relative row norm below which a task's coordinates ``Uᵀ D_t`` of a component are
    round-off: ``sqrt(eps)`` of the coarsest of ``dtypes`` (the deltas' and the computation's),
    half the digits (measurements in the module docstring)."""
    return max(torch.finfo(d).eps for d in dtypes) ** 0.5


def prune_in_joint_basis(projections: Tensor, scale: Tensor, density: float, prune: str = "joint") -> Tensor:
    """Step 3 for one matrix: ``projections (N, r, n)`` are the tasks' ``S_t Ṽ_tᵀ`` before
    pruning, i.e. each task's coordinates ``Uᵀ D_t`` in the shared basis; the entries are ranked by
    ``projections / scale`` (``scale (N, r, 1)``: the row norms with renormalisation, the shared
    singular values without), over all tasks at once (``prune="joint"``) or task by task
    (``"per_task"``), and the top ``density`` kept. Returns the kept coordinates ``(N, r, n)``, the
    others zero."""
    directions = projections / torch.where(scale > 0, scale, torch.ones_like(scale))
    return trim_topk(directions, density, batch_dims=PRUNE.index(prune)) * scale


def merge_in_joint_basis(projections: Tensor, scale: Tensor, density: float, prune: str = "joint") -> Tensor:
    """Steps 3-4 for one matrix (:func:`prune_in_joint_basis`, then signs elected and the disjoint
    mean). Returns the merged coordinates ``(r, n)``."""
    kept = prune_in_joint_basis(projections, scale, density, prune)
    return disjoint_mean(kept, elect_sign(kept))


def drm_h_deltas(
    deltas: Tensor,
    *,
    density: float = 0.2,
    renorm: bool = True,
    rtol: float = 1e-2,
    prune: str = "joint",
    dtype: torch.dtype = PRECISION,
) -> Tensor:
    """The merged delta (before ``lam``) of DRM-H for each matrix of ``deltas (B, N, m, n)``:
    returns ``(B, m, n)`` in ``deltas``' dtype, computed in ``dtype``."""
    batch, n_tasks, m, n = deltas.shape
    joint = deltas.transpose(1, 2).reshape(batch, m, n_tasks * n)  # [D_1 D_2 ... D_N]
    u, sigma = left_singular(joint, dtype=dtype, rtol=rtol)
    round_off = direction_rtol(deltas.dtype, dtype)
    joint = joint.to(device=u.device, dtype=dtype)
    merged = []
    for b in range(batch):
        coordinates = task_coordinates(u[b], sigma[b], joint[b], n_tasks, round_off=round_off)
        rank = coordinates.shape[1]
        scale = pruning_scale(coordinates, sigma[b, :rank], renorm)
        merged.append(u[b, :, :rank] @ merge_in_joint_basis(coordinates, scale, density, prune))
    return torch.stack(merged).to(device=deltas.device, dtype=deltas.dtype)


def task_coordinates(u: Tensor, sigma: Tensor, joint: Tensor, n_tasks: int, *, round_off: float = 0.0) -> Tensor:
    """Each task's ``S V_tᵀ = Uᵀ D_t`` ``(N, r, n)`` over the ``r`` kept components of one matrix:
    ``u (m, k)`` and ``sigma (k,)`` from :func:`lib.linalg.left_singular` of ``joint = [D_1 ... D_N]``
    ``(m, N n)``. Rows whose norm is not above ``round_off`` times the largest row norm are
    round-off (:func:`direction_rtol`) and set to exactly zero, as are the rows of an expert equal
    to the base."""
    rank = int((sigma > 0).sum())
    n = joint.shape[-1] // n_tasks
    coordinates = (u[:, :rank].mT @ joint).reshape(rank, n_tasks, n).transpose(0, 1)
    return zero_round_off_rows(coordinates, round_off)


def zero_round_off_rows(coordinates: Tensor, round_off: float) -> Tensor:
    """``coordinates (N, r, n)`` with every row whose norm is not above ``round_off`` times the
    largest row norm set to exactly zero (:func:`direction_rtol`)."""
    norms = torch.linalg.vector_norm(coordinates, dim=-1, keepdim=True)
    largest = norms.max() if norms.numel() else norms.new_zeros(())
    return coordinates * (norms > round_off * largest)


def pruning_scale(coordinates: Tensor, sigma: Tensor, renorm: bool) -> Tensor:
    """What step 3 divides each task's coordinates ``(N, r, n)`` by before ranking them, ``(N, r, 1)``:
    with ``renorm`` each row's norm ``sigma_i |v_{t,i}|`` (so every row ``ṽ_{t,i}`` has unit length),
    without it the shared ``sigma_i`` (so the rows ``v_{t,i}`` of the split ``Vᵀ`` are ranked as
    they are)."""
    if renorm:
        return torch.linalg.vector_norm(coordinates, dim=-1, keepdim=True)
    return sigma[:, None].expand(coordinates.shape[0], -1, 1)


def drm_v_deltas(deltas: Tensor, **hp) -> Tensor:
    """DRM-V: DRM-H on the transposed deltas (a shared row basis), transposed back."""
    return drm_h_deltas(deltas.mT, **hp).mT


def drm_h_lowrank(
    b: Tensor,
    a: Tensor,
    *,
    density: float = 0.2,
    renorm: bool = True,
    rtol: float = 1e-2,
    prune: str = "joint",
    dtype: torch.dtype = PRECISION,
) -> tuple[Tensor, Tensor]:
    """:func:`drm_h_deltas` (before ``lam``) of low-rank deltas ``b_t @ a_t`` (``b (K, N, m, r)``,
    ``a (K, N, r, n)``, scales folded into ``b``) without forming them: the merged deltas as factors
    ``(K, m, R)`` (the joint basis) and ``(K, R, n)`` (the merged coordinates), in ``dtype``, ``R``
    the largest kept rank of the batch (smaller ones padded with zeros)."""
    u, sigma = concat_left_singular(b, a, dtype=dtype, rtol=rtol)
    round_off = direction_rtol(b.dtype, dtype)
    b, a = b.to(device=u.device, dtype=dtype), a.to(device=u.device, dtype=dtype)
    bases, merged = [], []
    for k in range(b.shape[0]):
        rank = int((sigma[k] > 0).sum())
        basis = u[k, :, :rank]
        coordinates = zero_round_off_rows((basis.mT @ b[k]) @ a[k], round_off)  # (N, rank, n)
        scale = pruning_scale(coordinates, sigma[k, :rank], renorm)
        bases.append(basis)
        merged.append(merge_in_joint_basis(coordinates, scale, density, prune))
    width = max(1, max(x.shape[-1] for x in bases))
    padded_bases = torch.stack([torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in bases])
    padded_merged = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[0])) for x in merged])
    return padded_bases, padded_merged


def drm_v_lowrank(b: Tensor, a: Tensor, **hp) -> tuple[Tensor, Tensor]:
    """DRM-V of low-rank deltas: DRM-H of the transposed ones (``(B A)ᵀ = Aᵀ Bᵀ``), transposed back."""
    basis, merged = drm_h_lowrank(a.mT, b.mT, **hp)
    return merged.mT, basis.mT


def _check(density, lam, renorm, rtol, prune):
    check_range("density", density, 0.0, 1.0)
    check_finite_number("lam", lam)
    if not isinstance(renorm, bool):
        raise ValueError(f"renorm must be True or False (renormalise the split singular vectors), got {renorm!r}")
    check_range("rtol", rtol, 0.0, 1.0, high_open=True)
    if prune not in PRUNE:
        raise ValueError(
            f"prune must be 'joint' (rank the entries of all tasks together, the paper's choice) "
            f"or 'per_task', got {prune!r}"
        )


_HP = dict(
    family="spectral",
    per="stack",
    check=_check,
    version=1,
    reference="Chaichana et al., Decom-Renorm-Merge: Model Merging on the Right Space Improves Multitasking, 2025 "
    "(paper 004); https://github.com/yophis/decom-renorm-merge",
    density=0.2,
    lam=1.0,
    renorm=True,
    rtol=1e-2,
    prune="joint",
)


@register(
    "drm_h",
    description="DRM-H: joint SVD of the horizontally stacked deltas, renormalise, TIES in the shared column basis (Chaichana et al. 2025)",
    **_HP,
)
def drm_h(deltas, *, density, renorm, rtol, prune):
    return drm_h_deltas(deltas, density=density, renorm=renorm, rtol=rtol, prune=prune)


@register(
    "drm_v",
    description="DRM-V: joint SVD of the vertically stacked deltas, renormalise, TIES in the shared row basis (Chaichana et al. 2025)",
    **_HP,
)
def drm_v(deltas, *, density, renorm, rtol, prune):
    return drm_v_deltas(deltas, density=density, renorm=renorm, rtol=rtol, prune=prune)


@dataclass(frozen=True)
class RowProfile:
    """What DRM-H's renormalisation and pruning do to one matrix, task by task (seed 004, §6.1).

    ``singular_values (r,)``: the joint decomposition's kept ``sigma_i``, descending.
    ``row_norms (N, r)``: ``|v_{t,i}|``, the length of row ``i`` of task ``t``'s block of the split
    ``Vᵀ`` before renormalisation (``sum_t |v_{t,i}|² = 1``: task ``t``'s share of component ``i``).
    ``kept[renorm] (N, r)``: the fraction of the ``n`` entries of each row that pruning at
    ``density`` keeps, with (``True``) and without (``False``) renormalisation.
    ``kept_energy[renorm] (N,)``: the share of each task's ``|D_t|_F² = sum_i sigma_i² |v_{t,i}|²``
    that the kept entries hold.
    """

    singular_values: Tensor
    row_norms: Tensor
    kept: dict[bool, Tensor]
    kept_energy: dict[bool, Tensor]


def row_profile(
    deltas: Tensor, *, density: float = 0.2, rtol: float = 1e-2, prune: str = "joint", dtype: torch.dtype = PRECISION
) -> RowProfile:
    """The :class:`RowProfile` of one matrix's deltas ``(N, m, n)`` under DRM-H (for DRM-V pass
    ``deltas.mT``), computed by the same steps as :func:`drm_h_deltas`; on the CPU."""
    n_tasks, m, n = deltas.shape
    joint = deltas.transpose(0, 1).reshape(1, m, n_tasks * n)
    u, sigma = left_singular(joint, dtype=dtype, rtol=rtol)
    coordinates = task_coordinates(
        u[0],
        sigma[0],
        joint[0].to(device=u.device, dtype=dtype),
        n_tasks,
        round_off=direction_rtol(deltas.dtype, dtype),
    )
    sigma = sigma[0, : coordinates.shape[1]]
    total = coordinates.square().sum((1, 2))
    kept, energy = {}, {}
    for renorm in (True, False):
        pruned = prune_in_joint_basis(coordinates, pruning_scale(coordinates, sigma, renorm), density, prune)
        kept[renorm] = (pruned != 0).to(dtype).mean(-1).cpu()
        energy[renorm] = (pruned.square().sum((1, 2)) / torch.where(total > 0, total, 1.0)).cpu()
    row_norms = torch.linalg.vector_norm(coordinates, dim=-1) / sigma
    return RowProfile(sigma.cpu(), row_norms.cpu(), kept, energy)
