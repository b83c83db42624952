"""Batched singular value decompositions: through the smaller Gram matrix, or exactly from factors.

A thin SVD of an ``m x n`` matrix ``A`` costs several times an eigendecomposition of its smaller
Gram matrix (``AᵀA`` when ``n <= m``, else ``AAᵀ``), which gives the same singular values
(``sigma = sqrt(lambda)``) and the singular vectors of the smaller side; the vectors of the other
side follow from one product (``U = A V / sigma``). The merge methods that need spectra (STAR, DRM)
call these helpers on a batch of same-shape matrices at once, on the tensors' device.

Precision is a parameter because squaring ``A`` squares its condition number: an eigenvalue of
the Gram matrix is only known to about ``eps * lambda_max``, so a singular value ``sigma`` to about
``eps * sigma_max**2 / sigma``, and a singular vector to ``eps * lambda_max / gap`` where ``gap`` is
the distance to the nearest other eigenvalue. In float32 (``eps = 6e-8``) that is too coarse for
the small and clustered singular values of fine-tuning deltas (STAR and DRM measurements are in
their module docstrings); in float64 (``eps = 1e-16``) it is far below anything a merge can see.
Hence ``dtype=torch.float64`` by default. MPS has neither float64 nor ``eigh``: there the
eigendecomposition runs on the CPU.

Eigenvalues below ``sqrt(k) * eps * lambda_max`` (``k`` the Gram size) are round-off, not
spectrum: they are set to exactly zero, so an exactly low-rank matrix (a LoRA delta) gets exact
zeros instead of ``sqrt(round-off)``, which would otherwise add up to a visible nuclear norm. (The
round-off eigenvalues of rank-16 Gram matrices of size 384 and 768 were measured at up to
``4.4 * eps * lambda_max`` in float32 and float64, so ``sqrt(k)`` (20 and 28) leaves a margin; a
larger cut such as ``k * eps`` would drop genuine small singular values in float32.)

Factored matrices. A low-rank task vector held as ``B A`` (``B: m x r``, ``A: r x n``, a LoRA
delta) needs no Gram matrix at all: with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (thin QRs), ``B A =
Q_B (R_B R_Aᵀ) Q_Aᵀ``, so the SVD of the ``r x r`` core gives the SVD of the product
(:func:`factored_svd`), in ``O((m + n) r²)`` instead of ``O(m n min(m, n))``. The horizontal
concatenation ``[B_1 A_1 ... B_N A_N]`` that DRM decomposes has the same structure, with a
block-diagonal right factor whose QR is the blocks' QRs (:func:`concat_left_singular`). Nothing is
squared here, so singular values carry absolute errors of about ``eps * sigma_max``; those not
above ``k * eps * sigma_max`` (``k`` the larger side of the core, the usual numerical-rank cut) are
round-off and set to exactly zero, as the Gram path does with its coarser cut.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .device import supports_float64


class GramEigh(NamedTuple):
    """Eigendecomposition of the smaller Gram matrix of a batch of matrices ``A (..., m, n)``.

    ``singular_values (..., k)`` descending, ``k = min(m, n)``; ``vectors (..., k, k)`` the matching
    singular vectors of the smaller side as columns: right singular vectors (``V``) when ``right``
    (``n <= m``, Gram ``AᵀA``), left ones (``U``) otherwise.
    """

    singular_values: Tensor
    vectors: Tensor
    right: bool


def _solver_device(device: torch.device, dtype: torch.dtype) -> torch.device:
    """Where ``eigh`` can run in ``dtype``: the tensor's device, or the CPU for MPS (no ``eigh``
    kernel, no float64)."""
    if device.type == "mps" or (dtype == torch.float64 and not supports_float64(device)):
        return torch.device("cpu")
    return device


def gram_eigh(a: Tensor, *, dtype: torch.dtype = torch.float64) -> GramEigh:
    """Singular values and the smaller side's singular vectors of every matrix in ``a (..., m, n)``,
    from ``eigh`` of the smaller Gram matrix computed in ``dtype``. Results are on ``a``'s device
    in ``dtype`` (on the CPU when ``a`` is on MPS)."""
    if a.ndim < 2:
        raise ValueError(f"gram_eigh needs matrices (..., m, n), got a tensor of shape {tuple(a.shape)}")
    m, n = a.shape[-2:]
    right = n <= m
    x = a.to(device=_solver_device(a.device, dtype), dtype=dtype)
    gram = x.mT @ x if right else x @ x.mT
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues, vectors = eigenvalues.flip(-1), vectors.flip(-1)  # descending, like an SVD
    eigenvalues = zero_round_off_eigenvalues(eigenvalues, eigenvalues[..., :1], dtype)
    return GramEigh(eigenvalues.sqrt(), vectors, right)


def zero_round_off_eigenvalues(eigenvalues: Tensor, largest: Tensor, dtype: torch.dtype) -> Tensor:
    """Gram eigenvalues (last axis, any order) that are round-off rather than spectrum set to
    exactly zero: those not above ``sqrt(k) * eps * largest`` (``k`` the Gram size, ``largest``
    each matrix's largest eigenvalue, shape ``(..., 1)``), negative ones included (module
    docstring)."""
    tol = largest.clamp_min(0) * (eigenvalues.shape[-1] ** 0.5 * torch.finfo(dtype).eps)
    return torch.where(eigenvalues > tol, eigenvalues, torch.zeros_like(eigenvalues))


def _truncated(a: Tensor, dtype: torch.dtype, rtol: float):
    """:func:`gram_eigh` with the components not above ``rtol * sigma_max`` zeroed, ``a`` in
    ``dtype`` on the solver's device, and ``1/sigma`` where ``sigma > 0`` (0 elsewhere)."""
    _check_rtol(rtol)
    sigma, vectors, right = gram_eigh(a, dtype=dtype)
    kept = sigma > rtol * sigma[..., :1]
    sigma = torch.where(kept, sigma, torch.zeros_like(sigma))
    inverse = kept / torch.where(kept, sigma, torch.ones_like(sigma))
    return a.to(device=vectors.device, dtype=dtype), sigma, vectors * kept.unsqueeze(-2), right, inverse


def left_singular(a: Tensor, *, dtype: torch.dtype = torch.float64, rtol: float = 0.0) -> tuple[Tensor, Tensor]:
    """``U (..., m, k)`` and ``S (..., k)`` of the thin SVD of every matrix in ``a (..., m, n)``,
    truncated as in :func:`thin_svd`, without forming ``Vh`` (``diag(S) Vh = Uᵀ a``)."""
    x, sigma, vectors, right, inverse = _truncated(a, dtype, rtol)
    return ((x @ vectors) * inverse.unsqueeze(-2) if right else vectors), sigma


def thin_svd(a: Tensor, *, dtype: torch.dtype = torch.float64, rtol: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``a = U diag(S) Vh`` of every matrix in ``a (..., m, n)`` via :func:`gram_eigh`.

    Shapes as :func:`torch.linalg.svd` with ``full_matrices=False``: ``U (..., m, k)``, ``S (..., k)``
    descending, ``Vh (..., k, n)``, ``k = min(m, n)``. Components whose singular value is not above
    ``rtol * sigma_max`` (and exactly-zero ones, where the other side's vector is undefined) are
    returned as zero singular values with zero vectors, so the batch keeps one shape while each
    matrix keeps its own rank: ``(S > 0).sum(-1)``.
    """
    x, sigma, vectors, right, inverse = _truncated(a, dtype, rtol)
    # the other side from one product, scaled by 1/sigma
    if right:
        return (x @ vectors) * inverse.unsqueeze(-2), sigma, vectors.mT
    return vectors, sigma, (vectors.mT @ x) * inverse.unsqueeze(-1)


def _check_rtol(rtol: float) -> None:
    if not 0.0 <= rtol < 1.0:
        raise ValueError(f"rtol must be in [0, 1) (a fraction of the largest singular value), got {rtol!r}")


def _core_svd(core: Tensor, rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the small ``core (..., k1, k2)`` with round-off and not-above-``rtol`` singular
    values (and their vectors) set to zero (module docstring)."""
    u, sigma, vh = torch.linalg.svd(core, full_matrices=False)
    round_off = max(core.shape[-2:]) * torch.finfo(core.dtype).eps
    kept = sigma > max(rtol, round_off) * sigma[..., :1]
    sigma = torch.where(kept, sigma, torch.zeros_like(sigma))
    return u * kept.unsqueeze(-2), sigma, vh * kept.unsqueeze(-1)


def factored_svd(
    b: Tensor, a: Tensor, *, dtype: torch.dtype = torch.float64, rtol: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``b @ a = U diag(S) Vh`` of every product of ``b (..., m, r)`` and ``a (..., r, n)``,
    exact, without forming it: QR of ``b`` and of ``aᵀ``, then the SVD of the small core (module
    docstring). ``U (..., m, k)``, ``S (..., k)`` descending, ``Vh (..., k, n)`` with ``k =
    min(m, n, r)``; components not above ``rtol * sigma_max`` (or round-off) are zero singular
    values with zero vectors, as in :func:`thin_svd`. Computed and returned in ``dtype`` on the
    solver's device."""
    _check_rtol(rtol)
    if b.ndim < 2 or a.ndim < 2 or b.shape[-1] != a.shape[-2] or b.shape[:-2] != a.shape[:-2]:
        raise ValueError(
            f"factored_svd needs b (..., m, r) and a (..., r, n) with the same batch shape, "
            f"got {tuple(b.shape)} and {tuple(a.shape)}"
        )
    device = _solver_device(b.device, dtype)
    q_b, r_b = torch.linalg.qr(b.to(device=device, dtype=dtype))
    q_a, r_a = torch.linalg.qr(a.to(device=device, dtype=dtype).mT)
    u, sigma, vh = _core_svd(r_b @ r_a.mT, rtol)
    k = min(b.shape[-2], a.shape[-1], b.shape[-1])
    return (q_b @ u)[..., :k], sigma[..., :k], (vh @ q_a.mT)[..., :k, :]


def concat_left_singular(
    b: Tensor, a: Tensor, *, dtype: torch.dtype = torch.float64, rtol: float = 0.0
) -> tuple[Tensor, Tensor]:
    """``U (..., m, k)`` and ``S (..., k)`` of the horizontal concatenation ``[b_1 a_1 ... b_N a_N]``
    of the products of ``b (..., N, m, r)`` and ``a (..., N, r, n)``, exact and without forming it,
    truncated as :func:`factored_svd`; ``k = min(m, N * min(r, n))``.

    With ``a_tᵀ = Q_t R_t``, the concatenation is ``[b_1 R_1ᵀ ... b_N R_Nᵀ] diag(Q_1ᵀ ... Q_Nᵀ)``;
    the right factor has orthonormal rows, so the left singular pairs are those of the ``m x N k_2``
    matrix in front of it, which one more QR and a small SVD give."""
    _check_rtol(rtol)
    if b.ndim < 3 or b.shape[-1] != a.shape[-2] or b.shape[:-2] != a.shape[:-2]:
        raise ValueError(
            f"concat_left_singular needs b (..., N, m, r) and a (..., N, r, n) with the same batch "
            f"shape, got {tuple(b.shape)} and {tuple(a.shape)}"
        )
    device = _solver_device(b.device, dtype)
    _, r_a = torch.linalg.qr(a.to(device=device, dtype=dtype).mT)
    blocks = b.to(device=device, dtype=dtype) @ r_a.mT  # (..., N, m, k2)
    front = blocks.transpose(-3, -2).flatten(-2)  # (..., m, N k2)
    q, r = torch.linalg.qr(front)
    u, sigma, _ = _core_svd(r, rtol)
    return q @ u, sigma


def shape_batches(shapes: Mapping[str, tuple[int, ...]], max_elements: int) -> list[list[str]]:
    """Keys grouped by shape (in first-seen order), each group cut into batches of at most
    ``max_elements`` entries in all (a single larger matrix still gets a batch of its own), so
    that batched linear algebra never holds more than about that much at a time."""
    if max_elements < 1:
        raise ValueError(f"max_elements must be a positive number of tensor entries, got {max_elements!r}")
    groups: dict[tuple[int, ...], list[str]] = {}
    for key, shape in shapes.items():
        groups.setdefault(tuple(shape), []).append(key)
    batches = []
    for shape, keys in groups.items():
        size = max(1, int(torch.Size(shape).numel()))
        per_batch = max(1, max_elements // size)
        batches += [keys[i : i + per_batch] for i in range(0, len(keys), per_batch)]
    return batches


def map_matrix_stacks(
    shapes: Mapping[str, tuple[int, ...]],
    load: Callable[[str], Tensor],
    fn: Callable[[Tensor], Tensor],
    *,
    max_elements: int,
) -> dict[str, Tensor]:
    """Apply a batched matrix function to same-shape stacks, one batch at a time.

    ``load(key)`` returns the stack ``(N, *shape)`` of one key (for example the N task vectors of
    one weight); it is called only when that key's batch is processed, so at most one batch of
    stacks is alive. Each stack is read as ``(N, m, n)`` with ``m = shape[0]`` (conv kernels become
    ``(out, in*kh*kw)``, see :func:`lib.statedict.as_matrix`); ``fn`` maps ``(B, N, m, n)`` to
    ``(B, m, n)``; the results come back in each key's ``shape``. Batches hold at most
    ``max_elements`` entries of ``shape`` per stack member (see :func:`shape_batches`).
    """
    out = {}
    for keys in shape_batches(shapes, max_elements):
        shape = tuple(shapes[keys[0]])
        stacks = torch.stack([load(k).flatten(2) for k in keys])
        results = fn(stacks)
        out.update({k: r.reshape(shape) for k, r in zip(keys, results)})
    return out
