"""Notebook 07's library side (lib.lora_pool, lib.figures.f07_lora): its grid parameters, its
runs, the low-rank diagnostic on task vectors of known rank, the pool builder's default path,
and the figures drawn from a small synthetic results dict. The notebook itself runs in nbval."""

from __future__ import annotations

import pytest
import torch

from lib import lora_pool, pool


def test_grid_values_are_copies_and_smoke_is_smaller():
    seeds, tasks = lora_pool.grid_values("SEEDS TASKS", smoke=False)
    seeds.append(99)
    assert lora_pool.FULL["SEEDS"] == [0, 1, 2] and len(lora_pool.FULL["TASKS"]) == 7
    small_seeds, small_tasks, sizes = lora_pool.grid_values("SEEDS TASKS SIZES", smoke=True)
    assert len(small_seeds) < len(lora_pool.FULL["SEEDS"]) and set(small_tasks) < set(tasks)
    assert max(sizes) <= len(small_tasks)


def test_runs_hold_stars_sweep_and_every_reference_once():
    runs = lora_pool.lora_runs([20, 40], [20])
    labels = [r.label() for r in runs]
    assert len(labels) == len(set(labels))
    assert pool.canonical_run("star", eta=20, rescale=False).label() in labels
    assert pool.canonical_run("task_arithmetic", lam=0.125).label() in labels
    assert pool.canonical_run("drm_v", renorm=False).label() in labels
    assert sum(r.method == "star" for r in runs) == 3  # eta 20, 40 (the default), 20 without rescale


def test_task_vector_ranks_read_lora_deltas_as_rank_r():
    g = torch.Generator().manual_seed(0)
    base = {
        "q.weight": torch.randn(40, 32, generator=g),
        "k.weight": torch.randn(40, 32, generator=g),
        "bias": torch.randn(40, generator=g),
    }
    lowrank = {**base, "q.weight": base["q.weight"] + torch.randn(40, 4, generator=g) @ torch.randn(4, 32, generator=g)}
    dense = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    rows = lora_pool.task_vector_ranks(base, {"lora": lowrank, "full": dense})
    lora_rows = [r for r in rows if r["expert"] == "lora"]
    assert [r["key"] for r in lora_rows] == ["q.weight"]  # zero task vectors and vectors are skipped
    assert lora_rows[0]["rank"] == 4 and lora_rows[0]["top16_energy"] == pytest.approx(1.0)
    full_rows = [r for r in rows if r["expert"] == "full"]
    assert len(full_rows) == 2 and all(r["rank"] > 16 and r["top16_energy"] < 0.9 for r in full_rows)


def test_figures_draw_from_a_results_dict(tmp_path, monkeypatch):
    from lib.figures import f07_lora

    monkeypatch.setattr(f07_lora, "savefig", lambda fig, name, smoke=False: [tmp_path / f"{name}.png"])
    results = {
        "config": {"default_eta": 40},
        "pools": {"text-lora": {"tasks": ["a", "b"]}},
        "star_ranks": {
            "text-lora": {
                "seed": 0,
                "etas": [20, 40],
                "rows": [
                    {
                        "expert": e,
                        "key": f"encoder.layer.0.attention.self.{m}.weight",
                        "order": i,
                        "nonzero": 16,
                        "kept": [1, 3],
                    }
                    for e in "ab"
                    for i, m in enumerate(["query", "value"])
                ],
            }
        },
        "low_rank": {
            "LoRA": [{"top16_energy": 1.0, "stable_rank": 2.0}],
            "full fine-tune": [{"top16_energy": 0.3, "stable_rank": 40.0}],
        },
    }
    assert [p.stem for p in f07_lora.draw_ranks(results) + f07_lora.draw_low_rank(results)] == [
        "07_lora_ranks",
        "07_lora_low_rank",
    ]
