"""lib.mergeability: each pairwise property on constructed task vectors with known answers
(identical, opposite, orthogonal, scaled), the fast subspace path against full SVDs, loss
gradients against plain autograd, and the leave-one-pair-out Lasso on planted targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lib import mergeability as mg
from lib.spectral import planted_spikes

SHAPES = {
    "enc.0.weight": (12, 8),
    "enc.0.bias": (12,),
    "conv.weight": (6, 2, 3, 3),
    "out.weight": (5, 16),
    "norm.weight": (16,),
}


def random_tv(seed: int, shapes=SHAPES, spikes: bool = True) -> dict[str, torch.Tensor]:
    """Gaussian tensors; with ``spikes`` each matrix also holds a planted rank-one signal of its
    own strength, so that per-matrix SNRs differ and can be ranked."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (k, s) in enumerate(shapes.items()):
        if len(s) > 1 and spikes:
            out[k] = planted_spikes(s[0], math.prod(s[1:]), [4.0 + 3 * i], generator=g).reshape(s)
        else:
            out[k] = torch.randn(s, generator=g)
    return out


def add(base, tv, scale=1.0):
    return {k: base[k] + scale * tv[k] for k in base}


@pytest.fixture
def base():
    return random_tv(100)


def test_identical_task_vectors(base):
    tv = random_tv(1)
    m = mg.pairwise_metrics(base, add(base, tv), add(base, tv))
    assert m["cosine"] == pytest.approx(1.0)
    assert m["layer_cosine"] == pytest.approx(1.0)
    assert m["subspace_overlap"] == pytest.approx(1.0)
    assert m["magnitude_ratio"] == pytest.approx(1.0)
    assert m["sign_conflict"] == 0.0
    assert m["snr_agreement"] == 1.0
    assert m["snr_rank_corr"] == pytest.approx(1.0)
    assert m["tv_snr_rank_corr"] == pytest.approx(1.0)


def test_opposite_task_vectors_conflict_everywhere_but_share_subspaces(base):
    tv = random_tv(2)
    m = mg.pairwise_metrics(base, add(base, tv), add(base, tv, -1.0))
    assert m["cosine"] == pytest.approx(-1.0)
    assert m["layer_cosine"] == pytest.approx(-1.0)
    assert m["sign_conflict"] == 1.0
    assert m["subspace_overlap"] == pytest.approx(1.0), "a subspace does not depend on the sign of the update"
    assert m["magnitude_ratio"] == pytest.approx(1.0)


def test_scaled_task_vector(base):
    tv = random_tv(3)
    a, b = add(base, tv), add(base, tv, 3.0)
    m = mg.pairwise_metrics(base, a, b)
    assert m["magnitude_ratio"] == pytest.approx(1 / 3)
    assert m["cosine"] == pytest.approx(1.0)
    assert m["sign_conflict"] == 0.0
    assert m["subspace_overlap"] == pytest.approx(1.0)
    assert mg.pairwise_metrics(base, b, a) == pytest.approx(m), "every property is symmetric in the two experts"


def halves(shapes, first: bool, seed: int):
    """A task vector living on the first (or second) half of every tensor's rows and columns, so
    that two of them are orthogonal in every sense: disjoint entries, orthogonal row and column
    spaces."""
    tv = random_tv(seed, shapes)
    out = {}
    for k, t in tv.items():
        mask = torch.zeros_like(t)
        rows = slice(0, t.shape[0] // 2) if first else slice(t.shape[0] // 2, None)
        if t.ndim == 1:
            mask[rows] = 1
        else:
            flat = mask.reshape(t.shape[0], -1)
            cols = slice(0, flat.shape[1] // 2) if first else slice(flat.shape[1] // 2, None)
            flat[rows, cols] = 1
        out[k] = t * mask
    return out


def test_orthogonal_task_vectors(base):
    ta, tb = halves(SHAPES, True, 4), halves(SHAPES, False, 5)
    pa, pb = (mg.profile(base, add(base, t)) for t in (ta, tb))
    m = {"cosine": mg.cosine(pa.task_vector, pb.task_vector), **{r["key"]: r for r in mg.layer_table(pa, pb)}}
    assert m["cosine"] == pytest.approx(0.0, abs=1e-12)
    for key in SHAPES:
        assert m[key]["cosine"] == pytest.approx(0.0, abs=1e-12)
        if len(SHAPES[key]) > 1:
            assert m[key]["subspace_overlap"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="no coordinate is changed by both"):
        mg.sign_conflict(pa.task_vector, pb.task_vector)


def test_unrelated_random_updates_conflict_half_the_time():
    shapes = {"w": (200, 100)}
    base = random_tv(0, shapes)
    m = mg.pairwise_metrics(base, add(base, random_tv(6, shapes, False)), add(base, random_tv(7, shapes, False)), k=4)
    assert m["sign_conflict"] == pytest.approx(0.5, abs=0.01)
    assert abs(m["cosine"]) < 0.02
    # two random 4-dimensional subspaces of R^100 and R^200 overlap by about k/dim
    assert m["subspace_overlap"] < 0.15


def reference_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """From full float64 SVDs of the 2-D views, one matrix at a time."""
    ua, sa, vha = torch.linalg.svd(a.reshape(a.shape[0], -1).double(), full_matrices=False)
    ub, sb, vhb = torch.linalg.svd(b.reshape(b.shape[0], -1).double(), full_matrices=False)
    ra, rb = int((sa[:k] > 1e-9 * sa[0]).sum()), int((sb[:k] > 1e-9 * sb[0]).sum())
    left = (ua[:, :ra].T @ ub[:, :rb]).pow(2).sum()
    right = (vha[:ra] @ vhb[:rb].T).pow(2).sum()
    return float((left + right) / (2 * min(ra, rb)))


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (6, 2, 3, 3)])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_subspace_overlap_matches_full_svd(shape, k):
    g = torch.Generator().manual_seed(sum(shape) + k)
    common = torch.randn(shape, generator=g)
    a, b = common + 0.5 * torch.randn(shape, generator=g), common + 0.5 * torch.randn(shape, generator=g)
    sub_a, sub_b = (mg.top_subspaces({"w": t}, k)["w"] for t in (a, b))
    assert mg.subspace_overlap(sub_a, sub_b) == pytest.approx(reference_overlap(a, b, k), rel=1e-6)


def test_low_rank_updates_are_compared_on_their_own_directions():
    g = torch.Generator().manual_seed(8)
    u, v = torch.randn(30, 1, generator=g), torch.randn(1, 20, generator=g)
    one = mg.top_subspaces({"w": u @ v}, 8)["w"]
    assert one.rank == 1
    assert mg.subspace_overlap(one, one) == pytest.approx(1.0), "k beyond the rank must not dilute the overlap"
    zero = mg.top_subspaces({"w": torch.zeros(30, 20)}, 8)["w"]
    assert zero.rank == 0 and math.isnan(mg.subspace_overlap(zero, one))


def test_snr_rank_correlation_and_agreement():
    scores = {f"m{i}": float(i) for i in range(6)}
    reversed_ = {k: -v for k, v in scores.items()}
    assert mg.rank_correlation(scores, scores) == pytest.approx(1.0)
    assert mg.rank_correlation(scores, reversed_) == pytest.approx(-1.0)
    assert mg.decision_agreement(scores, scores, 0.5) == 1.0
    assert mg.decision_agreement(scores, reversed_, 0.5) == 0.0, "the top half of one is the bottom half of the other"
    assert math.isnan(mg.rank_correlation(scores, dict.fromkeys(scores, 1.0))), "a constant score ranks nothing"


def test_snr_properties_come_from_lib_spectral():
    from lib.spectral import snr

    g = torch.Generator().manual_seed(9)
    weights = {"loud": planted_spikes(120, 60, [4.0, 3.0], generator=g), "quiet": torch.randn(120, 60, generator=g)}
    snrs = mg.layer_snrs(weights)
    assert snrs == pytest.approx({k: snr(w) for k, w in weights.items()})
    assert snrs["loud"] > 0 and snrs["quiet"] == 0.0


def test_task_vector_checks(base):
    with pytest.raises(ValueError, match="task vector is zero"):
        mg.task_vector(base, base)
    expert = add(base, random_tv(10))
    expert["out.weight"] = torch.randn(7, 16)  # a head with another number of classes
    with pytest.raises(ValueError, match="exclude it"):
        mg.task_vector(base, expert)
    tv = mg.task_vector(base, expert, exclude=r"^out\.")
    assert "out.weight" not in tv and set(tv) == set(SHAPES) - {"out.weight"}
    expert["enc.0.bias"] = torch.full((12,), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        mg.task_vector(base, expert, exclude=r"^out\.")
    half = {k: v.half() for k, v in add(base, random_tv(11)).items()}
    assert all(t.dtype == torch.float32 for t in mg.task_vector({k: v.half() for k, v in base.items()}, half).values())


def test_compare_needs_the_same_tensors(base):
    a = mg.profile(base, add(base, random_tv(12)))
    b = mg.profile(base, add(base, random_tv(13)), exclude="norm")
    with pytest.raises(ValueError, match="same include/exclude"):
        mg.compare(a, b)


def test_pairwise_metrics_on_a_model_with_conv_batchnorm_and_integer_buffers(tiny_base, make_experts):
    a, b = make_experts(tiny_base, 2)
    grads = {"base": ({"fc1.weight": torch.ones(16, 8)}, {"fc1.weight": -torch.ones(16, 8)})}
    m = mg.pairwise_metrics(tiny_base, a, b, gradients=grads, exclude="classifier")
    assert set(m) == {
        "cosine",
        "layer_cosine",
        "subspace_overlap",
        "magnitude_ratio",
        "sign_conflict",
        "snr_rank_corr",
        "snr_agreement",
        "tv_snr_rank_corr",
        "gradient_cosine_base",
        "gradient_l2_base",
    }
    assert m["gradient_cosine_base"] == pytest.approx(-1.0)
    assert m["gradient_l2_base"] == pytest.approx(2 * math.sqrt(16 * 8))
    assert -1 <= m["cosine"] <= 1 and 0 <= m["subspace_overlap"] <= 1 and 0 < m["magnitude_ratio"] <= 1


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_loss_gradient_equals_autograd_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = Tiny().train()
    x, y = torch.randn(10, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    grads = mg.loss_gradient(model, x, y, exclude=r"^head\.", device="cpu")
    assert list(grads) == ["body.0.weight", "body.0.bias"]
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    nn.functional.cross_entropy(model(x), y).backward()  # eval mode: dropout off, as loss_gradient does
    for k, p in model.named_parameters():
        if k in grads:
            assert torch.allclose(grads[k], p.grad)
    assert mg.cosine(grads, grads) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no parameter"):
        mg.loss_gradient(model, x, y, include="nothing")


def test_task_batch_is_fixed_and_fits_the_models():
    images, labels = mg.task_batch("mnist", 5, seed=3)
    assert images.shape == (5, 1, 28, 28) and labels.shape == (5,)
    again, _ = mg.task_batch("mnist", 5, seed=3)
    assert torch.equal(images, again)
    inputs, labels = mg.task_batch("rte", 4)
    assert set(inputs) == {"input_ids", "token_type_ids", "attention_mask"} and inputs["input_ids"].shape[0] == 4


def planted_design(n=20, p=6, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    y = 0.8 + signal * 0.05 * X[:, 0] + 0.005 * rng.normal(size=n)
    return X, y


def test_lasso_finds_the_planted_property():
    X, y = planted_design(n=14)
    fit = mg.leave_one_pair_out(X, y)
    coef = np.abs(fit["coefficients"])
    assert coef.argmax() == 0 and coef[0] > 5 * coef[1:].max()
    assert fit["r2"] > 0.9 and fit["spearman"] > 0.9
    assert len(fit["predicted"]) == len(y) and len(fit["fold_coefficients"]) == len(y)
    low, high = mg.r2_interval(y, fit["predicted"], n_boot=500)
    assert low <= fit["r2"] <= high
    assert mg.permutation_pvalue(X, y, fit["r2"], n_perm=19, alpha=fit["alpha"])["p"] == pytest.approx(1 / 20)


def test_lasso_on_pure_noise_does_not_predict():
    X, y = planted_design(signal=0.0, seed=1)
    fit = mg.leave_one_pair_out(X, y, alpha=0.01)
    assert fit["r2"] < 0.2
    assert mg.permutation_pvalue(X, y, fit["r2"], n_perm=19, alpha=0.01)["p"] > 0.05


def test_lasso_input_checks():
    X, y = planted_design(n=6)
    with pytest.raises(ValueError, match="at least 4 pairs"):
        mg.leave_one_pair_out(X[:3], y[:3])
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"columns \[1\]"):
        mg.leave_one_pair_out(X, y)


def test_univariate():
    X, y = planted_design()
    rho = mg.univariate(np.c_[X[:, :2], np.ones(len(y))], y, ["x0", "x1", "const"])
    assert rho["x0"] > 0.9 and abs(rho["x1"]) < 0.5 and math.isnan(rho["const"])


def test_inner_product_properties_equal_direct_computation():
    a, b = random_tv(14), random_tv(15)
    flat_a, flat_b = (torch.cat([t.double().reshape(-1) for t in v.values()]) for v in (a, b))
    assert mg.distance(a, b) == pytest.approx(float((flat_a - flat_b).norm()), rel=1e-10)
    assert mg.cosine(a, b) == pytest.approx(float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm())), rel=1e-10)
    assert mg.magnitude_ratio(a, b) == pytest.approx(
        float(min(flat_a.norm(), flat_b.norm()) / max(flat_a.norm(), flat_b.norm()))
    )
    assert mg.distance(a, a) == 0.0


def test_fit_methods_and_the_sentence_it_supports():
    X, y = planted_design(n=12)
    names = [f"p{j}" for j in range(X.shape[1])]
    properties = [{"pair": f"t{i}+u{i}", **dict(zip(names, row))} for i, row in enumerate(X)]
    scores = [{"subset": p["pair"], "method": "ties", "normalized": v} for p, v in zip(properties, y)]
    fits = mg.fit_methods(properties, scores, names, alpha=0.002, n_perm=39, n_boot=100)
    fit = fits["ties"]
    assert fit["pairs"] == [p["pair"] for p in properties] and fit["measured"] == pytest.approx(y)
    stable = mg.stable_properties(fit)
    assert max(stable, key=lambda f: abs(stable[f])) == "p0"
    text = mg.describe_fit("ties", fit)
    assert "the properties carry signal" in text and "p0 (+" in text
    noise = {**fit, "r2": -0.3, "permutation_p": 0.6, "fold_coefficients": [[0.0] * len(names)] * len(y)}
    assert "no evidence" in mg.describe_fit("ties", noise) and "No property" in mg.describe_fit("ties", noise)
    with pytest.raises(ValueError, match="one run per method"):
        mg.fit_methods(properties, scores + scores[:1], names, alpha=0.002)
    with pytest.raises(ValueError, match="no properties of pair"):
        mg.fit_methods(properties[1:], scores, names, alpha=0.002)


def test_more_permutations_extends_the_same_shuffles_and_keeps_the_fit():
    X, y = planted_design(signal=0.3, n=10, seed=2)
    names = [f"p{j}" for j in range(X.shape[1])]
    properties = [{"pair": f"t{i}+u{i}", **dict(zip(names, row))} for i, row in enumerate(X)]
    scores = [{"subset": p["pair"], "method": "ties", "normalized": v} for p, v in zip(properties, y)]
    fits = mg.fit_methods(properties, scores, names, alpha=0.002, n_perm=5, stop_after=None, n_boot=50)
    assert fits["ties"]["permutations"] == 5 and fits["ties"]["interval_level"] == mg.INTERVAL_LEVEL
    more = mg.more_permutations(properties, fits, n_perm=12, stop_after=None, alpha=0.002)["ties"]
    assert more["null_r2"][:5] == pytest.approx(fits["ties"]["null_r2"]), "the first shuffles are the shorter run's"
    exceed = sum(v >= fits["ties"]["r2"] for v in more["null_r2"])
    assert more["permutations"] == 12 and more["permutation_p"] == pytest.approx((exceed + 1) / 13)
    assert {k: v for k, v in more.items() if k not in ("null_r2", "permutation_p", "permutations")} == {
        k: v for k, v in fits["ties"].items() if k not in ("null_r2", "permutation_p", "permutations")
    }
    X2, y2 = mg.design(properties, fits["ties"])
    assert np.array_equal(X2, X) and np.array_equal(y2, y)


def test_flat_properties_are_the_ones_equal_for_every_pair():
    properties = [
        {"pair": f"p{i}", "agreement": 1.0, "corr": 0.998 + 0.001 * (i % 2), "cosine": 0.1 * i} for i in range(5)
    ]
    assert mg.flat_properties(properties, ["agreement", "corr", "cosine"]) == {
        "agreement": (1.0, 1.0),
        "corr": pytest.approx((0.998, 0.999)),
    }


def test_the_permutation_test_stops_once_enough_shuffles_do_as_well():
    X, y = planted_design(signal=0.0, seed=1)
    fit = mg.leave_one_pair_out(X, y, alpha=0.01)
    full = mg.permutation_pvalue(X, y, fit["r2"], n_perm=30, stop_after=None, alpha=0.01)
    early = mg.permutation_pvalue(X, y, fit["r2"], n_perm=30, stop_after=3, alpha=0.01)
    n = early["permutations"]
    assert early["stopped"] and n < 30 and early["null_r2"] == full["null_r2"][:n]
    assert sum(v >= fit["r2"] for v in early["null_r2"]) == 3 and early["p"] == pytest.approx(3 / n)
