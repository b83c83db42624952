"""What each core merge method means: identities from the issue and the papers, checked on tiny
state dicts (average, task arithmetic, TIES, DARE, the SNR strategies; STAR's identity with
task arithmetic once STAR is registered)."""

from __future__ import annotations

import math

import pytest
import torch

from lib.merge import METHODS, merge, run_items, select_keys
from lib.merge.dare import keep_mask, mask_seed
from lib.merge.snr import alpha_weights, assign_layers, decide_layers
from lib.merge.ties import (
    disjoint_mean,
    elect_sign,
    kept_count,
    kth_largest_magnitude,
    ties_merge_taus,
    trim_topk,
)
from lib.statedict import is_float, is_matrix

MATRICES = ["embed.weight", "conv.weight", "fc1.weight", "fc2.weight", "classifier.weight"]


def float_keys(sd):
    return select_keys(sd)


def taus_of(base, experts, key):
    return torch.stack([e[key] - base[key] for e in experts])


# ----------------------------------------------------------------------------- average, task arithmetic


def test_average_is_the_mean_and_weights_select(tiny_base, tiny_experts):
    merged = merge("average", tiny_base, tiny_experts)
    for k in float_keys(tiny_base):
        torch.testing.assert_close(merged[k], torch.stack([e[k] for e in tiny_experts]).mean(0))
    only_second = merge("average", tiny_base, tiny_experts, weights=[0, 1, 0])
    assert all(torch.equal(only_second[k], tiny_experts[1][k]) for k in float_keys(tiny_base))


def test_task_arithmetic_adds_scaled_task_vectors(tiny_base, tiny_experts):
    merged = merge("task_arithmetic", tiny_base, tiny_experts, lam=0.3)
    for k in float_keys(tiny_base):
        torch.testing.assert_close(merged[k], tiny_base[k] + 0.3 * taus_of(tiny_base, tiny_experts, k).sum(0))


def test_task_arithmetic_with_negative_lam_subtracts(tiny_base, tiny_experts):
    """Task negation (lam < 0) is a valid use, not an out-of-range value."""
    merged = merge("task_arithmetic", tiny_base, tiny_experts[:1], lam=-1.0)
    torch.testing.assert_close(merged["fc1.weight"], 2 * tiny_base["fc1.weight"] - tiny_experts[0]["fc1.weight"])


# ----------------------------------------------------------------------------- TIES


def test_ties_density_one_without_sign_conflicts_is_the_mean_task_vector(tiny_base):
    """Task vectors sharing one sign pattern: nothing is trimmed, every entry agrees, the disjoint
    mean is the plain mean."""
    g = torch.Generator().manual_seed(3)
    signs = {k: torch.randn(v.shape, generator=g).sign() for k, v in tiny_base.items() if is_float(v)}
    experts = [
        {
            k: (v + signs[k] * (0.01 + torch.rand(v.shape, generator=g)) if is_float(v) else v)
            for k, v in tiny_base.items()
        }
        for _ in range(3)
    ]
    merged = merge("ties", tiny_base, experts, density=1.0)
    for k in signs:
        torch.testing.assert_close(merged[k], tiny_base[k] + taus_of(tiny_base, experts, k).mean(0))


def test_ties_steps_on_a_hand_made_example():
    taus = torch.tensor([[3.0, -1.0, 0.5, 0.0], [-1.0, -2.0, 0.5, 0.0], [-1.5, 4.0, -0.1, 0.0]])
    signs = elect_sign(taus)
    assert signs.tolist() == [1.0, 1.0, 1.0, 0.0]  # mass: 0.5, 1.0, 0.9, 0
    assert disjoint_mean(taus, signs).tolist() == [3.0, 4.0, 0.5, 0.0]
    kept = trim_topk(taus, 0.5, batch_dims=1)  # two of four per row
    assert (kept != 0).sum(dim=1).tolist() == [2, 2, 2]
    assert kept[0].tolist() == [3.0, -1.0, 0.0, 0.0]


@pytest.mark.parametrize("thresholds", [None, [0.5, 1.0, 0.1]])
def test_ties_in_place_equals_the_step_by_step_merge(thresholds):
    """The in-place variant the merges use (less memory) gives the same values as trim, elect,
    disjoint mean, including where the elected sign is 0 and where no entry agrees."""
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(3, 40, 7, generator=g)
    taus[:, 0] = torch.tensor([1.0, -1.0, 0.0]).reshape(3, 1)  # sum 0: no elected sign
    taus[:, 1] = 0.0
    expected = ties_merge_taus(taus, 0.3, thresholds=thresholds)
    owned = taus.clone()
    got = ties_merge_taus(owned, 0.3, thresholds=thresholds, inplace=True)
    assert torch.equal(got, expected)
    assert torch.equal(got[1], torch.zeros(7))
    if thresholds is not None:  # +1 and -1 both survive their thresholds and cancel
        assert torch.equal(got[0], torch.zeros(7))
        assert not torch.equal(owned, taus)  # the stack itself was trimmed


def test_kept_count_is_robust_to_float_rounding():
    assert (
        kept_count(10, 0.2) == 2 and kept_count(10, 0.21) == 3 and kept_count(7, 0.0) == 0 and kept_count(7, 1.0) == 7
    )


@pytest.mark.parametrize("seed", range(4))
def test_radix_select_equals_sorting(seed):
    """The streaming k-th largest magnitude equals sorting everything, also with ties, zeros and
    subnormal values and at the extreme ranks."""
    g = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(n, generator=g) * 10.0 ** float(torch.randint(-40, 3, (1,), generator=g)) for n in (50, 7, 130)
    ]
    tensors[1][:4] = 0.0
    tensors[2][:20] = tensors[0][:20]  # exact duplicates across tensors
    everything = torch.cat(tensors).abs().sort(descending=True).values
    ks = [1, 2, 17, 100, everything.numel()]
    items = [[t] * len(ks) for t in tensors]  # one stream per requested rank
    assert kth_largest_magnitude(items, ks) == [everything[k - 1].item() for k in ks]


def test_radix_select_rank_from_stream_size_and_errors():
    t = torch.arange(1.0, 11.0)
    assert kth_largest_magnitude([[t, -t]], lambda n: n // 2) == [6.0, 6.0]
    assert kth_largest_magnitude([[t]], [0]) == [math.inf]
    with pytest.raises(ValueError, match="11-th largest of 10 entries"):
        kth_largest_magnitude([[t]], [11])
    with pytest.raises(ValueError, match="2 ranks for 1 streams"):
        kth_largest_magnitude([[t]], [1, 2])
    with pytest.raises(ValueError, match="selection of keys is empty"):
        kth_largest_magnitude([], [1])


def test_ties_model_threshold_is_exact_over_all_tensors(tiny_base, tiny_experts):
    density = 0.3
    merged = merge("ties", tiny_base, tiny_experts[:1], density=density)
    keys = float_keys(tiny_base)
    tau = torch.cat([(tiny_experts[0][k] - tiny_base[k]).flatten() for k in keys])
    kept = torch.cat([(merged[k] - tiny_base[k]).flatten() for k in keys])
    k = kept_count(tau.numel(), density)
    assert int((kept != 0).sum()) == k  # continuous values: no ties at the threshold
    assert set(kept.nonzero().flatten().tolist()) == set(tau.abs().topk(k).indices.tolist())


def test_ties_scope_model_on_one_tensor_equals_scope_tensor(tiny_base, tiny_experts):
    per_model = merge("ties", tiny_base, tiny_experts, include="fc2.weight", density=0.25)
    per_tensor = merge("ties", tiny_base, tiny_experts, include="fc2.weight", density=0.25, scope="tensor")
    assert torch.equal(per_model["fc2.weight"], per_tensor["fc2.weight"])


def test_ties_prepass_reads_a_lazy_reiterable_twice_and_rejects_an_iterator(tiny_base, tiny_experts):
    from lib.merge.ties import model_thresholds

    items = run_items(tiny_base, tiny_experts, float_keys(tiny_base))

    class Reader:  # what the streaming command line passes: __iter__ re-reads the checkpoints
        passes = 0

        def __iter__(self):
            Reader.passes += 1
            return iter(items)

    assert model_thresholds(Reader(), density=0.2) == model_thresholds(items, density=0.2)
    assert Reader.passes == 2, "the sizes come from the first pass's histogram, not from an extra read"
    with pytest.raises(TypeError, match="re-iterable"):
        model_thresholds(iter(items), density=0.2)


# ----------------------------------------------------------------------------- DARE


def test_dare_drops_at_rate_p_and_rescales_survivors(tiny_base, tiny_experts):
    p = 0.75
    merged = merge("dare", tiny_base, tiny_experts[:1], p=p)
    tau = torch.cat([(tiny_experts[0][k] - tiny_base[k]).flatten() for k in float_keys(tiny_base)])
    out = torch.cat([(merged[k] - tiny_base[k]).flatten() for k in float_keys(tiny_base)])
    survived = out != 0
    torch.testing.assert_close(out[survived], tau[survived] / (1 - p))
    assert abs(survived.float().mean().item() - (1 - p)) < 0.05  # about 1300 entries


def test_dare_p_zero_then_ties_is_ties_density_one(tiny_base, tiny_experts):
    dare_ties = merge("dare", tiny_base, tiny_experts, p=0.0, then="ties")
    ties = merge("ties", tiny_base, tiny_experts, density=1.0)
    assert all(torch.equal(dare_ties[k], ties[k]) for k in tiny_base)


def test_dare_mask_depends_on_key_expert_and_seed_only(tiny_base, tiny_experts):
    seeds = {mask_seed(k, i, s) for k in ("a", "b") for i in (0, 1) for s in (0, 1)}
    assert len(seeds) == 8
    assert mask_seed("fc1.weight", 2, 0) == 6710464830384250801  # stable across processes and versions
    first = merge("dare", tiny_base, tiny_experts, seed=1)
    only_fc1 = merge("dare", tiny_base, tiny_experts, seed=1, include="fc1.weight")
    assert torch.equal(first["fc1.weight"], only_fc1["fc1.weight"])
    other_seed = merge("dare", tiny_base, tiny_experts, seed=2)
    assert not torch.equal(first["fc1.weight"], other_seed["fc1.weight"])
    assert keep_mask(torch.Size([1000]), 0.9, key="k", expert=0, seed=0).float().mean().item() == pytest.approx(
        0.1, abs=0.04
    )


def dropped_experts(base, experts, p, seed):
    """The experts whose task vectors are DARE's dropped-and-rescaled ones (the same masks)."""
    from lib.merge.dare import drop_and_rescale

    return [
        {
            k: (
                base[k] + drop_and_rescale(e[k] - base[k], p, key=k, expert=i, seed=seed) if is_float(base[k]) else e[k]
            )
            for k in base
        }
        for i, e in enumerate(experts)
    ]


def test_dare_lam_scales_the_merged_task_vector(tiny_base, tiny_experts):
    """Seed 002's Table 2 runs TA+DARE with alpha = 0.125."""
    for then in ("sum", "ties", "ties_sum", "trim_ties"):
        full = merge("dare", tiny_base, tiny_experts, then=then)
        scaled = merge("dare", tiny_base, tiny_experts, then=then, lam=0.125)
        for k in float_keys(tiny_base):
            torch.testing.assert_close(
                scaled[k] - tiny_base[k], 0.125 * (full[k] - tiny_base[k]), msg=lambda m: f"{then} {k}: {m}"
            )


def test_dare_variants_are_ties_steps_on_the_dropped_task_vectors(tiny_base, tiny_experts):
    """'ties' (PEFT): elect, disjoint mean; 'ties_sum' (mergekit): elect, sum of the agreeing;
    'trim_ties' (MergeLM): all of TIES, its model-wide trim included, on the dropped experts."""
    p, seed = 0.5, 3
    dropped = dropped_experts(tiny_base, tiny_experts, p, seed)
    merged = {
        then: merge("dare", tiny_base, tiny_experts, p=p, seed=seed, then=then, density=0.3)
        for then in ("sum", "ties", "ties_sum", "trim_ties")
    }
    ties = merge("ties", tiny_base, dropped, density=0.3)
    for k in float_keys(tiny_base):
        taus = taus_of(tiny_base, dropped, k)
        signs = elect_sign(taus)
        agree = (taus.sign() == signs) & (taus != 0)
        torch.testing.assert_close(merged["sum"][k], tiny_base[k] + taus.sum(0))
        torch.testing.assert_close(merged["ties"][k], tiny_base[k] + (taus * agree).sum(0) / agree.sum(0).clamp(min=1))
        torch.testing.assert_close(merged["ties_sum"][k], tiny_base[k] + (taus * agree).sum(0))
        torch.testing.assert_close(merged["trim_ties"][k], ties[k])
    assert not torch.equal(merged["ties"]["fc1.weight"], merged["trim_ties"]["fc1.weight"])


def test_dare_trim_ties_without_drop_is_ties(tiny_base, tiny_experts):
    dare_ties = merge("dare", tiny_base, tiny_experts, p=0.0, then="trim_ties", density=0.25)
    ties = merge("ties", tiny_base, tiny_experts, density=0.25)
    assert all(torch.equal(dare_ties[k], ties[k]) for k in tiny_base)


def test_dare_trim_ties_prepass_is_the_context_of_a_key_by_key_merge(tiny_base, tiny_experts):
    """The streaming command line merges one key at a time with the prepass's thresholds."""
    from lib.merge import run_prepass

    hp = dict(p=0.6, seed=2, then="trim_ties", density=0.2)
    whole = merge("dare", tiny_base, tiny_experts, **hp)
    context = run_prepass("dare", run_items(tiny_base, tiny_experts, float_keys(tiny_base)), **hp)
    assert len(context) == len(tiny_experts)
    one_key = merge("dare", tiny_base, tiny_experts, include="fc2.weight", context=context, **hp)
    assert torch.equal(one_key["fc2.weight"], whole["fc2.weight"])
    assert run_prepass("dare", iter([]), then="ties") is None, "the other variants need no prepass and read nothing"


def test_ties_tensor_scope_keeps_floor_like_peft_and_model_scope_ceil():
    """An 11-entry tensor at density 0.2: PEFT and mergekit keep int(2.2) = 2, the model-wide
    count ceil(2.2) = 3."""
    base = {"w": torch.zeros(11)}
    expert = {"w": torch.arange(1.0, 12.0)}
    per_tensor = merge("ties", base, [expert], density=0.2, scope="tensor")["w"]
    per_model = merge("ties", base, [expert], density=0.2, scope="model")["w"]
    assert per_tensor.nonzero().flatten().tolist() == [9, 10]
    assert per_model.nonzero().flatten().tolist() == [8, 9, 10]


def test_ties_tensor_scope_and_dare_ties_match_peft(tiny_base, tiny_experts):
    """PEFT's ``ties`` (per tensor) on the task vectors, and PEFT's sign election and disjoint merge
    (the steps of its ``dare_ties`` after its own random drop) on our dropped task vectors."""
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    ones = torch.ones(len(tiny_experts))
    ours = merge("ties", tiny_base, tiny_experts, density=0.2, scope="tensor")
    dare_ties = merge("dare", tiny_base, tiny_experts, p=0.7, seed=4, then="ties")
    dropped = dropped_experts(tiny_base, tiny_experts, 0.7, 4)
    for k in float_keys(tiny_base):
        taus = taus_of(tiny_base, tiny_experts, k)
        peft_ties = merge_utils.ties(list(taus), ones, density=0.2)
        torch.testing.assert_close(ours[k], tiny_base[k] + peft_ties, msg=lambda m: f"ties {k}: {m}")
        d = taus_of(tiny_base, dropped, k)
        peft_dare_ties = merge_utils.disjoint_merge(d, merge_utils.calculate_majority_sign_mask(d))
        torch.testing.assert_close(dare_ties[k], tiny_base[k] + peft_dare_ties, msg=lambda m: f"dare_ties {k}: {m}")


# ----------------------------------------------------------------------------- SNR strategies: decisions


def test_assign_layers_routes_biases_and_norms():
    keys = [
        "pre.scale",
        "embed.weight",
        "conv.weight",
        "conv.bias",
        "bn.weight",
        "bn.running_var",
        "attn.bias",
        "attn.in_proj_weight",
        "attn.out.weight",
        "norm.bias",
    ]
    layers = assign_layers(keys, [k for k in keys if k.endswith("weight") and not k.startswith("bn")])
    assert layers == {
        "pre.scale": "embed.weight",  # nothing before it: the first layer
        "embed.weight": "embed.weight",
        "conv.weight": "conv.weight",
        "conv.bias": "conv.weight",  # own module
        "bn.weight": "conv.weight",  # a norm follows the layer before it
        "bn.running_var": "conv.weight",
        "attn.bias": "attn.in_proj_weight",  # own module, even when listed before its matrix
        "attn.in_proj_weight": "attn.in_proj_weight",
        "attn.out.weight": "attn.out.weight",
        "norm.bias": "attn.out.weight",
    }


def scores_for(values):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}


def test_decide_layers_top_threshold_and_score():
    scores = scores_for({"a": [1.0, 9.0], "b": [4.0, 4.0], "c": [6.0, 0.0], "d": [2.0, 3.0]})

    def high(**kw):
        return sorted(k for k, h in decide_layers(scores, list(scores), **kw).high.items() if h)

    assert high(top=0.5) == ["a", "c"]  # max: a 9, c 6, b 4, d 3
    assert high(top=0.5, score="mean") == ["a", "b"]  # mean: a 5, b 4, c 3, d 2.5
    assert high(top=0.0) == [] and high(top=1.0) == ["a", "b", "c", "d"]
    assert high(top=0.25) == ["a"] and high(top=0.26) == ["a", "c"]  # ceil(top * L)
    assert high(threshold=4.0) == ["a", "c"]  # strictly above, as the seed
    assert high(threshold=4.0, top=0.0) == ["a", "c"]  # threshold replaces top


def test_decide_layers_ties_go_by_key_name_whatever_the_key_order():
    """A checkpoint on disk lists keys alphabetically, a state dict in module order: tied layers
    (all-noise layers score 0) must be chosen the same way for both."""
    scores = scores_for({"x": [2.0], "y": [2.0], "z": [2.0]})
    decisions = decide_layers(scores, list(scores), top=0.34)
    assert [k for k, h in decisions.high.items() if h] == ["x", "y"]
    reordered = scores_for({"z": [2.0], "y": [2.0], "x": [2.0]})
    decisions = decide_layers(reordered, list(reordered), top=0.34)
    assert sorted(k for k, h in decisions.high.items() if h) == ["x", "y"]


def test_alpha_weights_handle_zero_and_infinite_snrs():
    assert alpha_weights(torch.tensor([1.0, 3.0])).tolist() == [0.25, 0.75]
    assert alpha_weights(torch.tensor([0.0, 0.0])).tolist() == [0.5, 0.5]
    assert alpha_weights(torch.tensor([math.inf, 2.0, math.inf])).tolist() == [0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="non-negative"):
        alpha_weights(torch.tensor([-1.0, 2.0]))


def test_nan_snr_is_an_error_naming_the_layer():
    with pytest.raises(ValueError, match="SNR of 'b' is NaN"):
        decide_layers(scores_for({"a": [1.0], "b": [math.nan]}), ["a", "b"])


def context_with(base, high_layers, scores_per_layer):
    keys = select_keys(base)
    scores = {k: torch.tensor(scores_per_layer[k], dtype=torch.float64) for k in MATRICES}
    decisions = decide_layers(scores, keys, threshold=0.5)
    return decisions.__class__(decisions.scores, {k: k in high_layers for k in MATRICES}, decisions.layer_of)


SNRS = {
    "embed.weight": [1.0, 2.0, 3.0],
    "conv.weight": [5.0, 1.0, 2.0],
    "fc1.weight": [0.0, 0.0, 0.0],
    "fc2.weight": [1.0, 7.0, 2.0],
    "classifier.weight": [4.0, 4.0, 1.0],
}
HIGH = {"conv.weight", "fc2.weight"}


def stacked(experts, k):
    return torch.stack([e[k] for e in experts])


@pytest.mark.parametrize(
    "name,high_rule,low_rule",
    [
        ("snr_base_reset", "mean", "base"),
        ("snr_winner", "winner", "mean"),
        ("snr_low_a", "mean", "expert0"),
        ("snr_low_b", "mean", "expert1"),
        ("snr_max", "mean", "winner"),
        ("snr_weighted", "alpha", "mean"),
    ],
)
def test_table_1_rules_with_injected_snrs(name, high_rule, low_rule, tiny_base, tiny_experts):
    """Each strategy applies its high rule to high layers and its low rule to low ones, and a
    layer's decision carries over to its bias and to the norm that follows it."""
    context = context_with(tiny_base, HIGH, SNRS)
    merged = merge(name, tiny_base, tiny_experts, context=context)

    def expected(rule, k, snrs):
        s = torch.tensor(snrs, dtype=torch.float64)
        return {
            "mean": lambda: stacked(tiny_experts, k).mean(0),
            "base": lambda: tiny_base[k],
            "expert0": lambda: tiny_experts[0][k],
            "expert1": lambda: tiny_experts[1][k],
            "winner": lambda: tiny_experts[int(s.argmax())][k],
            "alpha": lambda: torch.einsum(
                "n,n...->...",
                (s / s.sum() if s.sum() > 0 else torch.full_like(s, 1 / 3)).float(),
                stacked(tiny_experts, k),
            ),
        }[rule]()

    for k in select_keys(tiny_base):
        layer = context.layer_of[k]
        rule = high_rule if layer in HIGH else low_rule
        torch.testing.assert_close(merged[k], expected(rule, k, SNRS[layer]), msg=lambda m: f"{k} ({rule}): {m}")
    assert context.layer_of["bn.running_mean"] == "conv.weight" and context.layer_of["norm.weight"] == "fc1.weight"


def test_snr_low_expert_index_generalises_low_a(tiny_base, tiny_experts):
    context = context_with(tiny_base, HIGH, SNRS)
    low_c = merge("snr_low_expert", tiny_base, tiny_experts, context=context, index=2)
    assert torch.equal(low_c["fc1.weight"], tiny_experts[2]["fc1.weight"])
    assert torch.equal(
        merge("snr_low_expert", tiny_base, tiny_experts, context=context)["fc1.weight"],
        merge("snr_low_a", tiny_base, tiny_experts, context=context)["fc1.weight"],
    )


# ----------------------------------------------------------------------------- SNR strategies: with lib.spectral


def test_snr_base_reset_top_zero_is_base(tiny_base, tiny_experts):
    merged = merge("snr_base_reset", tiny_base, tiny_experts, top=0.0)
    assert all(torch.equal(merged[k], tiny_base[k]) for k in tiny_base)


def test_snr_low_a_top_zero_is_expert_a(tiny_base, tiny_experts):
    merged = merge("snr_low_a", tiny_base, tiny_experts, top=0.0)
    assert all(torch.equal(merged[k], tiny_experts[0][k]) for k in select_keys(tiny_base))


def planted(base, spiky, strength=8.0, seed=5):
    """An expert whose ``spiky`` matrices carry a strong rank-one signal on top of small noise,
    while its other matrices are pure noise: its SNR is clearly the highest on those layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in base.items():
        if not is_matrix(w):
            out[k] = w.clone()
            continue
        m = torch.randn(w.shape[0], w[0].numel(), generator=g)
        if k in spiky:
            u, v = torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w[0].numel(), generator=g)
            m = m + strength * (u / u.norm()) @ (v / v.norm()) * (w.shape[0] * w[0].numel()) ** 0.5
        out[k] = m.reshape(w.shape)
    return out


def test_snr_winner_top_one_takes_each_matrix_from_the_expert_with_higher_snr(tiny_base):
    from lib.spectral import snr

    experts = [
        planted(tiny_base, {"fc1.weight", "conv.weight"}, seed=5),
        planted(tiny_base, {"fc2.weight", "embed.weight", "classifier.weight"}, seed=6),
    ]
    merged = merge("snr_winner", tiny_base, experts, top=1.0)
    for k in MATRICES:
        snrs = [snr(e[k]) for e in experts]
        winner = max(range(2), key=lambda i: (snrs[i], -i))
        assert torch.equal(merged[k], experts[winner][k]), f"{k}: SNRs {snrs}, expected expert {winner}"
    assert torch.equal(merged["fc1.weight"], experts[0]["fc1.weight"])  # the planted spike wins
    assert torch.equal(merged["fc2.weight"], experts[1]["fc2.weight"])


def test_snr_scores_are_the_spectral_snr_of_each_expert(tiny_base, tiny_experts):
    from lib.merge.snr import snr_prepass
    from lib.spectral import snr

    context = snr_prepass(run_items(tiny_base, tiny_experts, select_keys(tiny_base)), snr_method="mp")
    for k in MATRICES:
        expected = torch.tensor([snr(e[k], method="mp") for e in tiny_experts], dtype=torch.float64)
        torch.testing.assert_close(context.scores[k], expected)


# ----------------------------------------------------------------------------- STAR (other engineer's method)


@pytest.mark.skipif("star" not in METHODS, reason="star is not registered yet")
def test_star_without_truncation_or_rescale_is_task_arithmetic_over_n(tiny_base, tiny_experts):
    star = merge("star", tiny_base, tiny_experts, eta=100, rescale=False)
    arithmetic = merge("task_arithmetic", tiny_base, tiny_experts, lam=1 / len(tiny_experts))
    for k in tiny_base:
        torch.testing.assert_close(star[k], arithmetic[k], atol=1e-5, rtol=1e-5)
