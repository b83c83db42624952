"""Low-rank task vectors (lib.lora): every method on factored inputs equals the same method on the
densified task vectors; adapters read from and written to PEFT folders; and where PEFT's
``add_weighted_adapter`` defines the same merge, the merged delta equals PEFT's.

Correspondences with ``add_weighted_adapter`` (PEFT 0.21), each tested below:

* ``cat`` with weights ``w``: ``sum_t w_t s_t B_t A_t`` = our ``task_arithmetic(weights=w)``
  (``lam=1``), and our factored path writes the same concatenated factors.
* ``svd`` at full rank (``svd_rank`` at least the rank of the sum): the weighted sum, as ``cat``.
  At a smaller ``svd_rank`` PEFT truncates the sum to its top singular components, which no
  method here does (STAR truncates each task vector by a nuclear-norm rule, before the mean).
* ``ties_svd`` at full rank (``svd_rank = min(out, in)``, the TIES result is not low-rank): our
  ``ties(scope="tensor")``: PEFT's ``ties`` keeps ``int(density * n)`` entries per task tensor,
  elects signs by total mass and takes the disjoint mean, as ours does with ``scope="tensor"``.
* ``dare_linear_svd`` at full rank: our ``dare(p=1-density, then="sum")``, given the same masks:
  PEFT draws them with ``torch.bernoulli`` from the global generator, ours from a generator seeded
  per (key, expert, seed), so the test hands PEFT our masks and the two agree exactly; with its
  own draws the merges agree in distribution only.
* ``linear`` is not a merge of the deltas: it combines the A's and the B's separately
  (``(sum_t sqrt(w_t s_t) B_t)(sum_t sqrt(w_t s_t) A_t)``), which has cross terms ``B_t A_u``; no
  method here does that, and the test shows it differs from the sum.
* STAR and DRM have no PEFT counterpart.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from lib.checkpoint import Checkpoint
from lib.lora import FACTORED, Adapter, LowRank, densify, merge_lowrank, read_adapter, stack_factors, write_adapter
from lib.merge import METHODS, merge

TOL = 1e-6


def rel(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """Relative Frobenius error; relative to ``floor`` where the reference is smaller (a zero
    merged delta that the reference holds as round-off)."""
    return float((x - ref).norm() / max(float(ref.norm()), floor))


def synthetic_base(seed: int = 0) -> dict:
    """A float64 base with every kind of tensor: an embedding, a conv kernel, matrices large
    enough for rank 64, a bias and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed.weight": (40, 24),
        "conv.weight": (6, 3, 3, 3),
        "fc1.weight": (96, 80),
        "fc1.bias": (96,),
        "fc2.weight": (80, 96),
        "classifier.weight": (3, 80),
    }
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) / math.sqrt(s[-1]) for k, s in shapes.items()}
    base["bn.num_batches_tracked"] = torch.tensor(7)
    return base


def random_adapter(base: dict, rank: int, seed: int, *, skip=(), full=()) -> Adapter:
    """Random rank-``rank`` deltas on every matrix of ``base`` except ``skip``; ``full`` keys get a
    full replacement weight instead (as PEFT's modules_to_save)."""
    g = torch.Generator().manual_seed(seed)
    deltas, tensors = {}, {}
    for k, w in base.items():
        if w.ndim < 2 or k in skip:
            continue
        if k in full:
            tensors[k] = w + 0.1 * torch.randn(w.shape, generator=g, dtype=w.dtype)
            continue
        m, n = w.shape[0], math.prod(w.shape[1:])
        b = torch.randn(m, rank, generator=g, dtype=w.dtype)
        a = torch.randn(rank, n, generator=g, dtype=w.dtype)
        deltas[k] = LowRank(b, a, scale=0.3 / rank, shape=tuple(w.shape))
    return Adapter(deltas, tensors)


def assert_merges_agree(method, base, adapters, **hp):
    experts = [densify(base, ad) for ad in adapters]
    ref = merge(method, base, experts, **hp)
    got = merge_lowrank(method, base, adapters, **hp)
    out = got.state_dict(base)
    assert list(out) == list(ref)
    for k in ref:
        assert out[k].dtype == ref[k].dtype and out[k].shape == ref[k].shape, k
        if ref[k].is_floating_point():
            err = rel(out[k] - base[k], ref[k] - base[k], floor=1e-9 * float(base[k].norm()))
            assert err <= TOL, f"{method} {k}: relative error {err:.2e}"
        else:
            assert torch.equal(out[k], ref[k]), k
    return got


@pytest.mark.parametrize("n_experts,rank", [(1, 1), (2, 4), (3, 16), (5, 64), (8, 8), (8, 64)])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_factored_inputs_equals_it_on_densified_ones(method, n_experts, rank):
    base = synthetic_base()
    adapters = [random_adapter(base, rank, seed) for seed in range(1, n_experts + 1)]
    try:
        merge(method, base, [densify(base, ad) for ad in adapters])
    except ValueError as err:  # e.g. snr_low_b needs a second expert: the same error, either way
        with pytest.raises(ValueError, match=re.escape(str(err))):
            merge_lowrank(method, base, adapters)
        return
    got = assert_merges_agree(method, base, adapters)
    matrices = [k for k, t in base.items() if t.ndim >= 2]
    assert sorted(got.deltas) == (sorted(matrices) if method in FACTORED else []), "factored path where it exists"


@pytest.mark.parametrize(
    "method,hp",
    [
        ("star", dict(eta=90)),
        ("star", dict(eta=100, rescale=False)),
        ("star", dict(eta=10)),
        ("star", dict(lam=0.125)),
        ("star", dict(eta=20, rescale=False, lam=-1.5)),
        ("drm_h", dict(rtol=0.0)),
        ("drm_h", dict(prune="per_task", renorm=False, density=0.5)),
        ("drm_v", dict(density=1.0, lam=0.7)),
        ("drm_v", dict(prune="per_task")),
        ("task_arithmetic", dict(lam=0.5, weights=[1.0, -2.0, 0.5])),
        ("average", dict(weights=[3.0, 1.0, 0.0])),
    ],
)
def test_factored_paths_with_other_hyperparameters(method, hp):
    base = synthetic_base(1)
    assert_merges_agree(method, base, [random_adapter(base, r, s) for r, s in [(3, 1), (16, 2), (7, 3)]], **hp)


def test_mixed_ranks_missing_modules_and_full_tensors():
    """Different ranks per expert, an expert that leaves a matrix alone (a zero task vector), a
    full replacement weight (modules_to_save: that key goes through the dense merge), and a key
    excluded by name."""
    base = synthetic_base(2)
    adapters = [
        random_adapter(base, 4, 1, skip=("fc2.weight",)),
        random_adapter(base, 12, 2, full=("classifier.weight",)),
        random_adapter(base, 1, 3, skip=("embed.weight", "conv.weight")),
    ]
    for method in FACTORED:
        got = assert_merges_agree(method, base, adapters)
        assert "classifier.weight" not in got.deltas and "fc2.weight" in got.deltas
        got = assert_merges_agree(method, base, adapters, exclude="fc1")
        assert "fc1.weight" not in got.deltas


def test_float32_factors_merge_like_float32_dense_experts():
    """Real adapters are float32: the factored paths (float64 inside, from the exact factors)
    agree with the dense float32 merge (of the deltas rounded to float32) to float32 rounding,
    except that DRM may prune an entry of its joint coordinates on one side of the threshold and
    not on the other (:mod:`lib.merge.drm`: a discontinuity, measured here as one flip in the
    40x24 embedding): the difference is then rank one, a basis vector times the flipped entry."""
    base = {k: v.float() if v.is_floating_point() else v for k, v in synthetic_base(3).items()}
    adapters = [random_adapter(base, 8, s) for s in (1, 2, 3)]
    for method in ("star", "drm_h", "drm_v", "task_arithmetic"):
        ref = merge(method, base, [densify(base, ad) for ad in adapters])
        out = merge_lowrank(method, base, adapters).state_dict(base)
        for k in base:
            if base[k].ndim >= 2:
                assert out[k].dtype == torch.float32
                err = rel(out[k] - base[k], ref[k] - base[k])
                if method.startswith("drm") and err >= 1e-5:
                    sigma = torch.linalg.svdvals((out[k] - ref[k]).double().flatten(1))
                    assert int((sigma > 1e-4 * sigma[0]).sum()) <= 2, (method, k, err)
                else:
                    assert err < 1e-5, (method, k, err)


def test_stack_factors_folds_scales_and_pads_ranks():
    d1 = LowRank(torch.ones(4, 2), torch.ones(2, 3), scale=0.5)
    b, a = stack_factors([d1, None, LowRank(torch.ones(4, 5), torch.ones(5, 3))], dtype=torch.float64)
    assert b.shape == (3, 4, 5) and a.shape == (3, 5, 3)
    torch.testing.assert_close(b[0] @ a[0], d1.dense(torch.float64))
    assert not (b[1] @ a[1]).any()


def test_lowrank_checks_its_shapes():
    with pytest.raises(ValueError, match="b \\(out, r\\) and a \\(r, in\\)"):
        LowRank(torch.ones(4, 2), torch.ones(3, 3))
    with pytest.raises(ValueError, match="do not make a delta of shape"):
        LowRank(torch.ones(4, 2), torch.ones(2, 6), shape=(4, 5))
    assert LowRank(torch.ones(4, 2), torch.ones(2, 6), shape=(4, 2, 3)).dense().shape == (4, 2, 3)


# ------------------------------------------------------------------------------ PEFT adapters

transformers = pytest.importorskip("transformers")


def tiny_bert(seed: int):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=60,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


TARGETS = ["query", "value", "dense", "word_embeddings"]


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory):
    """A tiny BERT base folder and three PEFT adapters with random (non-zero) A and B: ranks 4, 4
    and 8 on attention, both MLP matrices, the output projections, the pooler and the word
    embeddings; the third with rsLoRA."""
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("lora")
    base_model = tiny_bert(0)
    base_model.save_pretrained(root / "base")
    folders = []
    for i, (r, alpha, rslora) in enumerate([(4, 8, False), (4, 16, False), (8, 8, True)]):
        torch.manual_seed(10 + i)
        config = peft.LoraConfig(
            r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS, init_lora_weights=False
        )
        model = peft.get_peft_model(tiny_bert(0), config)
        model.save_pretrained(root / f"adapter{i}")
        folders.append(root / f"adapter{i}")
    return {"peft": peft, "root": root, "base": root / "base", "adapters": folders}


def base_state(setup) -> dict:
    ckpt = Checkpoint(setup["base"])
    return {k: ckpt.read(k) for k in ckpt.keys()}


def peft_deltas(setup, folder) -> dict:
    """PEFT's own delta weights of an adapter, keyed by the base's weight names."""
    model = setup["peft"].PeftModel.from_pretrained(tiny_bert(0), folder)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "scaling", {}):
            out[f"{name}.weight"] = module.get_delta_weight("default").detach()
    return out


def test_read_adapter_gives_peft_deltas(peft_setup):
    ckpt = Checkpoint(peft_setup["base"])
    for folder in peft_setup["adapters"]:
        adapter = read_adapter(folder, ckpt)
        reference = peft_deltas(peft_setup, folder)
        assert sorted(adapter.deltas) == sorted(reference)
        assert "embeddings.word_embeddings.weight" in adapter.embeddings
        for k, d in adapter.deltas.items():
            assert rel(d.dense(torch.float64), reference[k].double()) < 1e-6, k
    assert read_adapter(peft_setup["adapters"][2], ckpt).deltas["pooler.dense.weight"].scale == pytest.approx(
        8 / math.sqrt(8)
    )


def test_read_adapter_names_the_first_mismatch(peft_setup, tmp_path):
    peft = peft_setup["peft"]
    other = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            vocab_size=60,
            max_position_embeddings=32,
        )
    )
    base = Checkpoint(peft_setup["base"])
    model = peft.get_peft_model(
        other, peft.LoraConfig(r=2, target_modules=["intermediate.dense"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / "wrong")
    with pytest.raises(
        ValueError,
        match=r"'encoder\.layer\.0\.intermediate\.dense\.weight' gets a delta of shape \(48, 32\).*the base has \(64, 32\)",
    ):
        read_adapter(tmp_path / "wrong", base)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        read_adapter(tmp_path, base)
    renamed = {f"bert.{k}": v for k, v in base_state(peft_setup).items()}
    with pytest.raises(ValueError, match="which the base does not have"):
        read_adapter(peft_setup["adapters"][0], renamed)


def peft_merge(setup, combination, weights, **kw) -> dict:
    """The delta weights of PEFT's ``add_weighted_adapter`` merge of the three adapters."""
    model = setup["peft"].PeftModel.from_pretrained(tiny_bert(0), setup["adapters"][0], adapter_name="a0")
    for i, folder in enumerate(setup["adapters"][1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(3)], weights, "merged", combination_type=combination, **kw)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "merged" in getattr(module, "scaling", {}):
            out[f"{name}.weight"] = module.get_delta_weight("merged").detach()
    return out


def adapters_and_base(setup):
    base = base_state(setup)
    ckpt = Checkpoint(setup["base"])
    return base, [read_adapter(f, ckpt) for f in setup["adapters"]]


def assert_peft_equal(ours: dict, base: dict, peft_result: dict, tol: float = 1e-5):
    assert peft_result
    for k, delta in peft_result.items():
        err = rel(ours[k].double() - base[k].double(), delta.double())
        assert err < tol, f"{k}: {err:.2e}"


def test_cat_and_full_rank_svd_are_weighted_task_arithmetic(peft_setup):
    base, adapters = adapters_and_base(peft_setup)
    weights = [0.7, -0.4, 1.3]
    ours = merge_lowrank("task_arithmetic", base, adapters, weights=weights)
    cat = peft_merge(peft_setup, "cat", weights)
    assert_peft_equal(ours.state_dict(base), base, cat)
    assert all(ours.deltas[k].rank == 4 + 4 + 8 for k in cat), "PEFT's cat: ranks add up"
    assert_peft_equal(ours.state_dict(base), base, peft_merge(peft_setup, "svd", weights, svd_rank=16))
    # at a lower rank PEFT's svd is the truncated sum, no method here
    low = peft_merge(peft_setup, "svd", weights, svd_rank=2)
    k = "encoder.layer.0.attention.self.query.weight"
    assert rel(ours.state_dict(base)[k] - base[k], low[k]) > 1e-2


def test_ties_svd_at_full_rank_is_tensor_scope_ties(peft_setup):
    base, adapters = adapters_and_base(peft_setup)
    ours = merge_lowrank("ties", base, adapters, density=0.3, scope="tensor").state_dict(base)
    assert_peft_equal(ours, base, peft_merge(peft_setup, "ties_svd", [1.0, 1.0, 1.0], density=0.3, svd_rank=32))


def test_dare_linear_svd_at_full_rank_is_dare_sum_given_the_same_masks(peft_setup, monkeypatch):
    from peft.utils import merge_utils

    from lib.merge.dare import keep_mask

    base, adapters = adapters_and_base(peft_setup)
    p, seed = 0.6, 3
    ours = merge_lowrank("dare", base, adapters, p=p, seed=seed, then="sum").state_dict(base)
    # PEFT visits the modules in model order (not the checkpoint's sorted one) and the adapters in
    # order: hand it our masks in that order
    keys = [k for k in tiny_bert(0).state_dict() if k in adapters[0].deltas]
    masks = iter([keep_mask(base[k].shape, p, key=k, expert=i, seed=seed) for k in keys for i in range(3)])

    def our_random_pruning(tensor, density, rescale):
        assert density == pytest.approx(1 - p)
        return tensor * next(masks) / density

    monkeypatch.setattr(merge_utils, "random_pruning", our_random_pruning)
    assert_peft_equal(
        ours, base, peft_merge(peft_setup, "dare_linear_svd", [1.0, 1.0, 1.0], density=1 - p, svd_rank=32)
    )


def test_peft_linear_is_not_a_sum_of_deltas(peft_setup):
    """PEFT's 'linear' mixes the A's and the B's separately (cross terms B_t A_u)."""
    base, adapters = adapters_and_base(peft_setup)
    peft = peft_setup["peft"]
    model = peft.PeftModel.from_pretrained(tiny_bert(0), peft_setup["adapters"][0], adapter_name="a0")
    model.load_adapter(peft_setup["adapters"][1], adapter_name="a1")
    model.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "merged", combination_type="linear")
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    ours = merge_lowrank("task_arithmetic", base, adapters[:2]).deltas["encoder.layer.0.attention.self.query.weight"]
    assert rel(layer.get_delta_weight("merged").double(), ours.dense(torch.float64)) > 0.1


@pytest.mark.parametrize(
    "method,hp",
    [("star", {}), ("drm_h", {}), ("drm_v", {"density": 0.5}), ("task_arithmetic", {"lam": 0.5}), ("average", {})],
)
def test_written_adapter_loads_in_peft_with_the_full_models_logits(peft_setup, tmp_path, method, hp):
    base, adapters = adapters_and_base(peft_setup)
    result = merge_lowrank(method, base, adapters, **hp)
    out = write_adapter(tmp_path / "merged", result.deltas, like=adapters[0])
    full = tiny_bert(0)
    full.load_state_dict(result.state_dict(base), strict=False)
    loaded = peft_setup["peft"].PeftModel.from_pretrained(tiny_bert(0), out).eval()
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = full(input_ids=ids).last_hidden_state
        got = loaded(input_ids=ids).last_hidden_state
    assert rel(got, expected) < 1e-5
    # read back, the adapter holds the merged deltas
    again = read_adapter(out, Checkpoint(peft_setup["base"]))
    for k, d in result.deltas.items():
        assert rel(again.deltas[k].dense(torch.float64), d.dense(torch.float64)) < 1e-6, k
    with pytest.raises(FileExistsError):
        write_adapter(out, result.deltas, like=adapters[0])
