"""Spectra of weight matrices against the Marchenko–Pastur law, and the signal-to-noise ratios
(SNR) that the merge strategies use to rank layers.

The idea in one paragraph
-------------------------
Take a weight matrix ``W`` with ``N`` rows and ``M`` columns after orienting it so that
``N >= M`` (a conv kernel ``(out, in, kh, kw)`` is first read as ``(out, in*kh*kw)``). If ``W``
were pure noise, i.i.d. entries of variance ``sigma2``, the ``M`` eigenvalues of the Gram matrix
``G = WᵀW / N`` would fill the Marchenko–Pastur (MP) bulk ``[lambda_minus, lambda_plus]`` with

    lambda_minus = sigma2 * (1 - sqrt(q))**2,   lambda_plus = sigma2 * (1 + sqrt(q))**2,   q = M / N.

What training writes into ``W`` is (approximately) low rank; it shows up as eigenvalues *above*
the bulk ("spikes"). So we fit the noise level ``sigma2`` to the bulk, call every eigenvalue above
the detection ``threshold`` signal, and report ``snr = sum(signal eigenvalues) / sum(bulk
eigenvalues)`` (the Sapienza report's NLP definition, seed 000).

Two details make this correct rather than approximately right:

* **Detection threshold.** ``lambda_plus`` is where the bulk ends for an infinite matrix. For a
  finite one the largest *noise* eigenvalue fluctuates around it and lands above it in about
  one draw in six (``P(TW1 > 0) = 0.17``): thresholding at ``lambda_plus`` would call noise
  "signal" in one matrix out of six. Johnstone (2001) showed that the largest eigenvalue ``l1`` of a real white Wishart matrix ``XᵀX`` (``X`` an ``n x p``
  standard Gaussian matrix) satisfies ``(l1 - mu) / s -> TW1``, the Tracy–Widom law of the
  Gaussian orthogonal ensemble, with ``mu = (sqrt(n-1) + sqrt(p))**2`` and
  ``s = (sqrt(n-1) + sqrt(p)) * (1/sqrt(n-1) + 1/sqrt(p))**(1/3)``. Our threshold is the edge plus
  that fluctuation scale times the 99.9% quantile of TW1 (3.2722):

      threshold = lambda_plus + sigma2 * 3.2722 * s / N.

  Why 99.9%: a model has about a hundred weight matrices and ``n_signal`` should be 0 for every
  pure-noise one, so the false alarm rate per matrix must be well below 1%; a single false spike
  in a 64-column matrix already gives an SNR of about 0.03. (Centring on ``lambda_plus``, which
  uses ``N`` rather than ``N - 1``, makes the threshold very slightly more conservative.)

* **Noise level.** ``sigma2="median"`` (default) is a robust fit of the bulk: it is the value at
  which the median of the bulk eigenvalues equals the median of the MP law with ratio ``q``
  (:func:`mp_median`). Spikes sit far from the median, so they barely move it, unlike the entry
  variance, which they inflate. The bulk is "the eigenvalues at or below the threshold", which
  itself depends on ``sigma2``; we start from all eigenvalues and iterate (drop the eigenvalues
  above the threshold, refit) to the fixed point, which takes one or two steps when there are a
  few spikes. ``sigma2="var"`` uses the entry variance of ``W`` as the report does (inflated by the
  signal it is meant to separate from); a number is taken as a known noise level.

  Real pre-trained weights are not "MP noise plus a few spikes": their spectra are heavy-tailed
  and often a third or more of the eigenvalues clear the threshold (notebook 00 shows MiniLM).
  The median fit then describes the lower half of the spectrum, which is the part that looks
  most like noise; read ``sigma2`` there as a noise floor rather than a model of the matrix.

SNR variants (``method``):

* ``"mp"``: the above.
* ``"max_median"``: the report's ResNet SNR, ``lambda_max / (median + 1e-8)`` of the eigenvalues of
  the ``rows x rows`` matrix ``W Wᵀ / cols`` exactly as its notebook computes them. When ``rows >
  cols`` that matrix has ``rows - cols`` zero eigenvalues (ResNet's 1x1 downsampling convolutions),
  which enter the median; the published float32 code sees round-off there instead of zeros, so
  its value for those shapes is an arbitrary very large number and ours is ``lambda_max / 1e-8``.
* ``"report_text"``: the report's NLP (text-model) SNR as its published code (``compute_snr``)
  defines it. It was called ``"seed"`` (after the report, "seed 000", not a random seed); that name
  still works everywhere a method is typed (:data:`SNR_ALIASES`, :func:`canonical_snr_method`), and
  records, labels and hashes always carry ``"report_text"``. Its definition:
  ``corr = WᵀW / min(N, M)`` (the *in-features* Gram, whatever the shape), eigenvalues floored at
  1e-9, edge ``var(W) * (1 + sqrt(1/Q))**2`` with ``Q = max/min``. Normalising by ``min(N, M)``
  instead of ``max(N, M)`` scales the eigenvalues by ``1/q`` while the edge keeps its ``q``-scale,
  so for any non-square matrix most of the pure-noise bulk lies above the edge and the SNR is
  large for noise alone, growing with the aspect ratio. Kept for comparison (see notebook 00),
  not fixed. Our value equals the published float32 code's (to 1e-5, tested) for tall matrices and
  for wide ones up to ``cols / rows = 5`` (tested; the large-matrix limit is ``3 + 2*sqrt(2) =
  5.83``, near which a finite matrix's smallest eigenvalues straddle the edge). Wider than that, every non-zero
  eigenvalue of noise lies above the edge (the smallest, ``(1 - sqrt(q))**2 / q``, exceeds
  ``(1 + sqrt(q))**2`` once ``sqrt(q) < sqrt(2) - 1``), so the denominator is only the ``cols - rows``
  zero eigenvalues: exact zeros floored at 1e-9 here, float32 round-off in the published code,
  whose value there depends on the weights' scale and is arbitrary (measured up to 178x ours on
  64x576 unit-variance noise, equal at variance 4e-4).

All eigenvalues come from the smaller Gram matrix, computed batched by shape on the selected
device (:func:`lib.device.get_device`); no SVD is taken. ``benchmarks/spectral.py`` times this
against a per-matrix SVD. (A partial spectrum, the trace and a few top eigenvalues, would be
cheaper still, but the median fit needs the middle of the spectrum and real weights have far too
many spikes for a top-k solver, so every path here computes the full spectrum.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .device import get_device, supports_float64
from .linalg import shape_batches, zero_round_off_eigenvalues
from .statedict import (
    as_matrix,
    check_finite,
    compute_dtype,
    is_matrix,
    matches,
    to_state_dict,
)

#: the detection level: the probability that the largest eigenvalue of a pure-noise matrix stays
#: below ``threshold``
DETECTION_LEVEL = 0.999
#: the ``DETECTION_LEVEL`` quantile of the Tracy–Widom law TW1 (real matrices), computed from
#: ``F1(s) = det(I - K)`` with ``K(x, y) = Ai((x + y) / 2) / 2`` on ``(s, inf)`` (Bornemann 2010);
#: tests/test_spectral.py recomputes it
TW1_QUANTILE = 3.2722
#: the constants the report's code adds to its denominators; kept so "report_text" and "max_median" match
REPORT_TEXT_EPS = 1e-9
MAX_MEDIAN_EPS = 1e-8
SIGMA2_ESTIMATORS = ("median", "var")


@dataclass(frozen=True, eq=False)
class Spectrum:
    """The spectrum of one weight matrix read against the Marchenko–Pastur law.

    ``eigenvalues`` are those of the ``M x M`` Gram matrix divided by the larger dimension
    ``N``, in descending order (float64, CPU); ``q = M / N <= 1``.
    """

    eigenvalues: Tensor
    shape: tuple[int, int]  # the 2-D shape of the weight (rows, cols), before orienting
    q: float
    sigma2: float  # the noise level (entry variance of the noise part)
    lambda_minus: float  # sigma2 * (1 - sqrt(q))**2
    lambda_plus: float  # sigma2 * (1 + sqrt(q))**2, the asymptotic bulk edge
    threshold: float  # lambda_plus plus the Tracy–Widom margin: the finite-size detection level
    n_signal: int  # eigenvalues above threshold
    snr: float  # sum(signal eigenvalues) / sum(bulk eigenvalues); 0 without signal, inf without bulk
    signal_fraction: float  # sum(signal eigenvalues) / sum(all eigenvalues): the share of ||W||_F^2 in spikes

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0]) if len(self.eigenvalues) else 0.0


# ---------------------------------------------------------------------------------------------
# The Marchenko–Pastur law
# ---------------------------------------------------------------------------------------------


def _check_ratio(q: float) -> float:
    q = float(q)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"aspect ratio q = M/N must be in (0, 1] (smaller over larger dimension), got {q}")
    return q


def mp_edges(q: float, sigma2: float = 1.0) -> tuple[float, float]:
    """``(lambda_minus, lambda_plus) = sigma2 * (1 -/+ sqrt(q))**2``."""
    q = _check_ratio(q)
    return sigma2 * (1.0 - math.sqrt(q)) ** 2, sigma2 * (1.0 + math.sqrt(q)) ** 2


def mp_pdf(x, q: float, sigma2: float = 1.0) -> np.ndarray:
    """Marchenko–Pastur density of the eigenvalues of ``WᵀW / N`` (``M x M``, ``q = M/N <= 1``)
    for i.i.d. entries of variance ``sigma2``:
    ``sqrt((lambda_plus - x)(x - lambda_minus)) / (2 pi sigma2 q x)`` on the bulk, 0 elsewhere."""
    lo, hi = mp_edges(q, sigma2)
    x = np.asarray(x, dtype=np.float64)
    inside = (x > lo) & (x < hi)
    xs = np.where(inside, x, 1.0)  # keeps sqrt and division finite outside the bulk
    dens = np.sqrt(np.clip((hi - xs) * (xs - lo), 0.0, None)) / (2.0 * math.pi * sigma2 * q * xs)
    return np.where(inside, dens, 0.0)


@lru_cache(maxsize=256)
def _mp_cdf_table(q: float, points: int = 1 << 14) -> tuple[np.ndarray, np.ndarray]:
    """The unit-variance MP CDF tabulated on the bulk. Integrating in the angle ``phi`` with
    ``x = c - r cos(phi)`` turns the square-root endpoints (and the ``1/sqrt(x)`` pole at
    ``q = 1``) into a smooth integrand, so a midpoint rule is accurate to about 1e-8."""
    lo, hi = mp_edges(q)
    c, r = (lo + hi) / 2.0, (hi - lo) / 2.0
    edges = np.linspace(0.0, math.pi, points + 1)
    mid = (edges[:-1] + edges[1:]) / 2.0
    integrand = r**2 * np.sin(mid) ** 2 / (2.0 * math.pi * q * (c - r * np.cos(mid)))
    cdf = np.concatenate([[0.0], np.cumsum(integrand) * (math.pi / points)])
    return c - r * np.cos(edges), cdf


def mp_cdf(x, q: float, sigma2: float = 1.0) -> np.ndarray:
    """Cumulative distribution function of :func:`mp_pdf`."""
    grid, cdf = _mp_cdf_table(_check_ratio(q))
    return np.interp(np.asarray(x, dtype=np.float64) / sigma2, grid, cdf, left=0.0, right=1.0)


@lru_cache(maxsize=4096)
def mp_median(q: float) -> float:
    """Median of the unit-variance MP law with ratio ``q`` (``sigma2 * mp_median(q)`` in general)."""
    grid, cdf = _mp_cdf_table(_check_ratio(q))
    return float(np.interp(0.5, cdf, grid))


def tracy_widom_margin(n: int, m: int, sigma2: float = 1.0) -> float:
    """How far above ``lambda_plus`` the detection threshold sits for an ``n x m`` noise matrix
    (``n >= m``): ``sigma2 * TW1_QUANTILE * s / n`` with Johnstone's (2001) scale
    ``s = (sqrt(n-1) + sqrt(m)) * (1/sqrt(n-1) + 1/sqrt(m))**(1/3)`` (see the module docstring)."""
    n, m = max(n, m), min(n, m)
    root_n = math.sqrt(max(n - 1, 1))
    scale = (root_n + math.sqrt(m)) * (1.0 / root_n + 1.0 / math.sqrt(m)) ** (1.0 / 3.0)
    return sigma2 * TW1_QUANTILE * scale / n


def detection_threshold(n: int, m: int, sigma2: float = 1.0) -> float:
    """``lambda_plus + tracy_widom_margin``: above it an eigenvalue is signal at
    :data:`DETECTION_LEVEL`."""
    n, m = max(n, m), min(n, m)
    return mp_edges(m / n, sigma2)[1] + tracy_widom_margin(n, m, sigma2)


def bbp_location(strength: float, q: float, sigma2: float = 1.0) -> float:
    """Where a planted rank-one signal of relative ``strength`` ``t`` puts its eigenvalue:
    ``sigma2 * (1 + t²)(q + t²) / t²`` above the BBP transition ``t = q**(1/4)``, the bulk edge
    below it (Baik, Ben Arous and Péché 2005; Benaych-Georges and Nadakuditi 2012). ``t`` is the
    signal's singular value over ``sigma * sqrt(N)``, see :func:`planted_spikes`."""
    q = _check_ratio(q)
    t2 = float(strength) ** 2
    if t2 <= math.sqrt(q):
        return mp_edges(q, sigma2)[1]
    return sigma2 * (1.0 + t2) * (q + t2) / t2


def detection_strength(n: int, m: int) -> float:
    """The smallest relative strength whose BBP location reaches the detection threshold of an
    ``n x m`` matrix: the root ``t²`` of ``(1 + t²)(q + t²) / t² = threshold / sigma2``."""
    n, m = max(n, m), min(n, m)
    q, level = m / n, detection_threshold(n, m)
    b = level - 1.0 - q
    return math.sqrt((b + math.sqrt(b * b - 4.0 * q)) / 2.0)


def planted_spikes(
    rows: int, cols: int, strengths: Sequence[float], *, sigma: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Gaussian noise of standard deviation ``sigma`` plus one rank-one signal per strength:
    ``sigma * X + sum_i t_i * sigma * sqrt(N) * u_i v_iᵀ`` with orthonormal ``u``'s and ``v``'s
    (``N = max(rows, cols)``), float32. Strength ``t`` puts an eigenvalue at
    :func:`bbp_location` once it passes ``q**(1/4)``."""
    k = len(strengths)
    u = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))[0]
    scale = torch.tensor([float(t) for t in strengths], dtype=torch.float64) * sigma * math.sqrt(max(rows, cols))
    noise = sigma * torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return (noise + (u * scale) @ v.T).float()


def shuffled(W: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``W`` with its entries randomly permuted: the same entry distribution (and variance) with
    every structure between rows and columns destroyed, the natural null model of a weight."""
    flat = W.reshape(-1)
    return flat[torch.randperm(flat.numel(), generator=generator, device=flat.device)].reshape(W.shape)


# ---------------------------------------------------------------------------------------------
# Eigenvalues, batched by shape
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _GramSpectrum:
    """What every SNR variant is computed from: the eigenvalues of the smaller Gram matrix
    divided by the larger dimension (ascending, float64, CPU) and the entry variance."""

    eigenvalues: Tensor
    rows: int
    cols: int
    entry_var: float

    @property
    def n(self) -> int:
        return max(self.rows, self.cols)

    @property
    def m(self) -> int:
        return min(self.rows, self.cols)


#: at most this many float elements are stacked on the device at once (512 MiB in float32)
_BATCH_ELEMENTS = 1 << 27
#: the CPU allocator's alignment (bytes) that a freshly stacked matrix has
_ALIGNMENT = 64


def _as_checked_matrix(W, name: str) -> tuple[Tensor, float]:
    """``W`` read as a matrix and its largest entry magnitude, which is finite only when every
    entry is (``max`` propagates NaN): one pass that both checks the matrix and sizes its
    :func:`_power_of_two_scales` (``check_finite``, which names what is wrong, runs only then)."""
    if not isinstance(W, Tensor):
        W = torch.as_tensor(W)
    if not torch.is_floating_point(W):
        raise ValueError(f"{name} has dtype {W.dtype}: a spectrum needs a floating-point weight")
    mat = as_matrix(W.detach(), name)  # an empty or 1-D tensor is an error there
    largest = float(torch.linalg.vector_norm(mat, ord=math.inf))
    if not math.isfinite(largest):
        check_finite(mat, name)
    return mat, largest


def _group_dtype(mats: Sequence[Tensor], device: torch.device) -> torch.dtype:
    wide = any(m.dtype == torch.float64 for m in mats) and supports_float64(device)
    return torch.float64 if wide else compute_dtype(mats[0])


def _eigvalsh(gram: Tensor) -> Tensor:
    # MPS has no symmetric eigensolver; the (small) Gram matrices go to the CPU there
    if gram.device.type == "mps":
        gram = gram.cpu()
    return torch.linalg.eigvalsh(gram)


#: entries whose magnitude lies outside ``[2**-SAFE_EXPONENT, 2**SAFE_EXPONENT]`` (largest entry
#: of a matrix) would overflow or underflow a float32 Gram matrix: ``max|W|**2 * cols`` must stay
#: below 3.4e38, and squares below 1e-38 vanish. Such a matrix is scaled by a power of two first
#: (exact in binary floating point, so every other matrix's eigenvalues are unchanged bit for bit)
SAFE_EXPONENT = 40


def _power_of_two_scales(largest: Sequence[float]) -> Tensor | None:
    """Per matrix, from its largest entry magnitude, the power of two that brings that entry near
    1 where float32 products would otherwise overflow or underflow; None when none needs it."""
    amax = torch.tensor(list(largest), dtype=torch.float64)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-300))), torch.zeros_like(amax))
    risky = exponent.abs() > SAFE_EXPONENT
    if not bool(risky.any()):
        return None
    return torch.where(risky, torch.exp2(-exponent), torch.ones_like(exponent))


def _gram_spectra(
    mats: Sequence[Tensor],
    *,
    names: Sequence[str] | None = None,
    device=None,
    entry_var: bool = True,
    float64: bool = False,
) -> list[_GramSpectrum]:
    """Eigenvalues of ``WᵀW / N`` (the smaller Gram matrix) for every matrix, one batched
    eigensolver call per stack of equal shape on the device. The Gram products are taken matrix
    by matrix into the stack (the same values as one batched product, bit for bit), so the weights
    themselves are never copied into a stack; ``entry_var=False`` skips the entry variance, which
    only ``sigma2="var"`` and the ``"report_text"`` SNR read (it is then NaN)."""
    names = list(names) if names is not None else [f"mats[{i}]" for i in range(len(mats))]
    checked, largest = zip(*[_as_checked_matrix(W, name) for W, name in zip(mats, names)]) if mats else ((), ())
    dev = get_device(device)
    out: list[_GramSpectrum | None] = [None] * len(checked)
    for chunk in shape_batches({i: tuple(m.shape) for i, m in enumerate(checked)}, _BATCH_ELEMENTS):
        rows, cols = checked[chunk[0]].shape
        n, m = max(rows, cols), min(rows, cols)
        dtype = _group_dtype([checked[i] for i in chunk], dev)
        if float64 and supports_float64(dev):  # small eigenvalues to eps64 * lambda_max (layer_metrics)
            dtype = torch.float64
        scales = _power_of_two_scales([largest[i] for i in chunk])
        gram = torch.empty(len(chunk), m, m, device=dev, dtype=dtype)
        variances = []
        for j, i in enumerate(chunk):
            mat = checked[i].to(device=dev, dtype=dtype)
            if scales is not None:
                mat = mat * float(scales[j])
            # a contiguous, 64-byte aligned batch of one, laid out as one matrix of a stack: the
            # batched product then takes the same kernel on the same alignment, so the values equal
            # a stacked product's bit for bit (``out=``, 2-D products and the unaligned tensors of a
            # safetensors file take other paths, which differ in round-off on small matrices)
            mat = mat.contiguous()
            if mat.device.type == "cpu" and mat.data_ptr() % _ALIGNMENT:
                mat = mat.clone()
            one = mat.unsqueeze(0)
            tall = one if rows >= cols else one.transpose(1, 2)  # N x M with N >= M
            gram[j] = (tall.transpose(1, 2) @ tall)[0]
            if entry_var:
                variances.append(mat.var(unbiased=False))
        gram /= n
        # round-off, not spectrum: a rank-one matrix then has one non-zero eigenvalue instead of
        # a bulk of round-off that the median fit would call noise (the cut lib.linalg uses)
        eigs = _eigvalsh(gram)
        eigs = zero_round_off_eigenvalues(eigs, eigs[..., -1:], dtype).to(device="cpu", dtype=torch.float64)
        var = (
            torch.stack(variances).to(device="cpu", dtype=torch.float64)
            if entry_var
            else torch.full((len(chunk),), math.nan, dtype=torch.float64)
        )
        if scales is not None:  # back to the matrices' own scale, in float64
            eigs = eigs / scales.view(-1, 1) ** 2
            var = var / scales**2
        for j, i in enumerate(chunk):
            out[i] = _GramSpectrum(eigs[j], rows, cols, float(var[j]))
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Reading a spectrum: noise level, threshold, SNR
# ---------------------------------------------------------------------------------------------


def _median(values: Tensor) -> float:
    # np.median convention (mean of the two middle values), as the report's code uses
    return float(torch.quantile(values, 0.5)) if len(values) else 0.0


def _bulk_median_sigma2(ascending: Tensor, n: int, m: int) -> float:
    """The fixed point of: sigma2 = median(bulk) / mp_median(q), bulk = eigenvalues at or below
    ``detection_threshold(sigma2)``. ``k`` (the number above) only grows from 0, so it terminates."""
    reference = mp_median(m / n)
    k = 0
    while True:
        sigma2 = _median(ascending[: m - k]) / reference
        k_next = int((ascending > detection_threshold(n, m, sigma2)).sum())
        if k_next <= k:
            return sigma2
        k = k_next


def _check_sigma2(sigma2) -> str | float:
    """``sigma2`` as an estimator name or a positive float; anything else is an error."""
    if isinstance(sigma2, str):
        if sigma2 not in SIGMA2_ESTIMATORS:
            raise ValueError(f"sigma2 must be a positive number or one of {SIGMA2_ESTIMATORS}, got {sigma2!r}")
        return sigma2
    try:
        value = float(sigma2)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"sigma2 must be a positive finite number (a known noise level) or one of {SIGMA2_ESTIMATORS}, got {sigma2!r}"
        )
    return value


def _noise_level(gs: _GramSpectrum, sigma2) -> float:
    sigma2 = _check_sigma2(sigma2)
    if sigma2 == "median":
        return _bulk_median_sigma2(gs.eigenvalues, gs.n, gs.m)
    if sigma2 == "var":
        if math.isnan(gs.entry_var):
            raise ValueError(
                "sigma2='var' needs the entries of W, not only its eigenvalues: call spectrum(W, sigma2='var')"
            )
        return gs.entry_var
    return sigma2


def _ratio(signal: float, bulk: float) -> float:
    if signal == 0.0:
        return 0.0
    return signal / bulk if bulk > 0 else math.inf


def _read_mp(gs: _GramSpectrum, sigma2="median") -> Spectrum:
    noise = _noise_level(gs, sigma2)
    q = gs.m / gs.n
    lo, hi = mp_edges(q, noise)
    threshold = hi + tracy_widom_margin(gs.n, gs.m, noise)
    descending = gs.eigenvalues.flip(0)
    is_signal = descending > threshold
    signal = float(descending[is_signal].sum())
    total = float(descending.sum())
    return Spectrum(
        eigenvalues=descending,
        shape=(gs.rows, gs.cols),
        q=q,
        sigma2=noise,
        lambda_minus=lo,
        lambda_plus=hi,
        threshold=threshold,
        n_signal=int(is_signal.sum()),
        snr=_ratio(signal, total - signal),
        signal_fraction=signal / total if total > 0 else 0.0,
    )


def _padded(eigenvalues: Tensor, size: int) -> Tensor:
    """The spectrum of the larger Gram matrix: the smaller one's eigenvalues plus zeros."""
    return torch.cat([eigenvalues.new_zeros(size - len(eigenvalues)), eigenvalues])


def _snr_mp(gs: _GramSpectrum) -> float:
    return _read_mp(gs).snr


def _snr_max_median(gs: _GramSpectrum) -> float:
    """``lambda_max / (median + 1e-8)`` of ``W Wᵀ / cols`` (``rows x rows``), as the report's
    ResNet notebook computes it."""
    outer = _padded(gs.eigenvalues * (gs.n / gs.cols), gs.rows)
    return float(outer.max()) / (_median(outer) + MAX_MEDIAN_EPS)


def _snr_report_text(gs: _GramSpectrum) -> float:
    """The report's ``compute_snr``: eigenvalues of ``WᵀW / min(N, M)`` (``cols x cols``),
    floored at 1e-9, edge ``var(W) * (1 + sqrt(1/Q))**2`` with ``Q = max/min``."""
    corr = _padded(gs.eigenvalues * (gs.n / gs.m), gs.cols).clamp_min(REPORT_TEXT_EPS)
    edge = gs.entry_var * (1.0 + math.sqrt(gs.m / gs.n)) ** 2
    above = corr > edge
    return float(corr[above].sum()) / (float(corr[~above].sum()) + REPORT_TEXT_EPS)


#: old names of SNR variants -> their names now. ``"seed"`` was the report's text SNR, named
#: after the report (seed 000), which readers took for a random seed.
SNR_ALIASES: dict[str, str] = {"seed": "report_text"}


class _SnrMethods(Mapping):
    """The SNR variants by name: iterating gives the names in use, while ``in`` and ``[]`` also
    accept the old names of :data:`SNR_ALIASES` (``"seed" in SNR_METHODS``)."""

    def __init__(self, methods: dict[str, Callable[[_GramSpectrum], float]]):
        self._methods = methods

    def __getitem__(self, name):
        return self._methods[SNR_ALIASES.get(name, name) if isinstance(name, str) else name]

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and SNR_ALIASES.get(name, name) in self._methods

    def __iter__(self):
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def __repr__(self) -> str:
        return f"SNR_METHODS({', '.join(self._methods)}; aliases {SNR_ALIASES})"


SNR_METHODS: Mapping[str, Callable[[_GramSpectrum], float]] = _SnrMethods(
    {
        "mp": _snr_mp,
        "max_median": _snr_max_median,
        "report_text": _snr_report_text,
    }
)


def _valid_names() -> str:
    aliases = ", ".join(f"{old!r} for {new!r}" for old, new in SNR_ALIASES.items())
    return f"{', '.join(map(repr, SNR_METHODS))} (or the old name {aliases})"


def canonical_snr_method(name) -> str:
    """The name an SNR variant goes by in records, labels and hashes: ``name`` itself, or what an
    old name of :data:`SNR_ALIASES` stands for (``"seed"`` -> ``"report_text"``). Anything else is a
    one-line ``ValueError`` listing the variants."""
    if name not in SNR_METHODS:
        raise ValueError(f"unknown SNR method {name!r}; choose one of {_valid_names()}")
    return SNR_ALIASES.get(name, name)


def check_snr_method(method: str) -> None:
    """A ``ValueError`` listing the variants unless ``method`` is one of :data:`SNR_METHODS` (or
    an old name of one, :data:`SNR_ALIASES`)."""
    canonical_snr_method(method)


def _snr_fn(method: str) -> Callable[[_GramSpectrum], float]:
    return SNR_METHODS[canonical_snr_method(method)]


def _check_sigma2_applies(method: str, sigma2) -> None:
    if method != "mp" and not (isinstance(sigma2, str) and sigma2 == "median"):
        raise ValueError(f"sigma2 only applies to method='mp'; {method!r} has its own fixed normalisation")


def _reads_entry_var(sigma2="median", method: str = "mp") -> bool:
    # the entry variance costs a pass over every weight; only these two readings use it
    return (isinstance(sigma2, str) and sigma2 == "var") or canonical_snr_method(method) == "report_text"


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def spectrum(W: Tensor, *, sigma2="median", device=None) -> Spectrum:
    """The Marchenko–Pastur reading of one weight matrix (any float dtype; conv kernels are read
    as ``(out, in*kh*kw)``). ``sigma2``: ``"median"`` (robust bulk fit, default), ``"var"`` (entry
    variance, as the report) or a known noise level. 1-D tensors and NaN/Inf are errors."""
    _check_sigma2(sigma2)  # fail before any linear algebra
    (gs,) = _gram_spectra([W], names=["W"], device=device, entry_var=_reads_entry_var(sigma2))
    return _read_mp(gs, sigma2)


def spectra(mats: Sequence[Tensor], *, sigma2="median", device=None) -> list[Spectrum]:
    """:func:`spectrum` of every matrix, with the eigenvalues computed in stacks of equal shape."""
    _check_sigma2(sigma2)
    gram_spectra = _gram_spectra(list(mats), device=device, entry_var=_reads_entry_var(sigma2))
    return [_read_mp(gs, sigma2) for gs in gram_spectra]


def from_eigenvalues(eigenvalues, shape: tuple[int, int], *, sigma2="median") -> Spectrum:
    """The Marchenko–Pastur reading of eigenvalues computed elsewhere (for example squared
    singular values over ``max(shape)``): the ``min(shape)`` eigenvalues of ``WᵀW / N``, any order.
    ``sigma2="var"`` is not available here because it needs the entries of ``W``."""
    rows, cols = (int(d) for d in shape)
    values = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten().cpu()
    if len(values) != min(rows, cols):
        raise ValueError(f"a {rows}x{cols} matrix has {min(rows, cols)} Gram eigenvalues, got {len(values)}")
    check_finite(values, "eigenvalues")
    return _read_mp(_GramSpectrum(values.sort().values, rows, cols, math.nan), sigma2)


def snr(W: Tensor, method: str = "mp", *, sigma2="median", device=None) -> float:
    """The SNR of one weight matrix: ``"mp"`` (ours), ``"max_median"`` (report, ResNet) or
    ``"report_text"`` (report, NLP, shape-biased; old name ``"seed"``). ``sigma2`` applies to
    ``"mp"`` only."""
    method = canonical_snr_method(method)
    fn = _snr_fn(method)
    _check_sigma2_applies(method, sigma2)
    if method == "mp":
        return spectrum(W, sigma2=sigma2, device=device).snr
    (gs,) = _gram_spectra([W], names=["W"], device=device, entry_var=_reads_entry_var(method=method))
    return fn(gs)


def snr_batch(mats: Sequence[Tensor], method: str = "mp", *, device=None) -> Tensor:
    """One SNR per matrix (float64, CPU), the same values as :func:`snr` one by one, with the
    eigenvalues computed in stacks of equal shape on ``get_device(device)``."""
    method = canonical_snr_method(method)
    fn = _snr_fn(method)
    spectra = _gram_spectra(list(mats), device=device, entry_var=_reads_entry_var(method=method))
    return torch.tensor([fn(gs) for gs in spectra], dtype=torch.float64)


def scan(model_or_state_dict, *, include=None, exclude=None, method: str = "mp", device=None) -> pd.DataFrame:
    """One row per weight matrix of a model (floating-point tensors with two or more dimensions
    whose names pass ``include``/``exclude``; 1-D tensors are skipped).

    Columns: ``name``, ``rows``, ``cols``, ``q``, the MP fit (``sigma2``, ``lambda_plus``,
    ``threshold``, ``lambda_max``, ``n_signal``, ``signal_fraction``, ``snr_mp``) and ``snr``, the
    SNR of ``method`` (equal to ``snr_mp`` for ``"mp"``)."""
    method = canonical_snr_method(method)
    fn = _snr_fn(method)
    sd = to_state_dict(model_or_state_dict)
    names = [k for k, v in sd.items() if is_matrix(v) and matches(k, include, exclude)]
    spectra = _gram_spectra(
        [sd[k] for k in names], names=names, device=device, entry_var=_reads_entry_var(method=method)
    )
    rows = []
    for name, gs in zip(names, spectra):
        sp = _read_mp(gs)
        rows.append(
            {
                "name": name,
                "rows": gs.rows,
                "cols": gs.cols,
                "q": sp.q,
                "sigma2": sp.sigma2,
                "lambda_plus": sp.lambda_plus,
                "threshold": sp.threshold,
                "lambda_max": sp.lambda_max,
                "n_signal": sp.n_signal,
                "signal_fraction": sp.signal_fraction,
                "snr_mp": sp.snr,
                "snr": sp.snr if method == "mp" else fn(gs),
            }
        )
    columns = [
        "name",
        "rows",
        "cols",
        "q",
        "sigma2",
        "lambda_plus",
        "threshold",
        "lambda_max",
        "n_signal",
        "signal_fraction",
        "snr_mp",
        "snr",
    ]
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------------
# WeightWatcher-style per-layer metrics
# ---------------------------------------------------------------------------------------------

METRIC_COLUMNS = [
    "alpha",
    "alpha_weighted",
    "xmin",
    "stable_rank",
    "log_spectral_norm",
    "log_norm",
    "entropy",
    "rank_loss",
]


#: eigenvalues at or below this are left out of the power-law fit (WeightWatcher's ``EVALS_THRESH``)
POWER_LAW_THRESHOLD = 1e-5
#: tails shorter than this are fitted by WeightWatcher's small-sample rule (``WW_powerlaw.SMALL_N_CUTOFF``)
SMALL_TAIL = 20
#: candidates whose KS distances are computed at once (bounds the ``O(block * M)`` temporaries)
_KS_BLOCK = 256


def power_law_fit(eigenvalues, *, threshold: float = POWER_LAW_THRESHOLD) -> tuple[float, float, float]:
    """``(alpha, xmin, D)``: the continuous power law ``p(x) ~ x**-alpha`` on ``x >= xmin`` fitted to
    the tail of a spectrum as Clauset, Shalizi and Newman (2009) do, in the form WeightWatcher 0.7.7's
    ``analyze()`` runs by default (``pl_package="ww"``: ``WW_powerlaw.WWFit``, no ``fix_fingers``, no
    ``xmin``/``xmax``, eigenvalues above ``threshold`` only): for every candidate ``xmin`` (each
    eigenvalue but the largest) the maximum-likelihood ``alpha = 1 + n / sum(log(x / xmin))`` of the
    ``n`` eigenvalues at or above it, and the ``xmin`` whose fit has the smallest Kolmogorov–Smirnov
    distance ``D = max_i |F(x_i) - i / n|`` between the fitted CDF and the empirical one (taken at
    the left of each step, as WeightWatcher does; ``D = 1`` where ``alpha <= 1``; the first of equal
    minima). Fewer than :data:`SMALL_TAIL` eigenvalues: WeightWatcher's small-sample rule
    (:func:`_small_power_law_fit`). ``O(M**2)`` for ``M`` eigenvalues, in blocks of candidates."""
    x = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    x = x[x > threshold]
    if len(x) < 2:
        return math.nan, math.nan, math.nan
    if len(x) < SMALL_TAIL:
        return _small_power_law_fit(x)
    m = len(x)
    logs = np.log(x)
    suffix = np.cumsum(logs[::-1])[::-1]  # sum of log x over x[c:]
    candidates = np.arange(m - 1)  # xmin = x[c]; the tail is x[c:]
    n = (m - candidates).astype(np.float64)
    with np.errstate(divide="ignore"):
        alpha = 1.0 + n / (suffix[:-1] - n * logs[:-1])
    distance = np.ones(m - 1)
    for lo in range(0, m - 1, _KS_BLOCK):
        c = candidates[lo : lo + _KS_BLOCK]
        rank = np.arange(m)[None, :] - c[:, None]  # 0-based position inside the tail
        in_tail = rank >= 0
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            model = 1.0 - np.where(in_tail, x[None, :] / x[c, None], 1.0) ** (1.0 - alpha[c, None])
            gap = np.where(in_tail, np.abs(model - rank / n[c, None]), 0.0)
        distance[lo : lo + len(c)] = np.where(alpha[c] > 1.0, gap.max(axis=1), 1.0)
    best = int(np.argmin(distance))
    return float(alpha[best]), float(x[best]), float(distance[best])


def _small_power_law_fit(x: np.ndarray, min_tail: int = 8) -> tuple[float, float, float]:
    """What WeightWatcher 0.7.7 returns for fewer than :data:`SMALL_TAIL` sorted eigenvalues
    (``WWFit.fit_powerlaw_smallN``): candidates with tails of at least ``min_tail`` (the whole
    spectrum when it is shorter), the bias-corrected ``alpha = 1 + (n - 1) / sum(log(x / xmin))``,
    and the smallest KS distance. (``fit_powerlaw_smallN`` ranks the candidates by
    ``D - 0.868 / sqrt(n)``, but ``WWFit.__init__`` then takes the smallest ``D`` among them, which
    is what ``analyze()`` reports; ``D = 1`` for the candidates it skips.)"""
    m, logs = len(x), np.log(x)
    alpha, distance = np.zeros(m - 1), np.ones(m - 1)
    for i in range(m - 1):
        n = m - i
        spread = logs[i:].sum() - n * logs[i]
        if (n < min_tail and not (i == 0 and m < min_tail)) or spread <= 1e-12:
            continue
        alpha[i] = 1.0 + (n - 1.0) / spread
        if alpha[i] > 1.0:
            distance[i] = float(np.max(np.abs(np.arange(n) / n - (1.0 - (x[i:] / x[i]) ** (1.0 - alpha[i])))))
    best = int(np.argmin(distance))
    return float(alpha[best]), float(x[best]), float(distance[best])


def metrics_from_eigenvalues(eigenvalues, shape: tuple[int, int]) -> dict:
    """WeightWatcher's per-layer metrics from the ``min(shape)`` eigenvalues of ``WᵀW / N`` (any
    order), in its convention of the unnormalised ``WᵀW`` (eigenvalues times ``N = max(shape)``):

    * ``alpha``, ``xmin``: the power-law tail fit (:func:`power_law_fit`); ``alpha_weighted =
      alpha * log10(lambda_max)``;
    * ``stable_rank = sum(lambda) / lambda_max`` (``||W||_F² / ||W||_2²``);
    * ``log_spectral_norm = log10(lambda_max)`` (``log10 ||W||_2²``), ``log_norm = log10(sum(lambda))``
      (``log10 ||W||_F²``);
    * ``entropy``: ``-sum(p log p) / log(rank)`` with ``p = lambda / sum(lambda)``, 1 for a flat
      spectrum, near 0 for a single spike;
    * ``rank_loss``: ``min(shape)`` less the numerical rank, the singular values not above
      ``sigma_max * N * eps`` (float64, ``numpy.linalg.matrix_rank``'s rule).

    Rank loss and entropy depend on the smallest eigenvalues, which a float32 Gram matrix only
    knows to ``~eps32 * lambda_max`` (its smallest are ~2 % off on MiniLM); :func:`layer_metrics`
    therefore computes the spectra in float64."""
    rows, cols = (int(d) for d in shape)
    n = max(rows, cols)
    lam = np.sort(np.asarray(torch.as_tensor(eigenvalues, dtype=torch.float64).cpu(), dtype=np.float64))[::-1] * n
    lam = np.clip(lam, 0.0, None)
    lam_max, total = float(lam[0]), float(lam.sum())
    sv = np.sqrt(lam)
    rank = int(np.count_nonzero(sv > sv[0] * n * np.finfo(np.float64).eps))
    p = lam[lam > 0] / total if total > 0 else np.zeros(0)
    entropy = float(-(p * np.log(p)).sum() / math.log(rank)) if rank > 1 else 0.0
    alpha, xmin, _ = power_law_fit(lam)
    log_max = math.log10(lam_max) if lam_max > 0 else -math.inf
    return {
        "alpha": alpha,
        "alpha_weighted": alpha * log_max,
        "xmin": xmin,
        "stable_rank": total / lam_max if lam_max > 0 else 0.0,
        "log_spectral_norm": log_max,
        "log_norm": math.log10(total) if total > 0 else -math.inf,
        "entropy": entropy,
        "rank_loss": len(lam) - rank,
    }


def layer_metrics(model_or_state_dict, *, include=None, exclude=None, device=None) -> pd.DataFrame:
    """One row per weight matrix (as :func:`scan`): ``name``, ``rows``, ``cols`` and the
    :data:`METRIC_COLUMNS` of :func:`metrics_from_eigenvalues`, from float64 Gram spectra (on a
    device without float64, such as MPS, the spectra stay float32 and the smallest eigenvalues,
    hence ``rank_loss`` and ``entropy``, are only as good as that)."""
    sd = to_state_dict(model_or_state_dict)
    names = [k for k, v in sd.items() if is_matrix(v) and matches(k, include, exclude)]
    spectra = _gram_spectra([sd[k] for k in names], names=names, device=device, entry_var=False, float64=True)
    rows = [
        {"name": name, "rows": gs.rows, "cols": gs.cols, **metrics_from_eigenvalues(gs.eigenvalues, (gs.rows, gs.cols))}
        for name, gs in zip(names, spectra)
    ]
    return pd.DataFrame(rows, columns=["name", "rows", "cols", *METRIC_COLUMNS])
