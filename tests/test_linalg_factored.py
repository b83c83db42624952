"""Exact SVDs of factored matrices (lib.linalg.factored_svd, concat_left_singular) against
torch.linalg.svd of the formed matrices, in float64."""

from __future__ import annotations

import pytest
import torch

from lib.linalg import concat_left_singular, factored_svd


@pytest.mark.parametrize("m,n,r", [(50, 40, 5), (20, 60, 1), (12, 9, 16), (64, 64, 64)])
def test_factored_svd_is_the_svd_of_the_product(m, n, r):
    g = torch.Generator().manual_seed(m + n + r)
    b = torch.randn(3, m, r, generator=g, dtype=torch.float64)
    a = torch.randn(3, r, n, generator=g, dtype=torch.float64)
    u, s, vh = factored_svd(b, a)
    k = min(m, n, r)
    assert u.shape == (3, m, k) and s.shape == (3, k) and vh.shape == (3, k, n)
    product = b @ a
    torch.testing.assert_close(s, torch.linalg.svdvals(product)[..., :k], rtol=1e-12, atol=1e-12 * float(s.max()))
    torch.testing.assert_close((u * s.unsqueeze(-2)) @ vh, product, rtol=0, atol=1e-12 * float(product.abs().max()))
    kept = s > 0
    eye = torch.eye(k, dtype=torch.float64).expand(3, k, k) * (kept.unsqueeze(-1) & kept.unsqueeze(-2))
    torch.testing.assert_close(u.mT @ u, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(vh @ vh.mT, eye, rtol=0, atol=1e-12)


def test_rank_deficient_factors_give_exact_zeros_and_rtol_cuts():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(30, 6, generator=g, dtype=torch.float64)
    b[:, 3:] = b[:, :3] @ torch.randn(3, 3, generator=g, dtype=torch.float64)  # rank 3 of 6
    a = torch.randn(6, 25, generator=g, dtype=torch.float64)
    u, s, vh = factored_svd(b, a)
    assert int((s > 0).sum()) == 3 and not u[:, 3:].any() and not vh[3:].any()
    _, cut, _ = factored_svd(b, a, rtol=float(s[1] / s[0]))
    assert int((cut > 0).sum()) == 1
    with pytest.raises(ValueError, match="rtol must be in"):
        factored_svd(b, a, rtol=1.0)
    with pytest.raises(ValueError, match="same batch shape"):
        factored_svd(b, a[:5])


@pytest.mark.parametrize("m,n,r,tasks", [(40, 30, 4, 3), (20, 50, 8, 8), (16, 5, 9, 2)])
def test_concat_left_singular_is_that_of_the_concatenation(m, n, r, tasks):
    g = torch.Generator().manual_seed(m * n)
    b = torch.randn(2, tasks, m, r, generator=g, dtype=torch.float64)
    a = torch.randn(2, tasks, r, n, generator=g, dtype=torch.float64)
    joint = torch.cat([b[:, t] @ a[:, t] for t in range(tasks)], -1)
    u, s = concat_left_singular(b, a)
    k = s.shape[-1]
    assert k == min(m, tasks * min(r, n))
    torch.testing.assert_close(s, torch.linalg.svdvals(joint)[..., :k], rtol=1e-12, atol=1e-12 * float(s.max()))
    torch.testing.assert_close(u @ (u.mT @ joint), joint, rtol=0, atol=1e-12 * float(joint.abs().max()))
