"""What the notebooks call around the runner (lib.grids, lib.sweep.SweepRunner): a results file
is rendered only for its own configuration and never overwritten by another; the grid a notebook
builds resumes after a kill computing exactly the missing records; a sweep record by record
(notebooks 01-03 through run_grid) equals lib.sweep.sweep_seed's all at once."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from test_runner import RUNS, SOURCE, TASKS, kill_after_records, logged, write_experts

from lib import grids, paths, pool, runner, sweep
from lib.store import RecordStore

CONFIG = {"seeds": [0, 1], "sizes": [2, 3], "runs": ["average(weights=None)"]}


@pytest.fixture(autouse=True)
def results_dir(tmp_path, monkeypatch):
    """Results go to a folder of the test's own; each test starts without memoised pools."""
    monkeypatch.setattr(paths, "RESULTS", tmp_path / "results")
    monkeypatch.setenv("SPECTRAL_MERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(grids.OVERWRITE_VARIABLE, raising=False)
    runner.release()
    yield tmp_path / "results"
    runner.release()


def test_from_results_renders_only_the_notebooks_own_configuration(results_dir, capsys):
    with pytest.raises(FileNotFoundError, match="FROM_RESULTS=1 but .*nb.json does not exist"):
        grids.load_results("nb", CONFIG, smoke=False)
    grids.publish("nb", {"smoke": False, "config": CONFIG, "value": 1}, smoke=False)
    assert grids.load_results("nb", json.loads(json.dumps(CONFIG)), smoke=False)["value"] == 1
    with pytest.raises(grids.ConfigMismatch, match=r"seeds: file \[0, 1\], notebook \[0\]"):
        grids.load_results("nb", {**CONFIG, "seeds": [0]}, smoke=False)
    paths.write_json(results_dir / "smoke" / "nb.json", {"smoke": False, "config": CONFIG})
    with pytest.raises(grids.ConfigMismatch, match="computed with SMOKE=0"):
        grids.load_results("nb", CONFIG, smoke=True)
    # a derived field (run labels spelled by today's code) is a note, not a refusal
    assert (
        grids.load_results("nb", {**CONFIG, "runs": ["average(weights=None, new=1)"]}, smoke=False, derived=["runs"])[
            "value"
        ]
        == 1
    )
    assert (
        'earlier version of the methods; it is shown as published. runs: 1 of 1 differ, e.g. "average(weights=None)" '
        '(file) is "average(weights=None, new=1)" today'
    ) in capsys.readouterr().out


def test_a_published_file_is_not_overwritten_by_another_configuration(results_dir, monkeypatch):
    grids.publish("nb", {"smoke": False, "config": CONFIG, "value": 1}, smoke=False)
    grids.publish("nb", {"smoke": False, "config": CONFIG, "value": 2}, smoke=False)  # same configuration: replaced
    with pytest.raises(
        grids.ConfigMismatch, match=r"not overwriting the published .*sizes: file \[2, 3\], notebook \[2\]"
    ):
        grids.publish("nb", {"smoke": False, "config": {**CONFIG, "sizes": [2]}, "value": 3}, smoke=False)
    assert paths.read_json(results_dir / "nb.json")["value"] == 2
    grids.publish("nb", {"smoke": True, "config": {**CONFIG, "sizes": [2]}}, smoke=True)  # SMOKE files are scratch
    monkeypatch.setenv(grids.OVERWRITE_VARIABLE, "1")
    grids.publish("nb", {"smoke": False, "config": {**CONFIG, "sizes": [2]}, "value": 3}, smoke=False)
    assert paths.read_json(results_dir / "nb.json")["value"] == 3


def test_label_in_finds_the_label_published_records_carry():
    # 05's published DRM records predate DRM's `prune` hyperparameter: their labels do not name it
    old = {"density": 0.2, "lam": 1.0, "rtol": 0.01}
    records = [
        {
            "method": "drm_h",
            "model": "merged",
            "run": f"drm_h(density=0.2, lam=1.0, renorm={r}, rtol=0.01)",
            "hparams": {**old, "renorm": r},
        }
        for r in (True, False)
    ]
    assert grids.label_in(records, pool.canonical_run("drm_h")) == records[0]["run"]
    assert grids.label_in(records, pool.canonical_run("drm_h", renorm=False)) == records[1]["run"]
    assert (
        grids.label_in(records, pool.canonical_run("drm_h", density=0.5))
        == pool.canonical_run("drm_h", density=0.5).label()
    )
    assert grids.label_in(records, pool.canonical_run("ties")) == pool.canonical_run("ties").label()
    # a hyperparameter the records lack matches at its default only: no old record is the per-task ablation
    per_task = pool.canonical_run("drm_h", prune="per_task")
    assert grids.label_in(records, per_task) == per_task.label() != records[0]["run"]


def notebook_grid(folder, seeds=(0,)):
    """A grid built as notebooks 04-05 build theirs: pool specs, a subset plan, runs and an extra sweep."""
    specs = [
        runner.pool_spec(TASKS, seed=s, smoke=True, name="synthetic", source=SOURCE, folder=str(folder)) for s in seeds
    ]
    out = []
    for spec in specs:
        subsets = pool.subset_plan(spec["tasks"], [2, 3], max_subsets=3, seed=spec["seed"])
        out += grids.pool_configs(spec, subsets, RUNS, extra=[(subsets[:1], [pool.canonical_run("ties", density=0.5)])])
    return out


KILLED_NOTEBOOK_GRID = """
import sys
from lib import runner
from lib.store import RecordStore
from test_grids import notebook_grid
runner.run_grid(notebook_grid(sys.argv[1]), store=RecordStore(sys.argv[2]), progress=False)
"""


def test_a_notebook_grid_killed_after_k_records_resumes_with_exactly_the_missing_ones(tmp_path, monkeypatch):
    experts = write_experts(tmp_path / "experts0", 0)
    configs = notebook_grid(experts)
    assert len(configs) == 1 + 4 * len(RUNS) + 1  # alone, 3 pairs + the triple by each run, one extra
    uninterrupted = runner.run_grid(configs, store=RecordStore(tmp_path / "reference.sqlite"), progress=False)
    runner.release()

    path, k = tmp_path / "records.sqlite", 3
    env = {
        **os.environ,
        "GRID_TEST_DELAY": "0.4",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    kill_after_records([sys.executable, "-c", KILLED_NOTEBOOK_GRID, str(experts), str(path)], env=env, path=path, k=k)
    store = RecordStore(path)
    stored = len(store)
    assert k <= stored < len(configs)

    log = tmp_path / "rerun.log"
    monkeypatch.setenv("GRID_TEST_LOG", str(log))
    missing = runner.plan(configs, store)[1]
    resumed = runner.run_grid(configs, store=store, progress=False)
    evaluations = sum(len(c["pool"]["tasks"]) + 1 if c["record"] == "alone" else 1 for c in missing)
    assert len(missing) == len(configs) - stored and len(logged(log)) == evaluations
    assert runner.comparable(resumed) == runner.comparable(uninterrupted)
    assert len(store) == len(configs)


# --- sweeps record by record ---------------------------------------------------------------------


class SyntheticSweep:
    """Notebooks 01-03's setup in miniature: two experts of 12x8 matrices merged whole over a base."""

    @staticmethod
    def experts(spec):
        return {t: f"synthetic-sweep:{spec['seed']}:{t}" for t in spec["tasks"]}

    @staticmethod
    def evaluation(spec):
        return {"score": "exp(-|model - expert|^2 / 10)"}

    @staticmethod
    def prepare(spec):
        pass

    @staticmethod
    def build(spec):
        base, models = sweep_models(spec["seed"])
        return sweep.SweepSetup(
            name=spec["name"],
            seed=spec["seed"],
            base=base,
            models=models,
            evaluate=sweep_evaluate(models),
            expert_info=[{"task": t, "key": f"synthetic-sweep:{spec['seed']}:{t}"} for t in models],
        )


def sweep_models(seed):
    g = torch.Generator().manual_seed(seed)
    base = {f"layer{i}.weight": torch.randn(12, 8, generator=g) for i in range(3)}
    models = {
        t: {k: v + (0.5 + i) * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for i, t in enumerate(["x", "y"])
    }
    return base, models


def sweep_evaluate(models):
    def evaluate(sd):
        return {
            t: {"accuracy": float(torch.exp(-sum(((sd[k] - m[k]) ** 2).sum() for k in m) / 10))}
            for t, m in models.items()
        }

    return evaluate


def test_a_sweep_through_run_grid_equals_sweep_seed(tmp_path):
    spec = runner.pool_spec(["x", "y"], seed=3, smoke=True, name="sweep", source=f"{__name__}:SyntheticSweep")
    runs = (
        sweep.snr_runs(["snr_winner", "snr_low_a"], ["mp"], [0.0, 0.5, 1.0])
        + sweep.threshold_runs(["snr_winner"], "mp", [1.0])
        + sweep.reference_runs(["average", "ties"])
    )
    configs = runner.sweep_grid(spec, runs, merge_kwargs={"exclude": "layer2"})
    records = runner.run_grid(configs, store=RecordStore(tmp_path / "records.sqlite"), progress=False)
    base, models = sweep_models(3)
    reference = sweep.sweep_seed(base, models, sweep_evaluate(models), runs, seed=3, progress=False, exclude="layer2")
    assert runner.comparable(records) == runner.comparable(reference)
    assert runner.describe(configs[1]) == f"sweep seed 3: {runs[0].label()}"
    assert {r["run"] for r in records} >= {r.label() for r in runs}


def test_the_papers_effects_are_their_tables_differences():
    from lib import papers

    star = papers.star_effects({"text": 3}, ["ties", "drm_h"], [20])
    assert [e.what for e in star] == [
        "STAR beats ties (3 tasks)",
        "STAR beats drm_h (3 tasks)",
        "STAR beats the pre-trained body (all sizes)",
        "rescaling helps at eta=20 (all sizes)",
    ]
    assert star[0].paper == round(papers.STAR_TABLE2["star"] - papers.STAR_TABLE2["ties"], 2) and star[0].in_paper
    assert star[1].paper is None and not star[1].in_paper and star[2].worse == "base"
    assert star[3].worse == pool.canonical_run("star", eta=20, rescale=False).label()
    # a Table 2 method counts as the paper's only at the paper's hyperparameters (TA, TA+DARE: alpha 0.125)
    refs = ["task_arithmetic", ("task_arithmetic", {"lam": 0.125}), "dare", ("dare", {"lam": 0.125, "keep": 0.3})]
    by = {e.what: e for e in papers.star_effects({"text": 7}, refs, [])}
    t2 = papers.STAR_TABLE2
    for ours_only, papers_own, method in [
        ("task_arithmetic", "task_arithmetic(lam=0.125)", "task_arithmetic"),
        ("dare", "dare(keep=0.3, lam=0.125)", "dare"),
    ]:
        mine, theirs = by[f"STAR beats {ours_only} (7 tasks)"], by[f"STAR beats {papers_own} (7 tasks)"]
        assert mine.paper is None and not mine.in_paper and "ours only" in mine.note
        assert theirs.in_paper and theirs.paper == round(t2["star"] - t2[method], 2) and theirs.note == ""
    assert (
        by["STAR beats dare(keep=0.3, lam=0.125) (7 tasks)"].worse
        == pool.canonical_run("dare", keep=0.3, lam=0.125).label()
    )
    # p = 0.7 is keep = 0.3, whichever name the configuration uses; another rate is not the paper's
    assert papers.star_paper_setting(pool.canonical_run("dare", p=0.7, lam=0.125))
    assert not papers.star_paper_setting(pool.canonical_run("dare", keep=0.3, lam=0.125, then="ties"))

    drm = {v: pool.canonical_run(f"drm_{v}") for v in ("h", "v")}
    plain = {v: pool.canonical_run(f"drm_{v}", renorm=False) for v in ("h", "v")}
    compare = [drm["h"], drm["v"], pool.canonical_run("ties"), pool.canonical_run("star")]
    names = {r.label(): pool.short_name(r) for r in compare}
    effects = papers.drm_effects({"vision/x": 2}, {"vision/x": "vision"}, compare, names, drm, plain)
    by_claim = {e.what: e for e in effects}
    table = papers.DRM_TABLE1["vision"]
    assert by_claim["DRM-H beats ties (2 tasks)"].paper == round(table["drm_h"] - table["ties"], 2)
    assert by_claim["DRM-H beats star (2 tasks)"].paper is None
    with_renorm, without = papers.DRM_TABLE3["vision"]
    assert by_claim["renormalisation helps DRM-H (all sizes)"].paper == round(with_renorm - without, 2)
    assert len(effects) == len(compare) - 1 + 3
    # Table 8 with the individually pruned runs; the STAR paper's settings are not rows of DRM's Table 1
    per_task = {v: pool.canonical_run(f"drm_{v}", prune="per_task") for v in ("h", "v")}
    star_ta = pool.canonical_run("task_arithmetic", lam=0.125)
    compare += [pool.canonical_run("task_arithmetic"), star_ta]
    names = {r.label(): pool.short_name(r) for r in compare}
    by_claim = {
        e.what: e for e in papers.drm_effects({"text": 7}, {"text": "text"}, compare, names, drm, plain, per_task)
    }
    joint, individual = papers.DRM_TABLE8["text"]["drm_v"]
    claim = by_claim["joint pruning helps DRM-V (all sizes)"]
    assert claim.paper == round(joint - individual, 2) == 0.9 and claim.worse == per_task["v"].label()
    assert claim.better == drm["v"].label() and claim.in_paper
    assert by_claim["DRM-H beats task_arithmetic (7 tasks)"].in_paper
    ours = by_claim["DRM-H beats task_arithmetic(lam=0.125) (7 tasks)"]
    assert ours.paper is None and not ours.in_paper and "STAR paper" in ours.note
    # ViT's DRM-V scores 72.8 with either pruning: no direction to agree with, so the claim is ours only
    vision = {
        e.what: e
        for e in papers.drm_effects({"vision/x": 2}, {"vision/x": "vision"}, compare, names, drm, plain, per_task)
    }
    assert papers.DRM_TABLE8["vision"]["drm_v"][0] == papers.DRM_TABLE8["vision"]["drm_v"][1]
    tied = vision["joint pruning helps DRM-V (all sizes)"]
    assert tied.paper is None and not tied.in_paper and "no difference to agree with" in tied.source
    assert vision["joint pruning helps DRM-H (all sizes)"].in_paper


def test_the_lora_claims_take_each_papers_lora_table_and_only_its_own_baselines():
    from lib import lora_pool, papers

    star = pool.canonical_run("star")
    compare = [star] + [pool.canonical_run(m, **hp) for m, hp in lora_pool.REFERENCES]
    names = {r.label(): pool.short_name(r) for r in compare}
    claims = papers.lora_effects(7, compare, names, [10, 40])
    assert set(claims) == {"STAR", "DRM"}
    by = {p: {c.what: c for c in cs} for p, cs in claims.items()}
    t2 = papers.STAR_TABLE2
    # STAR's TA is alpha = 0.125: that row carries the paper's number, lam = 1 is ours only
    assert by["STAR"]["STAR beats task_arithmetic(lam=0.125) (7 tasks)"].paper == round(
        t2["star"] - t2["task_arithmetic"], 2
    )
    lam1 = by["STAR"]["STAR beats task_arithmetic (7 tasks)"]
    assert lam1.paper is None and not lam1.in_paper and "alpha=0.125" in lam1.note
    assert by["STAR"]["STAR beats ties (7 tasks)"].paper == round(t2["star"] - t2["ties"], 2)
    # TA+DARE likewise: alpha = 0.125, p = 0.7 is the paper's; drop 0.9 at lam = 1 is ours only
    assert by["STAR"]["STAR beats dare(keep=0.3, lam=0.125) (7 tasks)"].paper == round(t2["star"] - t2["dare"], 2)
    assert not by["STAR"]["STAR beats dare (7 tasks)"].in_paper
    assert not any("renorm=False" in c for c in by["STAR"])  # DRM's ablation runs are not STAR's baselines
    assert all(c.pools == ("text-lora",) for cs in claims.values() for c in cs)
    assert (
        by["STAR"]["rescaling helps at eta=10 (all sizes)"].worse
        == pool.canonical_run("star", eta=10, rescale=False).label()
    )
    # DRM's from its LoRA Llama table, DRM-V included; STAR is not in that paper
    lt = papers.DRM_LORA_TABLE2
    assert by["DRM"]["DRM-H beats drm_v (7 tasks)"].paper == round(lt["drm_h"] - lt["drm_v"], 2)
    assert by["DRM"]["DRM-H beats average (7 tasks)"].paper == round(lt["drm_h"] - lt["average"], 2)
    assert by["DRM"]["DRM-H beats star (7 tasks)"].paper is None
    for star_setting in ("task_arithmetic(lam=0.125)", "dare(keep=0.3, lam=0.125)"):  # STAR's rows, not DRM's
        claim = by["DRM"][f"DRM-H beats {star_setting} (7 tasks)"]
        assert claim.paper is None and not claim.in_paper and "STAR paper" in claim.note
    assert by["DRM"]["DRM-H beats dare (7 tasks)"].in_paper
    renorm = by["DRM"]["renormalisation helps DRM-H (all sizes)"]
    assert renorm.paper == round(papers.DRM_LORA_TABLE3[0] - papers.DRM_LORA_TABLE3[1], 2)
    assert renorm.worse == pool.canonical_run("drm_h", renorm=False).label()
    assert not any(c.better == c.worse for cs in claims.values() for c in cs)
    with pytest.raises(ValueError, match="no drm_h"):
        papers.lora_effects(7, compare[:6], names, [10])


def test_a_notebook_grid_is_unpacked_by_name_and_smoke_replaces_only_its_own_parameters():
    from lib import configs

    for notebook, smoke in configs.SMOKE.items():
        assert set(smoke) <= set(configs.FULL[notebook]), notebook
    names = " ".join(reversed(list(configs.FULL["04_star"])))
    assert configs.values("04_star", names, smoke=True)[-1] == [0]  # SEEDS, asked for last
    assert configs.values("04_star", names, smoke=False)[-1] == [0, 1, 2]
    with pytest.raises(ValueError, match="the notebook asks for"):
        configs.values("04_star", "SEEDS POOLS", smoke=False)
    with pytest.raises(ValueError, match="no grid for notebook"):
        configs.grid("99_nothing", smoke=False)
    configs.grid("04_star", smoke=False)["SEEDS"].append(9)  # a notebook changing its copy changes nothing here
    assert configs.grid("04_star", smoke=False)["SEEDS"] == [0, 1, 2]
