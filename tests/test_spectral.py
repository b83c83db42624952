"""lib.spectral against random-matrix theory: pure noise has no spikes and a flat SNR for every
aspect ratio, planted spikes are found where the BBP formula puts them, the ESD follows the
Marchenko–Pastur law, and the report's two SNRs equal literal transcriptions of its code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy.special import airy

from lib import spectral
from lib.spectral import (
    bbp_location,
    detection_strength,
    mp_cdf,
    mp_edges,
    mp_median,
    mp_pdf,
    planted_spikes,
    scan,
    shuffled,
    snr,
    snr_batch,
    spectrum,
)

NOISE_SHAPES = [(768, 768), (3072, 768), (768, 3072), (64, 576), (576, 64), (128, 4096)]
SIGMAS = [1.0, 0.02, 3e-4, 25.0]


def noise(shape, sigma=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return sigma * torch.randn(*shape, generator=gen)


def draws_for(shape):
    """Many draws where they are cheap, fewer for the 768-wide Gram matrices (still > one seed)."""
    return 40 if min(shape) <= 128 else 4


def planted(n, m, strengths, sigma, seed):
    return planted_spikes(n, m, strengths, sigma=sigma, generator=torch.Generator().manual_seed(seed))


# --- pure noise --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", NOISE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pure_noise_has_no_spikes_and_tiny_snr(shape):
    sigmas = [SIGMAS[i % len(SIGMAS)] for i in range(draws_for(shape))]
    mats = [noise(shape, sigma, seed=1000 * i + shape[0] + shape[1]) for i, sigma in enumerate(sigmas)]
    spectra = spectral.spectra(mats)
    assert max(sp.n_signal for sp in spectra) <= 2
    assert max(sp.snr for sp in spectra) < 0.02
    ratios = np.array([sp.sigma2 / sigma**2 for sp, sigma in zip(spectra, sigmas)])
    assert np.all(np.abs(ratios - 1) < 0.05), f"sigma2 estimates off by {np.abs(ratios - 1).max():.3f}"


@pytest.mark.parametrize("q", [1.0, 0.25, 1 / 9])
def test_noise_esd_follows_marchenko_pastur(q):
    m = 384
    W = noise((int(m / q), m), seed=3)
    eigs = np.sort(spectrum(W, sigma2=1.0).eigenvalues.numpy())
    empirical = np.arange(1, m + 1) / m
    ks = np.max(np.maximum(np.abs(empirical - mp_cdf(eigs, q)), np.abs(empirical - 1 / m - mp_cdf(eigs, q))))
    assert ks < 0.02, f"KS distance {ks:.4f} between the ESD and Marchenko–Pastur"


def test_largest_noise_eigenvalue_crosses_the_edge_but_not_the_threshold():
    """Why the threshold has a Tracy–Widom margin: over many draws the top noise eigenvalue lands
    above lambda_plus often, above the threshold (almost) never."""
    top = np.array([sp.lambda_max for sp in spectral.spectra([noise((200, 50), seed=s) for s in range(400)])])
    assert np.mean(top > mp_edges(0.25)[1]) > 0.05
    assert np.mean(top > spectral.detection_threshold(200, 50)) <= 0.005


# --- planted spikes ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(512, 512), (1024, 256), (256, 1024), (96, 864)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sigma", [0.01, 0.5])
@pytest.mark.parametrize("k", [1, 3])
def test_planted_spikes_are_found(shape, sigma, k):
    q = min(shape) / max(shape)
    strengths = [q**0.25 * (2.0 + i) for i in range(k)]  # comfortably past the BBP transition
    for seed in range(3):
        sp = spectrum(planted(*shape, strengths, sigma, seed))
        assert sp.n_signal == k
        assert abs(sp.sigma2 / sigma**2 - 1) < 0.05
        expected = sorted((bbp_location(t, q, sigma**2) for t in strengths), reverse=True)
        np.testing.assert_allclose(sp.eigenvalues[:k].numpy(), expected, rtol=0.1)  # outliers fluctuate by O(1/sqrt(N))
        assert sp.snr == pytest.approx(sum(expected) / (sp.eigenvalues.sum().item() - sum(expected)), rel=0.1)


def test_median_fit_ignores_spikes_that_inflate_the_entry_variance():
    """Strong spikes inflate the entry variance, the report's noise level, enough to hide a weak
    (but detectable) one; the median fit of the bulk is not moved by them."""
    shape, q = (1024, 256), 0.25
    W = planted(*shape, [6.0, 5.0, 4.0, 1.1], 1.0, seed=11)
    robust, naive = spectrum(W), spectrum(W, sigma2="var")
    assert abs(robust.sigma2 - 1) < 0.03
    assert naive.sigma2 > 1.2
    assert robust.n_signal == 4 and naive.n_signal == 3
    assert bbp_location(1.1, q, 1.0) > robust.threshold


def test_spike_leaves_the_bulk_only_past_the_detection_threshold():
    n, m = 1024, 256
    t_detect = detection_strength(n, m)
    assert bbp_location(t_detect, m / n) == pytest.approx(spectral.detection_threshold(n, m))
    assert t_detect > (m / n) ** 0.25  # detection needs more than the asymptotic BBP transition
    weak, strong = spectrum(planted(n, m, [0.5 * t_detect], 1.0, 5)), spectrum(planted(n, m, [1.5 * t_detect], 1.0, 5))
    assert weak.n_signal == 0 and weak.snr == 0.0
    assert strong.n_signal == 1 and strong.eigenvalues[0] > strong.threshold


def test_shuffling_entries_destroys_planted_structure():
    W = planted(512, 128, [4.0, 3.0], 0.1, 6)
    null = shuffled(W, torch.Generator().manual_seed(0))
    assert sorted(null.flatten().tolist()) == sorted(W.flatten().tolist())
    assert spectrum(W).n_signal == 2 and spectrum(null).n_signal == 0


# --- definitions and identities -----------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 48), cols=st.integers(2, 48), seed=st.integers(0, 2**16))
def test_known_sigma2_gives_the_exact_edge(rows, cols, seed):
    sp = spectrum(noise((rows, cols), seed=seed), sigma2=1.0)
    q = min(rows, cols) / max(rows, cols)
    assert sp.q == q
    assert sp.lambda_plus == (1 + math.sqrt(q)) ** 2
    assert sp.lambda_minus == (1 - math.sqrt(q)) ** 2
    assert sp.threshold > sp.lambda_plus
    assert len(sp.eigenvalues) == min(rows, cols)
    assert torch.all(sp.eigenvalues[:-1] >= sp.eigenvalues[1:])


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(4, 40), cols=st.integers(4, 40), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_snr_is_scale_invariant_and_signal_fraction_consistent(rows, cols, scale, seed):
    W = planted(rows, cols, [3.0], 1.0, seed).double()
    a, b = spectrum(W), spectrum(W * scale)
    assert a.n_signal == b.n_signal
    assert b.snr == pytest.approx(a.snr, rel=1e-9)
    assert b.sigma2 == pytest.approx(a.sigma2 * scale**2, rel=1e-9)
    assert a.signal_fraction == pytest.approx(a.snr / (1 + a.snr), rel=1e-9, abs=1e-12)


def test_eigenvalues_equal_squared_singular_values_over_the_larger_dimension():
    for shape in [(300, 120), (120, 300), (16, 8, 3, 3)]:
        W = noise(shape, seed=1).double()
        mat = W.reshape(shape[0], -1)
        ref = torch.linalg.svdvals(mat) ** 2 / max(mat.shape)
        sp = spectrum(W)
        torch.testing.assert_close(sp.eigenvalues, ref, rtol=1e-10, atol=1e-12)
        slow = spectral.from_eigenvalues(ref.flip(0), mat.shape)
        assert (slow.sigma2, slow.n_signal) == pytest.approx((sp.sigma2, sp.n_signal), rel=1e-9)
        assert slow.snr == pytest.approx(sp.snr, rel=1e-9, abs=1e-15)
    with pytest.raises(ValueError, match="needs the entries"):
        spectral.from_eigenvalues(ref, mat.shape, sigma2="var")
    with pytest.raises(ValueError, match="has 8 Gram eigenvalues"):
        spectral.from_eigenvalues(torch.ones(5), (8, 16))


def test_mp_density_is_normalised_with_mean_sigma2():
    for q in [1.0, 0.5, 0.1]:
        lo, hi = mp_edges(q, 2.0)
        mass = integrate.quad(lambda x: mp_pdf(x, q, 2.0), lo, hi, limit=200)[0]
        mean = integrate.quad(lambda x: x * mp_pdf(x, q, 2.0), lo, hi, limit=200)[0]
        assert mass == pytest.approx(1.0, abs=1e-6)
        assert mean == pytest.approx(2.0, rel=1e-6)
        assert mp_cdf(2.0 * mp_median(q), q, 2.0) == pytest.approx(0.5, abs=1e-7)
    assert mp_pdf([-1.0, 0.0, 100.0], 0.5).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="q = M/N"):
        mp_pdf(1.0, 2.0)


def test_tracy_widom_quantile_constant():
    """F1(s) = det(I - K) with K(x, y) = Ai((x+y)/2)/2 on (s, inf) (Bornemann 2010), evaluated
    by Gauss–Legendre quadrature, equals the detection level at TW1_QUANTILE."""
    nodes, weights = np.polynomial.legendre.leggauss(80)
    s, length = spectral.TW1_QUANTILE, 16.0
    x, w = s + (nodes + 1) * length / 2, weights * length / 2
    kernel = 0.5 * airy((x[:, None] + x[None, :]) / 2)[0]
    root_w = np.sqrt(w)
    f1 = np.linalg.det(np.eye(len(x)) - root_w[:, None] * kernel * root_w[None, :])
    assert f1 == pytest.approx(spectral.DETECTION_LEVEL, abs=2e-5)


# --- dtypes, conv kernels, bad input --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    W = planted(512, 256, [4.0, 3.0], 0.05, seed=2)
    ref, low = spectrum(W), spectrum(W.to(dtype))
    assert low.n_signal == ref.n_signal == 2
    assert low.sigma2 == pytest.approx(ref.sigma2, rel=1e-2)
    assert low.snr == pytest.approx(ref.snr, rel=1e-2)


def test_conv_kernels_are_read_as_out_by_in_times_kernel():
    kernel = noise((64, 32, 3, 3), seed=4)
    sp = spectrum(kernel)
    assert sp.shape == (64, 288) and sp.q == 64 / 288
    assert sp.n_signal == 0
    assert snr(kernel) == spectrum(kernel.reshape(64, -1)).snr


def test_bad_input_is_a_clear_error():
    W = noise((32, 16))
    W[3, 4] = float("nan")
    with pytest.raises(ValueError, match="W contains 1 NaN/Inf"):
        spectrum(W)
    with pytest.raises(ValueError, match="1-D tensor is not a matrix"):
        spectrum(torch.ones(10))
    with pytest.raises(ValueError, match="floating-point"):
        spectrum(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown SNR method 'svd'"):
        snr(noise((8, 8)), "svd")
    with pytest.raises(ValueError, match="sigma2 must be"):
        spectrum(noise((8, 8)), sigma2="mean")
    with pytest.raises(ValueError, match="sigma2 must be"):
        spectrum(noise((8, 8)), sigma2=-1.0)
    with pytest.raises(ValueError, match="sigma2 only applies"):
        snr(noise((8, 8)), "seed", sigma2=1.0)


def test_zero_matrix_has_zero_snr():
    sp = spectrum(torch.zeros(16, 8))
    assert sp.snr == 0.0 and sp.n_signal == 0 and sp.signal_fraction == 0.0


# --- the report's SNRs, against literal transcriptions of its code ---------------------------------


def report_nlp_snr(W: np.ndarray) -> float:
    """compute_snr of Notebooks/02_BERT_SST2_Emotion..py (maste473/Spectrum-Guided-Model-Merging)."""
    W = W.astype(np.float32).reshape(W.shape[0], -1)
    N, M = W.shape
    Q = max(N, M) / min(N, M)
    sigma_2 = np.var(W)
    lambda_plus = sigma_2 * (1 + np.sqrt(1 / Q)) ** 2
    eigs = np.maximum(np.linalg.eigvalsh((W.T @ W) / min(N, M)), 1e-9)
    return np.sum(eigs[eigs > lambda_plus]) / (np.sum(eigs[eigs <= lambda_plus]) + 1e-9)


def report_vision_snr(W: np.ndarray) -> float:
    """compute_snr of Notebooks/01_ResNet_Vision_Analysis.ipynb (same repository)."""
    W = W.reshape(W.shape[0], -1)
    eigvals = np.linalg.eigvalsh((W @ W.T) / W.shape[1])
    return eigvals.max() / (np.median(eigvals) + 1e-8)


@pytest.mark.parametrize("shape", [(96, 96), (288, 96), (96, 288), (64, 16, 3, 3), (10, 512), (512, 10)])
def test_report_text_and_max_median_match_the_report_code(shape):
    rows, cols = shape[0], int(np.prod(shape[1:]))
    W = planted(rows, cols, [3.0], 0.05, seed=7).reshape(shape)
    # where the report's Gram is rank-deficient and its bulk (or median) holds nothing but
    # float32 round-off of zero eigenvalues, its value is arbitrary and ours uses exact zeros
    if cols / rows < 4:
        assert snr(W, "report_text") == pytest.approx(report_nlp_snr(W.numpy()), rel=1e-4)
    if rows <= cols:
        assert snr(W, "max_median") == pytest.approx(report_vision_snr(W.numpy()), rel=1e-4)


@pytest.mark.parametrize("scale", [0.02, 0.1, 1.0])
@pytest.mark.parametrize("cols", [64, 128, 256, 320])
def test_report_text_snr_is_the_report_value_below_the_critical_aspect_ratio(scale, cols):
    """Exact for wide matrices up to cols/rows = 5, whatever the scale (the limit is 3 + 2 sqrt(2) = 5.83
    for large matrices; near it the smallest eigenvalues of a finite one straddle the edge)."""
    W = noise((64, cols), scale, seed=cols)
    assert snr(W, "report_text") == pytest.approx(report_nlp_snr(W.numpy()), rel=1e-5)


def test_report_text_snr_beyond_the_critical_aspect_ratio_has_a_round_off_denominator():
    """Wider than 5.83: the whole non-zero spectrum is above the edge, so the denominator is the
    floor of the cols - rows zero eigenvalues (ours) or their float32 round-off (the report's)."""
    rows, cols = 64, 384
    W = noise((rows, cols), 1.0, seed=3)
    corr = torch.linalg.eigvalsh(W.double().T @ W.double() / rows)
    signal = float(corr[-rows:].sum())
    assert snr(W, "report_text") == pytest.approx(signal / ((cols - rows) * 1e-9 + 1e-9), rel=1e-4)
    assert report_nlp_snr(W.numpy()) < snr(W, "report_text") / 10  # round-off well above the 1e-9 floor


def test_report_text_snr_depends_on_shape_for_pure_noise():
    """The report's normalisation (by min(N, M)) makes pure noise look like signal as soon as the
    matrix is not square; ours stays at zero for every shape."""
    square, tall, wide = (noise(s, 0.02, seed=8) for s in [(256, 256), (1024, 256), (256, 1024)])
    assert snr(square, "report_text") < 0.05
    assert snr(tall, "report_text") > 5 and snr(wide, "report_text") > 5
    assert snr(noise((64, 576), 0.02, seed=8), "report_text") > 1e4  # the whole bulk above its edge
    assert max(snr(W) for W in (square, tall, wide)) == 0.0


# --- batched paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(spectral.SNR_METHODS))
def test_snr_batch_equals_snr_one_by_one(method):
    mats = [planted(48, 96, [2.5], 0.1, s) for s in range(3)] + [noise((96, 48), seed=9), noise((8, 4, 3, 3), seed=10)]
    mats.append(planted(96, 48, [3.0, 2.0], 1.0, 12).half())
    batch = snr_batch(mats, method)
    assert batch.dtype == torch.float64 and batch.shape == (len(mats),)
    one_by_one = torch.tensor([snr(W, method) for W in mats], dtype=torch.float64)
    torch.testing.assert_close(batch, one_by_one, rtol=1e-5, atol=0.0)


def test_scan_rows_filters_and_errors():
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16), torch.nn.BatchNorm1d(16)
    )
    table = scan(model)
    assert table["name"].tolist() == ["0.weight", "2.weight"]  # biases and norm vectors skipped
    assert table[["rows", "cols"]].values.tolist() == [[128, 64], [16, 128]]
    assert (table["snr"] == table["snr_mp"]).all()
    assert table.loc[0, "snr_mp"] == spectrum(model[0].weight).snr
    assert scan(model, exclude="^2").name.tolist() == ["0.weight"]
    assert scan(model, include="2").name.tolist() == ["2.weight"]
    report_text = scan(model.state_dict(), method="report_text")
    assert report_text.loc[1, "snr"] == pytest.approx(snr(model[2].weight, "report_text"), rel=1e-6)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["2.weight"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="'?2.weight'? contains 1 NaN/Inf"):
        scan(sd)
