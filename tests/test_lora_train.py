"""LoRA experts of lib.train: the configuration (a full fine-tune's key is unchanged), a SMOKE
LoRA expert whose merged weights are its base plus its adapter's deltas and whose only other
change is its head, the cache, and the adapter read back as factored task vectors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lib import cache as expert_cache
from lib import paths, train
from lib.lora import densify


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRAL_MERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_lora_settings_complete_and_check():
    assert expert_cache.lora_spec(None) is None and expert_cache.lora_spec(False) is None
    spec = expert_cache.lora_spec(True)
    assert spec == {"r": 16, "alpha": 32.0, "targets": ["query", "value"], "dropout": 0.0}
    assert expert_cache.lora_spec({"targets": "key", "r": 4})["targets"] == ["key"]
    with pytest.raises(ValueError, match="unknown LoRA setting"):
        expert_cache.lora_spec({"rank": 4})
    with pytest.raises(ValueError, match="rank r >= 1"):
        expert_cache.lora_spec({"r": 0})


def test_lora_config_leaves_full_fine_tunes_alone():
    full = expert_cache.expert_config("sst2", seed=0, smoke=True)
    lora = expert_cache.expert_config("sst2", seed=0, smoke=True, lora=True)
    assert "lora" not in full and lora["lora"]["r"] == 16
    assert lora["recipe"]["lr"] == expert_cache.LORA_LR and full["recipe"]["lr"] == expert_cache.RECIPES["sst2"].lr
    assert expert_cache.config_key(full) != expert_cache.config_key(lora)
    assert expert_cache.expert_config("sst2", seed=0, smoke=True, lora=True, lr=1e-3)["recipe"]["lr"] == 1e-3
    with pytest.raises(ValueError, match="text experts"):
        expert_cache.expert_config("mnist", seed=0, smoke=True, lora=True)


def test_smoke_lora_expert_is_its_base_plus_its_adapter():
    expert = train.fit_expert(
        "sst2", seed=0, smoke=True, progress=False, lora={"r": 4}, max_train_examples=16, batch_size=8
    )
    assert expert.is_lora and (expert.path / expert_cache.ADAPTER_DIR / "adapter_config.json").is_file()
    assert expert.metrics["n"] == expert_cache.SMOKE_EVAL["text"]
    base = train.base_state_dict("sst2", seed=0)
    adapter = expert.adapter()
    assert sorted(k.split(".")[-2] for k in adapter.deltas) == sorted(["query", "value"] * 6)
    assert all(d.rank == 4 and d.scale == 32 / 4 for d in adapter.deltas.values())
    assert set(adapter.tensors) == {"classifier.weight", "classifier.bias"}
    # the trained expert's weights are the base's, the adapted matrices plus s B A, and its own head
    dense = densify(base, adapter)
    assert dense.keys() == expert.state_dict.keys()
    for k, t in expert.state_dict.items():
        assert torch.allclose(t, dense[k], atol=1e-6), k
    changed = {k for k in base if not torch.equal(base[k], expert.state_dict[k])}
    assert changed == set(adapter.deltas) | set(adapter.tensors)
    # the second call loads it
    again = train.fit_expert(
        "sst2", seed=0, smoke=True, progress=False, lora={"r": 4}, max_train_examples=16, batch_size=8
    )
    assert again.from_cache and again.key == expert.key
    assert torch.equal(again.adapter().deltas[next(iter(adapter.deltas))].b, next(iter(adapter.deltas.values())).b)


def test_a_full_fine_tune_has_no_adapter():
    expert = expert_cache.Expert("k", {"task": "sst2", "seed": 0}, {}, {}, {}, {}, expert_cache.expert_path("k"))
    with pytest.raises(ValueError, match="not a LoRA expert"):
        expert.adapter()


def test_a_cut_plan_keeps_only_what_it_names_and_refuses_unknown_names():
    from lib import experts

    whole = experts.plan(lora=True)
    part = experts.cut(whole, seeds=[0], tasks=["sst2", "trec"])
    assert [(i.task, i.seed) for i in part] == [("sst2", 0), ("trec", 0)]
    assert experts.cut(whole) == whole
    with pytest.raises(ValueError, match=r"unknown seed\(s\) \[7\]"):
        experts.cut(whole, seeds=[7])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['mnist'\]"):
        experts.cut(whole, tasks=["mnist"])


def test_a_cut_plan_merges_its_rows_into_the_published_ones():
    from lib import experts

    def row(task, seed, acc):
        return {
            "task": task,
            "variant": "pretrained",
            "seed": seed,
            "key": f"{task}{seed}{acc}",
            "metrics": {"accuracy": acc},
            "runtime": {"train_s": 1.0},
        }

    previous = {"experts": [row("sst2", 0, 0.5), row("trec", 0, 0.6), row("sst2", 1, 0.7)]}
    rows = experts.merged_rows(previous, [row("sst2", 0, 0.9)])
    assert [(r["task"], r["seed"], r["metrics"]["accuracy"]) for r in rows] == [
        ("sst2", 0, 0.9),
        ("trec", 0, 0.6),
        ("sst2", 1, 0.7),
    ], "the new row replaces its namesake, the others are kept"
    assert experts.merged_rows(None, rows) == rows


def test_lora_recipes_override_the_full_recipe_for_lora_experts_only():
    for task, changes in expert_cache.LORA_RECIPES.items():
        lora = expert_cache.expert_config(task, seed=0, smoke=False, lora=True)["recipe"]
        full = expert_cache.expert_config(task, seed=0, smoke=False)["recipe"]
        assert {k: lora[k] for k in changes} == changes, f"{task}: the LoRA recipe applies"
        assert full == dataclasses.asdict(expert_cache.RECIPES[task]), f"{task}: the full fine-tune keeps its recipe"
    # an explicit override still wins over the LoRA recipe
    assert expert_cache.expert_config("emotion", seed=0, smoke=False, lora=True, epochs=1)["recipe"]["epochs"] == 1
    # every LoRA recipe was tried beside the full fine-tune and came within 3 points (issue 17)
    trials = paths.read_json(paths.ROOT / "benchmarks" / "results" / "lora_recipe.json")["trials"]
    for task, changes in expert_cache.LORA_RECIPES.items():
        tried = [
            t
            for t in trials
            if t["task"] == task
            and {"lr": expert_cache.LORA_LR, **t["overrides"]} == {"lr": expert_cache.LORA_LR, **changes}
        ]
        assert tried, f"{task}: LORA_RECIPES[{task!r}] has no trial in benchmarks/results/lora_recipe.json"
        metric = "accuracy"
        assert tried[-1]["metrics"][metric] >= tried[-1]["full_fine_tune"][metric] - 0.03
