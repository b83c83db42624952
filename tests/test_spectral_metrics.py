"""lib.spectral's WeightWatcher-style per-layer metrics, each against a construction whose answer
is known in closed form: matrices built from chosen singular values, and eigenvalues drawn from
an exact power law."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lib import spectral


def with_singular_values(rows: int, cols: int, sv, seed: int = 0) -> torch.Tensor:
    """``U diag(sv) Vᵀ`` with random orthonormal ``U``, ``V`` (float64)."""
    gen = torch.Generator().manual_seed(seed)
    k = len(sv)
    u = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))[0]
    return (u * torch.as_tensor(sv, dtype=torch.float64)) @ v.T


def test_norms_and_stable_rank_of_known_singular_values():
    sv = np.array([4.0, 2.0, 1.0, 0.5] + [0.25] * 28)
    table = spectral.layer_metrics({"w": with_singular_values(96, 32, sv).float()})
    row = table.iloc[0]
    assert row.stable_rank == pytest.approx((sv**2).sum() / 16.0, rel=1e-5)
    assert row.log_spectral_norm == pytest.approx(math.log10(16.0), abs=1e-6)
    assert row.log_norm == pytest.approx(math.log10((sv**2).sum()), abs=1e-6)
    assert row.rank_loss == 0


def test_rank_loss_counts_the_missing_directions_even_below_float32_round_off():
    # rank 10 of 40, plus one direction at 1e-5 of the largest: it is below the float32 Gram's
    # round-off cut (~sqrt(k) eps32 lambda_max, i.e. sigma ~1e-3 sigma_max) but far above
    # numpy.linalg.matrix_rank's float64 tolerance, so it is rank, not loss
    sv = [1.0] * 10 + [1e-5]
    w = with_singular_values(120, 40, sv)
    row = spectral.layer_metrics({"w": w}).iloc[0]
    assert row.rank_loss == 40 - 11 == 40 - np.linalg.matrix_rank(w.numpy())


def test_entropy_is_one_for_a_flat_spectrum_and_falls_with_a_spike():
    flat = spectral.metrics_from_eigenvalues(np.ones(50), (100, 50))
    assert flat["entropy"] == pytest.approx(1.0, abs=1e-12)
    spiked = spectral.metrics_from_eigenvalues(np.r_[1e4, np.ones(49)], (100, 50))
    p = np.r_[1e4, np.ones(49)] / (1e4 + 49)
    assert spiked["entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(50), rel=1e-12)
    assert spiked["entropy"] < 0.1


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_power_law_fit_recovers_the_exponent_of_an_exact_power_law(alpha):
    rng = np.random.default_rng(1)
    xmin = 0.7
    tail = xmin * (1.0 - rng.random(3000)) ** (-1.0 / (alpha - 1.0))  # Pareto: p(x) ~ x^-alpha on x >= xmin
    bulk = rng.uniform(0.01, xmin, 1000)  # below xmin, not a power law
    fit_alpha, fit_xmin, distance = spectral.power_law_fit(np.r_[bulk, tail])
    assert fit_alpha == pytest.approx(alpha, abs=0.15)
    assert fit_xmin == pytest.approx(xmin, rel=0.15)
    assert distance < 0.05
    m = spectral.metrics_from_eigenvalues(np.r_[bulk, tail] / 5000, (5000, 4000))  # WW's scale: times N
    assert m["alpha"] == pytest.approx(fit_alpha)
    assert m["alpha_weighted"] == pytest.approx(fit_alpha * math.log10(np.max(tail)))


def test_power_law_fit_leaves_out_eigenvalues_at_weightwatchers_threshold():
    # a rank-deficient matrix's zero (and round-off) eigenvalues are not part of the tail fit
    rng = np.random.default_rng(2)
    x = 0.5 * (1.0 - rng.random(400)) ** (-1.0 / 2.0)
    assert spectral.power_law_fit(np.r_[np.zeros(50), np.full(20, 1e-6), x]) == spectral.power_law_fit(x)


@pytest.mark.parametrize("size", [5, 12, 19, 20, 64, 384, 1000])
def test_power_law_fit_is_weightwatchers_fit(size):
    # what WeightWatcher 0.7.7's analyze() fits by default (pl_package="ww"), small tails included
    ww_powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    rng = np.random.default_rng(size)
    spectra = [
        rng.pareto(2.0, size) + 1.0,
        rng.lognormal(0.0, 1.0, size),
        np.r_[0.5 * rng.random(size // 2), (1.0 - rng.random(size - size // 2)) ** (-1.0 / 2.5)],
    ]
    for x in spectra:
        fit = ww_powerlaw.WWFit(x[x > spectral.POWER_LAW_THRESHOLD])
        alpha, xmin, distance = spectral.power_law_fit(x)
        assert alpha == pytest.approx(fit.alpha, rel=1e-12)
        assert xmin == fit.xmin
        assert distance == pytest.approx(fit.D, rel=1e-12)


def test_layer_metrics_skip_vectors_and_keep_the_scan_order():
    sd = {"a": torch.randn(30, 20), "bias": torch.randn(20), "b": torch.randn(20, 50)}
    table = spectral.layer_metrics(sd)
    assert list(table.name) == ["a", "b"] == list(spectral.scan(sd).name)
    assert list(table.columns) == ["name", "rows", "cols", *spectral.METRIC_COLUMNS]
