"""The fast TIES/DARE kernels (issue 22) against the plain definitions they replace.

``kth_largest`` (bracket by a sample, band by bit patterns, count by float passes) must give the
value ``topk``/``kthvalue`` give, ties included; the one-pass trim must zero what
``masked_fill_(|x| < t, 0)`` zeroes and write the same zeros; the in-place disjoint mean must be
bit-identical to the mask-based one (signs of zeros too); DARE's float keep factor must be the
bool mask's 1.0/0.0. Inputs have duplicates, zeros, negative zeros and denormals, no NaN.
"""

from __future__ import annotations

import pytest
import torch

from lib.merge.dare import _keep_factor, keep_mask
from lib.merge.ties import (
    _SMALL_ROW,
    _trim_rows_below,
    disjoint_mean,
    elect_sign,
    kth_largest,
    trim_below,
)

SIZES = [1, 11, 4097, _SMALL_ROW + 1, 200_003]


def awkward(n: int, seed: int, rows: int = 1) -> torch.Tensor:
    """``(rows, n)`` float32 values with the edge cases a threshold meets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * 0.01
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[3::11] = -0.0
    flat[5::13] = torch.round(flat[5::13] * 200) / 200  # many duplicates
    flat[2::17] = 1e-42 * torch.sign(flat[2::17])  # denormals
    if seed % 2:
        flat[: n // 2] = flat[0]  # a long run of one value
    return x


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[t.dtype])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kth_largest_is_kthvalue(n, seed):
    magnitude = awkward(n, seed, rows=2).abs()
    for k in sorted({1, min(2, n), max(1, n // 5), max(1, n // 2), n}):
        got = kth_largest(magnitude, k)
        expected = torch.kthvalue(magnitude, n - k + 1, dim=1, keepdim=True).values
        assert torch.equal(bits(got), bits(expected)), (n, seed, k)
        # the kept set: every entry at least the k-th largest, so >= k of them, ties included
        assert ((magnitude >= got).sum(1) >= k).all()


@pytest.mark.parametrize("n", SIZES)
def test_kth_largest_when_the_bracket_misses(n, monkeypatch):
    """A bracket that misses the k-th largest (here: forced to miss) falls back to a full rank."""
    import lib.merge.ties as ties

    magnitude = awkward(n, 3).abs()
    k = max(1, n // 5)
    monkeypatch.setattr(ties, "_bracket", lambda sample, k, n: (0.5, 0.75))  # above every entry
    expected = torch.kthvalue(magnitude, n - k + 1, dim=1, keepdim=True).values
    assert torch.equal(bits(kth_largest(magnitude, k)), bits(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_trim_rows_below_is_masked_fill(dtype, n):
    x = awkward(n, 4, rows=3).to(dtype)
    magnitude = x.abs().to(torch.float32)
    thresholds = torch.stack([magnitude[0].max(), magnitude[1].median(), torch.tensor(0.0)])
    if n > 1:
        thresholds[0] = magnitude[0].kthvalue(n - 1).values  # an entry's own value: a tie
    expected = x.clone().masked_fill_(magnitude < thresholds.reshape(-1, 1), 0)
    got = x.clone()
    _trim_rows_below(got, thresholds)
    assert torch.equal(bits(got), bits(expected))
    inf = x.clone()
    _trim_rows_below(inf, torch.full((3,), float("inf")))
    assert torch.equal(bits(inf), bits(torch.zeros_like(x)))
    # trim_below's in-place path is the same
    assert torch.equal(bits(trim_below(x.clone(), thresholds, inplace=True)), bits(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("experts", [1, 2, 3, 5])
def test_inplace_disjoint_mean_is_bit_identical(dtype, experts):
    taus = awkward(9_999, experts, rows=experts).to(dtype)
    taus[:, :50] = 0.0  # entries where every expert is zero
    taus[:, 50:100] = -0.0
    if experts > 1:
        taus[1, 100:200] = -taus[0, 100:200]  # summed mass exactly 0
    signs = elect_sign(taus)
    expected = disjoint_mean(taus, signs)
    got = disjoint_mean(taus.clone(), signs, inplace=True)
    assert torch.equal(bits(got), bits(expected))
    assert (bits(got[:100]) == 0).all()  # no agreeing entry: +0.0, not -0.0


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1 / 3])
def test_keep_factor_is_the_keep_mask(p):
    shape = torch.Size([333, 77])
    mask = keep_mask(shape, p, key="k", expert=1, seed=5)
    factor = _keep_factor(shape, p, key="k", expert=1, seed=5)
    assert torch.equal(factor.to(torch.float32), mask.to(torch.float32))
    assert 0 < int(mask.sum()) <= mask.numel()
