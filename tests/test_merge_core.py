"""The merge core (issue 14): one vocabulary of hyperparameters with old names as aliases, the
registry's family/reference/version, the task-arithmetic family as options of one core, and the
key loop and batching owned by ``merge``."""

from __future__ import annotations

import inspect

import pytest
import torch

import lib.merge as merging
from lib.merge import METHODS, VOCABULARY, canonical_params, merge
from lib.merge.core import Recipe, merge_tensor

FAMILIES = {"average", "task_arithmetic", "spectral", "snr"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registry_entry_has_family_reference_and_version(name):
    m = METHODS[name]
    assert m.family in FAMILIES
    assert "https://github.com/" in m.reference, "a reference names the paper and the official code"
    assert isinstance(m.version, int) and m.version >= 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_defaults_are_declared_once(name):
    """The registered function declares no default of its own: the registry's are the only ones."""
    impl = METHODS[name].impl
    own = [
        p.name
        for p in inspect.signature(impl).parameters.values()
        if p.default is not inspect.Parameter.empty and p.name in METHODS[name].defaults
    ]
    assert own == []


def test_shared_names_mean_the_same_everywhere():
    """A hyperparameter name in VOCABULARY has one meaning; every method that takes it uses it so."""
    taking = {word: sorted(n for n, m in METHODS.items() if word in m.defaults) for word in VOCABULARY}
    assert taking["lam"] == sorted(["task_arithmetic", "ties", "dare", "drm_h", "drm_v", "star"])
    assert taking["density"] == sorted(["ties", "dare", "drm_h", "drm_v"])
    assert taking["keep"] == ["dare"]


def test_canonical_params_fill_defaults_and_resolve_old_names():
    assert canonical_params("dare", p=0.9) == canonical_params("dare", keep=0.1) == canonical_params("dare")
    assert canonical_params("dare", p=0.75, then="ties") == {
        "keep": 0.25,
        "seed": 0,
        "then": "ties",
        "lam": 1.0,
        "density": 0.2,
    }
    assert canonical_params("ties") == {"density": 0.2, "lam": 1.0, "scope": "model"}
    with pytest.raises(ValueError, match="both 'p' and 'keep'"):
        canonical_params("dare", p=0.9, keep=0.1)
    with pytest.raises(ValueError, match=r"keep must be in \(0.0, 1.0\]"):
        canonical_params("dare", keep=0.0)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("then", ["sum", "ties", "trim_ties"])
def test_dare_old_and_new_names_merge_identically(p, then, tiny_base, tiny_experts):
    old = merge("dare", tiny_base, tiny_experts, p=p, then=then, seed=4)
    new = merge("dare", tiny_base, tiny_experts, keep=canonical_params("dare", p=p)["keep"], then=then, seed=4)
    assert all(torch.equal(old[k], new[k]) for k in tiny_base)


def test_one_consensus_for_the_family(tiny_base, tiny_experts):
    """TIES without a trim and DARE without a drop are the same core: sign election, disjoint mean."""
    ties = merge("ties", tiny_base, tiny_experts, density=1.0)
    dare = merge("dare", tiny_base, tiny_experts, keep=1.0, then="ties")
    assert all(torch.equal(ties[k], dare[k]) for k in tiny_base)


def test_core_steps_by_hand():
    """sparsify x consensus x lam on a 3-entry example small enough to check by eye."""
    base = torch.zeros(3)
    experts = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -0.5]), torch.tensor([-1.0, 1.5, 0.25])]
    total = merge_tensor(Recipe(lam=0.5), base, experts, key="w")
    assert torch.equal(total, 0.5 * torch.tensor([3.0, 0.5, 0.25]))
    # consensus "mean": signs by total mass (+, +, +), mean of the agreeing entries
    assert torch.equal(merge_tensor(Recipe(consensus="mean"), base, experts, key="w"), torch.tensor([2.0, 1.25, 0.375]))
    assert torch.equal(merge_tensor(Recipe(consensus="sum"), base, experts, key="w"), torch.tensor([4.0, 2.5, 0.75]))
    # a per-tensor trim keeping int(0.34 * 3) = 1 entry of each expert (-2, 3, 1.5): masses 3, -0.5, 0;
    # the third entry has no elected sign and merges to 0
    trimmed = merge_tensor(Recipe(density=0.34, scope="tensor", consensus="mean"), base, experts, key="w")
    assert torch.equal(trimmed, torch.tensor([3.0, -2.0, 0.0]))


def test_spectral_batching_does_not_change_the_merge(tiny_base, tiny_experts, monkeypatch):
    """STAR and DRM share merge's stack loop: one matrix per batch gives the same tensors."""
    whole = {name: merge(name, tiny_base, tiny_experts) for name in ("star", "drm_h")}
    monkeypatch.setattr(merging, "BATCH_ELEMENTS", len(tiny_experts))  # one entry per expert: one matrix a batch
    for name, expected in whole.items():
        merged = merge(name, tiny_base, tiny_experts)
        assert all(torch.equal(merged[k], expected[k]) for k in tiny_base), name


def test_task_vectors_helper_is_gone():
    assert not hasattr(merging, "task_vectors")


# ----------------------------------------------------------------------------- exact selection (issue 22)


@pytest.mark.parametrize("quantised", [False, True])
def test_kth_largest_equals_topk_on_long_rows(quantised):
    """The bracketed selection returns the k-th largest exactly, ties included (a quantised row
    has thousands of entries equal to its threshold)."""
    from lib.merge.ties import _SMALL_ROW, kth_largest

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3 * _SMALL_ROW + 7, generator=g).abs()
    x = x.mul(3).round() if quantised else x
    n = x.shape[1]
    for k in (1, 2, n // 5, n // 2, n - 1, n):
        assert torch.equal(kth_largest(x, k), torch.topk(x, k, dim=1).values.amin(1, keepdim=True)), k


def test_model_wide_threshold_equals_radix_select_whole_in_blocks_and_after_a_miss(monkeypatch):
    import lib.merge.ties as ties

    g = torch.Generator().manual_seed(1)
    items = [
        [torch.randn(shape, generator=g) * (1 + 9 * torch.rand(shape, generator=g)) for _ in range(3)]
        for shape in [(300, 257), (70000,), (5,), (768, 96)]
    ]
    blocks = [list(parts) for tensors in items for parts in zip(*[t.split(max(1, t.shape[0] // 3)) for t in tensors])]
    total = sum(t.numel() for t in next(zip(*items)))
    for density in (0.0, 1e-5, 0.2, 0.99, 1.0):
        ks = [ties.kept_count(total, density)] * 3
        exact = ties._radix_select(items, ks)
        assert ties.kth_largest_magnitude(items, ks) == exact == ties.kth_largest_magnitude(blocks, ks), density
    monkeypatch.setattr(ties, "_SAMPLE_CAP", 10)  # every bracket holds too much: the radix fallback
    ks = [ties.kept_count(total, 0.3)] * 3
    assert ties.kth_largest_magnitude(items, ks) == ties._radix_select(items, ks)


def test_keys_merged_in_parallel_threads_equal_one_thread(tiny_base, tiny_experts):
    """merge spreads a per-tensor method's keys over torch's threads, each op single-threaded;
    the result is the serial one and the thread count is restored."""
    threads = torch.get_num_threads()
    parallel = {name: merge(name, tiny_base, tiny_experts) for name in ("ties", "dare", "snr_winner")}
    torch.set_num_threads(1)
    try:
        serial = {name: merge(name, tiny_base, tiny_experts) for name in parallel}
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for name in parallel:
        assert all(torch.equal(parallel[name][k], serial[name][k]) for k in tiny_base), name
