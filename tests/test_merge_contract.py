"""Contract tests: every registered merge method, the same checks (issue 4, "Every method" and "Tests").

Parametrized over ``METHODS``, so a newly registered method is covered without editing this
file -- except :data:`AVERAGING_HP`, which says under which hyperparameters a method reduces to
an average of its experts (a new method must add its entry, see ``test_every_method_is_listed``).
"""

from __future__ import annotations

import math

import pytest
import torch

from lib.merge import METHODS, is_elementwise, merge, resolve_hparams, run_items, run_prepass, select_keys, to_compute
from lib.statedict import is_float

N_EXPERTS = 3
ALL = sorted(METHODS)

#: hyperparameters under which merging N identical experts returns that expert; None: the
#: method is not an average for any setting (task arithmetic adds the task vectors up)
AVERAGING_HP = {
    "average": {},
    "task_arithmetic": {"lam": 1.0 / N_EXPERTS},
    "ties": {"density": 1.0},
    "dare": {"p": 0.0, "then": "ties"},
    "snr_base_reset": {"top": 1.0},
    "snr_winner": {},
    "snr_low_expert": {},
    "snr_low_a": {},
    "snr_low_b": {},
    "snr_max": {},
    "snr_weighted": {},
    "star": {"eta": 100, "rescale": False},
    "drm_h": {"density": 1.0},
    "drm_v": {"density": 1.0},
}


def assert_same_state_dict(actual, expected, *, atol=1e-6, rtol=1e-5):
    assert list(actual) == list(expected), "keys or their order differ"
    for k in expected:
        assert actual[k].shape == expected[k].shape, k
        assert actual[k].dtype == expected[k].dtype, k
        torch.testing.assert_close(actual[k], expected[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def test_every_method_is_listed():
    missing = sorted(set(METHODS) - set(AVERAGING_HP))
    assert not missing, f"add {missing} to AVERAGING_HP in {__file__}"


@pytest.mark.parametrize("name", ALL)
def test_registry_entry_is_complete(name):
    m = METHODS[name]
    assert m.name == name and m.description, "every method has a one-line description"
    resolve_hparams(m, {})  # the defaults pass the method's own range checks


@pytest.mark.parametrize("name", ALL)
def test_identical_to_base_returns_base(name, tiny_base):
    """experts = [base] * N: every task vector is zero, so every method returns the base."""
    assert_same_state_dict(merge(name, tiny_base, [tiny_base] * N_EXPERTS), tiny_base)


@pytest.mark.parametrize("name", ALL)
def test_average_of_identical_experts_is_that_expert(name, tiny_base, tiny_experts):
    expert = tiny_experts[1]
    merged = merge(name, tiny_base, [expert] * N_EXPERTS, **AVERAGING_HP[name])
    expected = {k: (v if is_float(v) else tiny_base[k]) for k, v in expert.items()}  # integer buffers: base
    assert_same_state_dict(merged, expected, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_keys_shapes_dtypes_preserved_and_integer_buffers_copied(name, tiny_base, tiny_experts):
    merged = merge(name, tiny_base, tiny_experts)
    assert list(merged) == list(tiny_base)
    for k, v in tiny_base.items():
        assert merged[k].shape == v.shape and merged[k].dtype == v.dtype and merged[k].device.type == "cpu", k
        assert torch.isfinite(merged[k].double()).all(), k
    assert torch.equal(merged["bn.num_batches_tracked"], tiny_base["bn.num_batches_tracked"])


@pytest.mark.parametrize("name", ALL)
def test_deterministic(name, tiny_base, tiny_experts):
    first = merge(name, tiny_base, tiny_experts)
    second = merge(name, tiny_base, tiny_experts)
    for k in first:
        assert torch.equal(first[k], second[k]), k


@pytest.mark.parametrize("name", ALL)
def test_does_not_modify_inputs(name, tiny_base, tiny_experts):
    before = [{k: v.clone() for k, v in sd.items()} for sd in [tiny_base, *tiny_experts]]
    merge(name, tiny_base, tiny_experts)
    for original, now in zip(before, [tiny_base, *tiny_experts]):
        assert all(torch.equal(original[k], now[k]) for k in original)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("excluded_from", ["base", 1])
def test_exclude_takes_tensors_from_the_chosen_source(name, excluded_from, tiny_base, tiny_experts):
    merged = merge(name, tiny_base, tiny_experts, exclude="classifier", excluded_from=excluded_from)
    source = tiny_base if excluded_from == "base" else tiny_experts[excluded_from]
    for k in ("classifier.weight", "classifier.bias"):
        assert torch.equal(merged[k], source[k]), k
    reference = merge(name, tiny_base, tiny_experts, include=[k for k in tiny_base if "classifier" not in k])
    assert torch.equal(merged["fc2.weight"], reference["fc2.weight"]), "include and exclude select the same tensors"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(name, dtype, tiny_base, tiny_experts):
    """Merging half-precision checkpoints equals merging the same values in float32, then casting."""

    def cast(sd, to):
        return {k: v.to(to) if is_float(v) else v for k, v in sd.items()}

    base, experts = cast(tiny_base, dtype), [cast(e, dtype) for e in tiny_experts]
    merged = merge(name, base, experts)
    in_float32 = merge(name, cast(base, torch.float32), [cast(e, torch.float32) for e in experts])
    assert_same_state_dict(merged, cast(in_float32, dtype), atol=0, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_key_by_key_equals_whole_model(name, tiny_base, tiny_experts):
    """What the streaming command line does: prepass once, then ``fn`` on one key at a time."""
    m = METHODS[name]
    params = resolve_hparams(m, {})
    keys = select_keys(tiny_base)
    base = {k: to_compute(tiny_base[k]) for k in keys}
    experts = [{k: to_compute(e[k]) for k in keys} for e in tiny_experts]
    context = run_prepass(name, run_items(base, experts, keys))
    whole = merge(name, tiny_base, tiny_experts)
    for k in keys:
        part = m.fn({k: base[k]}, [{k: e[k]} for e in experts], context=context, **params)
        torch.testing.assert_close(part[k].cpu(), whole[k], atol=1e-6, rtol=1e-5, msg=lambda msg: f"{k}: {msg}")


def row_halves(t):
    """A tensor cut into two blocks of rows (a scalar or a single row stays whole)."""
    return [t] if t.ndim == 0 or t.shape[0] < 2 else list(t.split((t.shape[0] + 1) // 2))


@pytest.mark.parametrize("name", [n for n in ALL if is_elementwise(METHODS[n], resolve_hparams(METHODS[n], {}))])
def test_elementwise_method_on_row_blocks_equals_whole_tensors(name, tiny_base, tiny_experts):
    """What ``elementwise`` promises the streaming command line: given the context, ``fn`` on
    blocks of rows (under the tensor's own key) gives exactly the rows of the whole result."""
    m = METHODS[name]
    params = resolve_hparams(m, {})
    keys = select_keys(tiny_base)
    base = {k: to_compute(tiny_base[k]) for k in keys}
    experts = [{k: to_compute(e[k]) for k in keys} for e in tiny_experts]
    context = run_prepass(name, run_items(base, experts, keys))
    for k in keys:
        whole = m.fn({k: base[k]}, [{k: e[k]} for e in experts], context=context, **params)[k]
        blocks = zip(row_halves(base[k]), *(row_halves(e[k]) for e in experts))
        parts = [m.fn({k: b}, [{k: x} for x in xs], context=context, **params)[k] for b, *xs in blocks]
        assert torch.equal(torch.cat(parts) if whole.ndim else parts[0], whole), k


@pytest.mark.parametrize("name", [n for n in ALL if METHODS[n].prepass_elementwise])
def test_elementwise_prepass_on_row_blocks_equals_whole_tensors(name, tiny_base, tiny_experts):
    keys = select_keys(tiny_base)
    base = {k: to_compute(tiny_base[k]) for k in keys}
    experts = [{k: to_compute(e[k]) for k in keys} for e in tiny_experts]
    blocked = [(k, b, xs) for k in keys for b, *xs in zip(row_halves(base[k]), *(row_halves(e[k]) for e in experts))]
    assert len(blocked) > len(keys)
    assert run_prepass(name, blocked) == run_prepass(name, run_items(base, experts, keys))


def test_tensor_scope_ties_is_not_elementwise():
    """A block of rows would get its own top-k magnitudes, not the tensor's."""
    ties = METHODS["ties"]
    assert is_elementwise(ties, resolve_hparams(ties, {"scope": "model"}))
    assert not is_elementwise(ties, resolve_hparams(ties, {"scope": "tensor"}))


@pytest.mark.parametrize("name", ALL)
def test_given_context_is_used(name, tiny_base, tiny_experts):
    keys = select_keys(tiny_base)
    items = run_items(
        {k: to_compute(tiny_base[k]) for k in keys}, [{k: to_compute(e[k]) for k in keys} for e in tiny_experts], keys
    )
    context = run_prepass(name, items)
    assert_same_state_dict(
        merge(name, tiny_base, tiny_experts, context=context), merge(name, tiny_base, tiny_experts), atol=0, rtol=0
    )


@pytest.mark.parametrize("name", ALL)
def test_single_expert(name, tiny_base, tiny_experts):
    """N = 1 is allowed; methods that need a second expert say so."""
    try:
        merged = merge(name, tiny_base, tiny_experts[:1])
    except ValueError as err:
        assert "expert" in str(err)
    else:
        assert list(merged) == list(tiny_base)


# ----------------------------------------------------------------------------- clear errors


def test_unknown_method_lists_the_known_ones(tiny_base):
    with pytest.raises(ValueError, match="unknown merge method 'tie'.*average.*ties"):
        merge("tie", tiny_base, [tiny_base])


@pytest.mark.parametrize("name", ALL)
def test_unknown_hyperparameter(name, tiny_base):
    with pytest.raises(ValueError, match="unknown hyperparameter.*'densty'"):
        merge(name, tiny_base, [tiny_base], densty=0.5)


@pytest.mark.parametrize("name", ALL)
def test_missing_key_names_key_and_expert(name, tiny_base, tiny_experts):
    broken = dict(tiny_experts[2])
    del broken["fc1.weight"]
    with pytest.raises(ValueError, match=r"expert 2 is missing 'fc1.weight'"):
        merge(name, tiny_base, [*tiny_experts[:2], broken])


@pytest.mark.parametrize("name", ALL)
def test_shape_mismatch_names_key_and_expert(name, tiny_base, tiny_experts):
    broken = {**tiny_experts[1], "fc2.weight": torch.zeros(12, 17)}
    with pytest.raises(ValueError, match=r"expert 1 has 'fc2.weight' with shape \(12, 17\)"):
        merge(name, tiny_base, [tiny_experts[0], broken])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_inf_rejected(name, bad, tiny_base, tiny_experts):
    broken = {k: v.clone() for k, v in tiny_experts[0].items()}
    broken["fc1.bias"][3] = bad
    with pytest.raises(ValueError, match=r"expert 0: 'fc1.bias' contains 1 NaN/Inf"):
        merge(name, tiny_base, [broken, tiny_experts[1]])


@pytest.mark.parametrize("name", [n for n in ALL if METHODS[n].needs_base])
def test_missing_base_is_an_error(name, tiny_experts):
    with pytest.raises(ValueError, match="needs the base model"):
        merge(name, None, tiny_experts)


@pytest.mark.parametrize("name", [n for n in ALL if not METHODS[n].needs_base])
def test_methods_without_base_copy_integer_buffers_from_expert_0(name, tiny_experts):
    merged = merge(name, None, tiny_experts)
    assert torch.equal(merged["bn.num_batches_tracked"], tiny_experts[0]["bn.num_batches_tracked"])


def test_experts_must_be_a_list(tiny_base):
    with pytest.raises(TypeError, match="list of state dicts"):
        merge("average", tiny_base, tiny_base)


def test_no_experts(tiny_base):
    with pytest.raises(ValueError, match="at least one expert"):
        merge("average", tiny_base, [])


@pytest.mark.parametrize("excluded_from", ["expert", 3, -1, True])
def test_bad_excluded_from(excluded_from, tiny_base, tiny_experts):
    with pytest.raises(ValueError, match="excluded_from must be 'base' or an expert index 0..2"):
        merge("average", tiny_base, tiny_experts, exclude="classifier", excluded_from=excluded_from)


#: one out-of-range value per hyperparameter of the methods in this file's owner's modules:
#: (method, hyperparameters, text the error must contain: the parameter's name and valid range)
OUT_OF_RANGE = [
    ("average", {"weights": [1.0, -1.0, 0.5]}, "weights must be"),
    ("average", {"weights": [1.0, 1.0]}, "one entry per expert"),
    ("task_arithmetic", {"lam": math.nan}, "lam must be in"),
    ("ties", {"density": 1.5}, r"density must be in \[0.0, 1.0\]"),
    ("ties", {"density": -0.1}, r"density must be in \[0.0, 1.0\]"),
    ("ties", {"lam": math.inf}, "lam must be in"),
    ("ties", {"scope": "layer"}, "scope must be 'model'"),
    ("dare", {"p": 1.0}, r"p must be in \[0.0, 1.0\)"),
    ("dare", {"p": -0.5}, r"p must be in \[0.0, 1.0\)"),
    ("dare", {"seed": 1.5}, "seed must be an integer"),
    ("dare", {"then": "mean"}, "then must be 'sum'"),
    ("dare", {"then": "mergekit"}, "'ties_sum' .*mergekit.*'trim_ties'"),
    ("dare", {"lam": math.nan}, "lam must be in"),
    ("dare", {"density": 1.2, "then": "trim_ties"}, r"density must be in \[0.0, 1.0\]"),
    ("snr_winner", {"top": 1.2}, r"top must be in \[0.0, 1.0\]"),
    ("snr_max", {"threshold": math.nan}, "threshold must be in"),
    ("snr_weighted", {"score": "median"}, "score must be 'max'"),
    ("snr_base_reset", {"snr_method": "svd"}, "snr_method must be one of"),
    ("snr_low_expert", {"index": -1}, "index must be a non-negative expert index"),
    ("snr_low_expert", {"index": 3}, "expert 3 but only 3 expert"),
]


@pytest.mark.parametrize("name,hp,message", OUT_OF_RANGE)
def test_hyperparameter_out_of_range(name, hp, message, tiny_base, tiny_experts):
    with pytest.raises(ValueError, match=message):
        merge(name, tiny_base, tiny_experts, **hp)
