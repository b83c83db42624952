"""The expert-pool runner of notebooks 04-06 (lib.pool), its diagnostics and its figures, with tiny
state dicts and a fake evaluation (nothing here trains or loads a model)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from lib import pool
from lib.claims import Claim
from lib.merge import drm
from lib.merge.star import kept_rank
from lib.merge.ties import trim_topk


def body(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0.weight": scale * torch.randn(8, 6, generator=g),
        "layer.0.bias": scale * torch.randn(8, generator=g),
        "conv.weight": scale * torch.randn(4, 2, 3, 3, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def distance(a, b) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).double().square().sum()) for k in a if a[k].is_floating_point()))


def fake_pool(tasks=("a", "b", "c"), *, seed=0, name="fake") -> pool.Pool:
    base = body(0)
    bodies = {
        t: {k: v + 0.3 * body(10 * seed + i + 1)[k] if v.is_floating_point() else v for k, v in base.items()}
        for i, t in enumerate(tasks)
    }
    return pool.Pool(name=name, kind="text", seed=seed, smoke=True, base=base, bodies=bodies, heads=bodies)


class FakeEvaluateFor:
    """Task ``t`` scores ``0.5 + 0.5 exp(-|body - expert_t|)``: 1 for its own expert, less the
    further a merge moves from it. Counts the bodies actually scored."""

    def __init__(self, p: pool.Pool):
        self.pool, self.calls = p, 0

    def __call__(self, subset):
        def evaluate(sd):
            self.calls += 1
            return {
                t: {"accuracy": 0.5 + 0.5 * math.exp(-distance(sd, self.pool.bodies[t])), "f1": 0.3} for t in subset
            }

        return evaluate


def run_fake(seeds=(0, 1), runs=None, sizes=(2, 3), max_subsets=2, name="fake"):
    runs = runs or [
        pool.canonical_run("average"),
        pool.canonical_run("star", eta=40),
        pool.canonical_run("star", eta=100, rescale=True),
        pool.canonical_run("star", eta=100, rescale=False),
    ]
    records = []
    for seed in seeds:
        p = fake_pool(seed=seed, name=name)
        runner = pool.PoolRunner(p, FakeEvaluateFor(p), progress=False)
        records += runner.alone() + runner.run(
            pool.subset_plan(p.tasks, sizes, max_subsets=max_subsets, seed=seed), runs
        )
    return records


# --- subsets -----------------------------------------------------------------------------------


def test_task_subsets_are_all_combinations_when_few():
    assert pool.task_subsets("abcd", 3, max_subsets=10) == list(itertools.combinations("abcd", 3))


def test_task_subsets_draw_distinct_combinations_deterministically():
    tasks = ["sst2", "cola", "emotion", "trec", "mrpc", "rte", "rotten_tomatoes"]
    drawn = pool.task_subsets(tasks, 3, max_subsets=10, seed=0)
    assert len(drawn) == 10 and len(set(drawn)) == 10
    assert all(len(s) == 3 and set(s) <= set(tasks) for s in drawn)
    assert drawn == pool.task_subsets(tasks, 3, max_subsets=10, seed=0), "the same seed must give the same subsets"
    assert drawn != pool.task_subsets(tasks, 3, max_subsets=10, seed=1), "another seed should draw other subsets"
    assert pool.task_subsets(tasks, 7, max_subsets=10) == [tuple(tasks)]


@pytest.mark.parametrize(
    "size, max_subsets, message", [(1, 10, "between 2 and the 3"), (4, 10, "between 2 and the 3"), (2, 0, "at least 1")]
)
def test_task_subsets_refuse_impossible_requests(size, max_subsets, message):
    with pytest.raises(ValueError, match=message):
        pool.task_subsets("abc", size, max_subsets=max_subsets)


def test_subset_plan_skips_sizes_the_pool_cannot_fill():
    assert pool.subset_plan("ab", [2, 3, 7]) == [("a", "b")]
    assert [len(s) for s in pool.subset_plan("abcd", [3, 2], max_subsets=2)] == [2, 2, 3, 3]


def test_canonical_runs_spell_out_defaults_and_short_names_show_changes():
    run = pool.canonical_run("star", eta=10)
    assert run.hparams() == {"eta": 10, "rescale": True, "lam": 1.0}
    assert pool.canonical_run("star").label() == "star(eta=40, rescale=True, lam=1.0)"
    assert pool.short_name(run) == "star(eta=10)" and pool.short_name(pool.canonical_run("drm_h")) == "drm_h"
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        pool.canonical_run("star", density=0.2)


# --- the runner and the scores ------------------------------------------------------------------


def test_runner_records_experts_base_and_merges_with_their_hyperparameters():
    records = run_fake(seeds=(0,), max_subsets=1)
    df = pd.DataFrame(records)
    experts = df[df.method == "expert"]
    assert sorted(experts.task.unique()) == ["a", "b", "c"] and set(experts["size"]) == {1}
    assert set(df[df.method == "base"].task) == {"a", "b", "c"}, "the base is scored on every task"
    merged = df[df.model == "merged"]
    assert set(merged.subset) == {"a+b", "a+b+c"} and set(merged["size"]) == {2, 3}
    star = merged[merged.method == "star"]
    assert {h["eta"] for h in star.hparams} == {40, 100} and all("rescale" in h for h in star.hparams)
    assert all(r["kind"] == "text" and r["pool"] == "fake" for r in records)


def test_runner_scores_identical_bodies_once_per_subset():
    p = fake_pool()
    evaluate_for = FakeEvaluateFor(p)
    runner = pool.PoolRunner(p, evaluate_for, progress=False)
    subsets = [("a", "b")]
    runner.run(subsets, [pool.canonical_run("average")])
    again = runner.run(subsets, [pool.canonical_run("average"), pool.canonical_run("task_arithmetic", lam=0.5)])
    # a second sweep asking for the same merge reuses the first one's score; task arithmetic with
    # lam = 1/2 of two experts is their average up to rounding, which the fingerprint may or may not see
    assert pd.DataFrame(again).drop_duplicates("run").reused.iloc[0]
    assert evaluate_for.calls <= 2


def test_normalized_scores_divide_by_the_expert_of_the_same_seed_and_task():
    records = run_fake()
    t = pool.task_scores(records)
    assert set(t.method) == {"average", "star", "base"}
    assert np.allclose(t.normalized, t.value / t.expert)
    experts = {
        (r["seed"], r["task"]): r["value"] for r in records if r["method"] == "expert" and r["metric"] == "accuracy"
    }
    row = t[(t.method == "average") & (t.seed == 1) & (t.task == "b")].iloc[0]
    assert row.expert == experts[(1, "b")] == pytest.approx(1.0)
    assert (t.normalized[t.method != "base"] < 1).all() and "hp_eta" in t.columns


def test_normalized_scores_need_the_experts():
    records = [r for r in run_fake(seeds=(0,)) if not (r["method"] == "expert" and r["task"] == "b")]
    with pytest.raises(ValueError, match="no accuracy of the 'b' expert .*PoolRunner\\.alone"):
        pool.task_scores(records)


def test_normalized_scores_refuse_an_expert_scoring_zero():
    records = [{**r, "value": 0.0} if r["method"] == "expert" else r for r in run_fake(seeds=(0,))]
    with pytest.raises(ValueError, match="normalized scores are undefined"):
        pool.task_scores(records)


def test_subset_scores_average_tasks_and_add_the_base_per_subset():
    records = run_fake(seeds=(0,))
    s = pool.subset_scores(records)
    t = pool.task_scores(records)
    row = s[(s.run == "average(weights=None)") & (s.subset == "a+b+c")].iloc[0]
    expected = t[(t.method == "average") & (t.subset == "a+b+c")].normalized.mean()
    assert row.normalized == pytest.approx(expected) and row.tasks == 3
    base = s[(s.run == "base") & (s.subset == "a+b")].iloc[0]
    assert base.normalized == pytest.approx(t[(t.method == "base") & t.task.isin(["a", "b"])].normalized.mean())


def test_size_summary_is_mean_and_std_over_seeds_of_subset_means():
    records = run_fake(seeds=(0, 1, 2))
    s = pool.subset_scores(records)
    summary = pool.size_summary(records)
    row = summary[(summary.run == "star(eta=40, rescale=True, lam=1.0)") & (summary["size"] == 2)].iloc[0]
    per_seed = s[(s.run == "star(eta=40, rescale=True, lam=1.0)") & (s["size"] == 2)].groupby("seed").normalized.mean()
    assert row["mean"] == pytest.approx(per_seed.mean()) and row["std"] == pytest.approx(per_seed.std(ddof=1))
    assert row["n"] == 3 and row["subsets"] == 2 and row.hp_eta == 40


def test_best_setting_takes_the_argmax_and_the_smallest_value_on_ties():
    records = run_fake(seeds=(0,))
    best = pool.best_setting(records, "star", "eta", rescale=True)
    s = pool.select(pool.subset_scores(records), "star", rescale=True)
    for row in best.itertuples():
        scores = s[s.subset == row.subset].set_index("hp_eta").normalized
        assert row.normalized == pytest.approx(scores.max())
        assert row.best == min(scores.index[scores == scores.max()])
    with pytest.raises(ValueError, match="no 'dare' runs"):
        pool.best_setting(records, "dare", "p")


def test_select_names_the_hyperparameters_that_exist():
    with pytest.raises(ValueError, match=r"no hyperparameter 'density'.*\['eta', 'rescale', 'lam'\]"):
        pool.select(pool.subset_scores(run_fake(seeds=(0,))), "star", density=0.2)


def test_paired_differences_and_effects_compare_on_the_same_subsets():
    records = run_fake(seeds=(0, 1, 2))
    d = pool.paired_differences(records, "star(eta=40, rescale=True, lam=1.0)", "base")
    assert len(d) == 3 * 3 and (d.difference > 0).all(), "every merge here lies nearer the experts than the base"
    effects = [
        Claim("merging beats the base", 5.0, "fake", better="star(eta=40, rescale=True, lam=1.0)", worse="base"),
        Claim("the base beats merging", None, "fake", better="base", worse="average(weights=None)", sizes=(3,)),
        Claim("one seed only", None, "fake", better="average(weights=None)", worse="base", pools=("other",)),
    ]
    table = pool.compare_effects(records, effects).set_index("claim")
    assert table.loc["merging beats the base", "direction"] == "same"
    assert table.loc["merging beats the base", "resolved"] and table.loc["merging beats the base", "seeds"] == 3
    assert table.loc["merging beats the base", "agrees"] == "yes"
    per_seed = d.groupby("seed").difference.mean()
    assert table.loc["merging beats the base", "ours"] == pytest.approx(per_seed.mean())
    # a paired Student-t interval over the seeds' means, at the stated level
    low, high = stats.t.interval(0.95, 2, loc=per_seed.mean(), scale=per_seed.std(ddof=1) / math.sqrt(3))
    assert table.loc["merging beats the base", ["ci_low", "ci_high"]].tolist() == pytest.approx([low, high])
    assert table.loc["merging beats the base", "level"] == 0.95
    assert table.loc["the base beats merging", "direction"] == "opposite"
    assert table.loc["the base beats merging", "wins"] == 0 and table.loc["the base beats merging", "subsets"] == 3
    assert table.loc["the base beats merging", "won"] == 0
    assert table.loc["one seed only", "direction"] == "not measured"
    assert table.loc["one seed only", "agrees"] == "–"
    with pytest.raises(ValueError, match="no scores of \\['dare\\(\\)'\\]"):
        pool.paired_differences(records, "dare()", "base")


def test_a_win_over_a_baseline_at_chance_is_not_agreement():
    records = run_fake(seeds=(0, 1, 2))
    worse = "average(weights=None)"
    s = pool.subset_scores(records)
    average = s[s.run == worse].normalized.mean()
    effects = [
        Claim("STAR beats average", 1.0, "fake", better="star(eta=40, rescale=True, lam=1.0)", worse=worse),
        Claim(
            "ours only",
            None,
            "not in the paper",
            better="star(eta=40, rescale=True, lam=1.0)",
            worse=worse,
            in_paper=False,
        ),
    ]
    # guessing scores what the average scores: the average has learned nothing
    experts = pool.task_scores(records).drop_duplicates("task").set_index("task").expert
    at_chance = {t: average * experts[t] for t in experts.index}
    table = pool.compare_effects(records, effects, chance=at_chance).set_index("claim")
    row = table.loc["STAR beats average"]
    assert row.baseline == "at chance" and row.agrees == "not counted"
    assert row.chance_score == pytest.approx(100 * average, abs=1.0) and row.worse_score == pytest.approx(
        100 * average, abs=1.0
    )
    assert table.loc["ours only", "agrees"] == "–"
    far_below = {t: 0.01 for t in experts.index}
    assert pool.compare_effects(records, effects[:1], chance=far_below).iloc[0].baseline == ""


def test_stored_effects_measure_the_same_table_again():
    records = run_fake(seeds=(0, 1, 2))
    effects = [
        Claim(
            "merging beats the base (3 tasks)",
            5.0,
            "fake",
            better="star(eta=40, rescale=True, lam=1.0)",
            worse="base",
            pools=("fake",),
            sizes=(3,),
            note="a note",
        ),
        Claim(
            "ours only", None, "not compared in the paper", better="average(weights=None)", worse="base", in_paper=False
        ),
    ]
    table = pool.compare_effects(records, effects)
    again = pool.compare_effects(records, pool.stored_effects(table.to_dict("records")))
    pd.testing.assert_frame_equal(table, again)
    # rows written before sizes and in_paper were stored say them in words
    old = [{k: v for k, v in r.items() if k not in ("sizes", "in_paper")} for r in table.to_dict("records")]
    assert pool.stored_effects(old) == effects


def test_trend_is_the_least_squares_slope():
    frame = pd.DataFrame({"size": [2, 2, 3, 4], "best": [70, 50, 40, 20]})
    t = pool.trend(frame, "size", "best")
    assert t["slope"] == pytest.approx(np.polyfit([2, 2, 3, 4], [70, 50, 40, 20], 1)[0]) and t["spearman"] < -0.9
    assert math.isnan(pool.trend(frame[frame["size"] == 2], "size", "best")["slope"])


def test_measured_rates_and_estimate_scale_with_examples_and_experts():
    records = run_fake(seeds=(0,))
    n_eval = {"a": 10, "b": 20, "c": 30}
    rates = pool.measured_rates(records, n_eval)
    assert set(rates["merge_s_per_expert"]) == {"text/average", "text/star"} and rates["merges"] == 3 * 4
    plan = pool.planned("fake", "text", [("a", "b")], [pool.canonical_run("star"), pool.canonical_run("ties")])
    est = pool.estimate_seconds(rates, plan, {"a": 100, "b": 200, "c": 300}, alone=[("text", ["a", "b"])])
    per_example = rates["eval_s_per_example"]["text"]
    ties_rate = np.mean(list(rates["merge_s_per_expert"].values()))  # not measured: the mean of the others
    expected_merge = 2 * rates["merge_s_per_expert"]["text/star"] + 2 * ties_rate
    assert est["merge_s"] == pytest.approx(expected_merge)
    assert est["eval_s"] == pytest.approx(per_example * (2 * 300 + 2 * 300))
    assert est["merges"] == 2 and est["task_evaluations"] == 4
    with pytest.raises(ValueError, match="no measured evaluation of a vision model"):
        pool.estimate_seconds(rates, pool.planned("v", "vision", [("a", "b")], [pool.canonical_run("star")]), n_eval)


def test_the_estimate_prices_a_sweep_grid_from_its_records_too():
    # lib.sweep's records: no pool, kind, size or subset; every model scored on every task
    def rec(method, model, run, **times):
        return [
            {
                "seed": 0,
                "method": method,
                "model": model,
                "run": run,
                "task": t,
                "metric": "accuracy",
                "value": 0.5,
                "prepass_s": 0.0,
                "merge_s": 0.0,
                "eval_s": 3.0,
                "reused": False,
                **times,
            }
            for t in ("sst2", "cola")
        ]

    records = (
        rec("base", "base", "base:base") + rec("expert", "sst2", "expert:sst2") + rec("expert", "cola", "expert:cola")
    )
    records += rec("average", "merged", "average()", merge_s=2.0, prepass_s=1.0) + rec(
        "ties", "merged", "ties()", merge_s=4.0
    )
    rates = pool.measured_rates(records, {"sst2": 10, "cola": 20})
    assert rates["merge_s_per_expert"] == {"text/average": 1.0, "text/ties": 2.0} and rates["prepass_s_per_seed"] == 1.0
    assert rates["eval_s_per_example"]["text"] == pytest.approx(2 * 3.0 / (2 * 30))
    plan = pool.planned(
        "", "text", [("sst2", "cola")], [pool.canonical_run("average")] * 3, alone=["expert", "expert", "base"]
    )
    est = pool.estimate_seconds(rates, plan, {"sst2": 100, "cola": 200})
    assert est["merges"] == 3 and est["merge_s"] == pytest.approx(3 * 1.0 * 2)  # the experts and the base merge nothing
    assert est["eval_s"] == pytest.approx(6 * 0.1 * 300) and est["total_s"] == pytest.approx(6 + 180 + 1.0)


def test_plan_grid_draws_the_subsets_the_run_will_merge():
    pools = {"text": ["sst2", "cola", "trec"], "vision/mnist_base": ["fashion_mnist", "kmnist"]}
    plan, alone = pool.plan_grid(
        pools,
        {"text": [2, 3], "vision": [2, 3]},
        max_subsets=1,
        seeds=[0, 1],
        runs=[pool.canonical_run("star"), pool.canonical_run("ties")],
    )
    text = [i for i in plan if i["pool"] == "text"]
    assert len(text) == 2 * 2 * 2 and len(plan) == len(text) + 2 * 2
    assert [i["tasks"] for i in text[:4:2]] == [
        list(s) for s in pool.subset_plan(pools["text"], [2, 3], max_subsets=1, seed=0)
    ]
    assert alone == [("text", pools["text"]), ("vision", pools["vision/mnist_base"])] * 2


def test_slopes_fit_points_per_extra_task():
    records = run_fake(seeds=(0, 1))
    table = pool.slopes(records, ["average(weights=None)"]).iloc[0]
    s = pool.subset_scores(records)
    a = s[s.run == "average(weights=None)"]
    assert table.slope == pytest.approx(np.polyfit(a["size"], 100 * a.normalized, 1)[0]) and table.points == len(a)


def test_pool_evaluator_refuses_tasks_outside_the_pool():
    with pytest.raises(ValueError, match=r"\['z'\] are not experts of pool 'fake'"):
        fake_pool().evaluator(["a", "z"])


def test_build_pool_checks_its_tasks():
    with pytest.raises(ValueError, match="at least two experts"):
        pool.build_pool(["sst2"], seed=0, smoke=True)
    with pytest.raises(ValueError, match="one kind"):
        pool.build_pool(["sst2", "mnist"], seed=0, smoke=True)
    with pytest.raises(ValueError, match="MNIST is the base"):
        pool.build_pool(["mnist", "kmnist"], seed=0, smoke=True, variant="mnist_base")


# --- inside the methods ---------------------------------------------------------------------------


def test_star_ranks_match_a_full_svd():
    p = fake_pool()
    etas = [10, 40, 100]
    rows = pool.star_ranks(p.base, p.bodies, etas)
    assert [(r["expert"], r["key"]) for r in rows[:2]] == [("a", "layer.0.weight"), ("a", "conv.weight")]
    for r in rows:
        tau = (p.bodies[r["expert"]][r["key"]] - p.base[r["key"]]).flatten(1).double()
        s = torch.linalg.svdvals(tau)
        assert (r["rows"], r["cols"]) == tuple(tau.shape) and r["nonzero"] == min(tau.shape)
        assert r["kept"] == [int(kept_rank(s, eta)) for eta in etas]
        assert r["kept"][-1] == r["nonzero"] and r["kept"] == sorted(r["kept"])


def test_star_ranks_count_a_dense_lora_delta_as_its_rank_not_its_round_off():
    # a rank-16 update of a float32 weight, stored dense (base + B A) as a LoRA expert's cache holds it:
    # the difference has hundreds of round-off singular values above 0 beside its 16 real ones
    g = torch.Generator().manual_seed(0)
    base = {"q.weight": torch.randn(384, 384, generator=g) * 0.05}
    delta = (torch.randn(384, 16, generator=g) @ torch.randn(16, 384, generator=g)) * 1e-4
    body = {"q.weight": base["q.weight"] + delta}
    (row,) = pool.star_ranks(base, {"lora": body}, [40, 100])
    tau = (body["q.weight"] - base["q.weight"]).double()
    assert int((torch.linalg.svdvals(tau) > 0).sum()) > 16  # what counting every value above 0 called rank
    assert row["nonzero"] == 16
    assert pool.numerical_rank(torch.zeros(4), 4, 4) == 0
    # at eta = 100 STAR keeps the round-off directions too: more than the rank, so the figure's fraction caps at 1
    assert row["kept"][1] > 16
    assert pool.kept_fraction([row["kept"]], [row["nonzero"]]).tolist() == [[row["kept"][0] / 16, 1.0]]
    assert pool.kept_fraction([[0, 0]], [0]).tolist() == [[0.0, 0.0]]


def split_v_reference(deltas, density):
    """DRM-H's split right singular vectors from a full SVD, and the fraction of each row that a
    per-task top-``density`` trim keeps with and without renormalisation."""
    n_tasks, m, n = deltas.shape
    joint = deltas.double().transpose(0, 1).reshape(m, n_tasks * n)
    u, s, vh = torch.linalg.svd(joint, full_matrices=False)
    rank = int((s > 1e-2 * s[0]).sum())
    blocks = vh[:rank].reshape(rank, n_tasks, n).transpose(0, 1)  # (N, r, n): rows v_{t,i}
    norms = torch.linalg.vector_norm(blocks, dim=-1, keepdim=True)
    kept = {
        renorm: (trim_topk(blocks / norms if renorm else blocks, density, batch_dims=1) != 0).double().mean(-1)
        for renorm in (True, False)
    }
    return s[:rank], norms[..., 0], kept


def test_drm_row_profile_matches_the_split_of_a_full_svd():
    g = torch.Generator().manual_seed(3)
    n_tasks, m, n = 3, 12, 10
    shared = torch.randn(m, 2, generator=g)
    deltas = torch.stack(
        [
            shared @ torch.randn(2, n, generator=g) * (t + 1) + 0.3 * torch.randn(m, n, generator=g)
            for t in range(n_tasks)
        ]
    )
    p = drm.row_profile(deltas, density=0.3, prune="per_task")  # the reference below trims task by task
    sigma, norms, kept = split_v_reference(deltas, 0.3)
    assert torch.allclose(p.singular_values, sigma, rtol=1e-8)
    assert torch.allclose(p.row_norms, norms, rtol=1e-6)
    assert torch.allclose(p.row_norms.square().sum(0), torch.ones(len(sigma), dtype=torch.float64), rtol=1e-8), (
        "each component's squared row norms are the tasks' shares of it and sum to 1"
    )
    for renorm in (True, False):
        assert torch.allclose(p.kept[renorm], kept[renorm])
    # renormalised, every task keeps its share of entries: ceil(0.3 * r * n) of r * n
    total = len(sigma) * n
    assert torch.allclose(
        p.kept[True].mean(-1), torch.full((n_tasks,), math.ceil(0.3 * total) / total, dtype=torch.float64)
    )
    full = drm.row_profile(deltas, density=1.0, prune="per_task")
    assert torch.allclose(full.kept_energy[False], torch.ones(n_tasks, dtype=torch.float64))


def test_drm_profile_without_renormalisation_zeroes_a_task_s_weak_rows():
    # task 0 owns component 1 (large), task 1 owns a weak share of it and all of component 2:
    # pruning the unnormalised rows of task 1 drops its small-norm row entirely
    g = torch.Generator().manual_seed(0)
    m, n = 16, 40
    a, b = torch.linalg.qr(torch.randn(m, 2, generator=g))[0].T
    x, y, z = torch.linalg.qr(torch.randn(n, 3, generator=g))[0].T
    d0 = 10 * torch.outer(a, x)
    d1 = 0.5 * torch.outer(a, y) + 3 * torch.outer(b, z)
    base = {"w": torch.zeros(m, n)}
    bodies = {"t0": {"w": d0}, "t1": {"w": d1}}
    prof = pool.drm_profile(base, bodies, "w", density=0.2)
    kept_plain, kept_renorm = np.array(prof["kept_plain"]), np.array(prof["kept_renorm"])
    assert kept_plain[1, 0] < 0.05 and kept_renorm[1, 0] > 0.1, (
        "task 1's row of the top component is pruned away without renormalisation but not with it"
    )
    summary = pd.DataFrame(pool.drm_pruning_summary(base, bodies, density=0.2, top=2))
    t1 = summary.set_index("task").loc["t1"]
    assert t1.zeroed_top_plain >= 1 and t1.zeroed_top_renorm == 0
    assert 0 < t1.energy_plain <= 1 and 0 < t1.energy_renorm <= 1
    with pytest.raises(ValueError, match="variant must be 'h'"):
        pool.drm_profile(base, bodies, "w", variant="x")


def test_a_frozen_summary_compares_the_old_runs_with_the_new_setting_only():
    from lib import grids

    # "before": DRM records without the prune hyperparameter; "now": the same runs pruned jointly and per task
    runs = [pool.canonical_run("drm_h", renorm=r) for r in (True, False)] + [pool.canonical_run("average")]
    before = run_fake(runs=runs, sizes=(2,))
    for r in before:
        r.get("hparams", {}).pop("prune", None)
    effects = [{"claim": "c", "pools": "fake", "ours": 1.0, "ci_low": 0.5, "ci_high": 1.5, "agrees": "yes"}]
    frozen = grids.frozen_summary(
        {"records": before, "effects": effects, "config": {"seeds": (0, 1)}}, ["drm_h"], source="test"
    )
    assert {r["method"] for r in frozen["summary"]} == {"drm_h"} and len(frozen["summary"]) == 2
    assert frozen["config"] == {"seeds": [0, 1]} and "prune" not in frozen["summary"][0]["hparams"]
    now = run_fake(
        runs=[pool.canonical_run("drm_h", renorm=r, prune=p) for r in (True, False) for p in ("joint", "per_task")],
        sizes=(2, 3),
    )
    changed = grids.changed_since(frozen, now, prune="joint")
    assert len(changed) == 2 and all("per_task" not in run for run in changed.run)
    summary = pool.size_summary(now).set_index(["size", "run"])
    for row in changed.to_dict("records"):
        assert row["size"] == 2  # the frozen runs had size 2 only
        assert row["now"] == pytest.approx(100 * summary.loc[(2, row["run"]), "mean"])
        assert row["change"] == pytest.approx(row["now"] - row["before"])
    # the fake experts do not depend on the prune setting: the same runs score the same before and now
    assert changed.change.abs().max() < 1e-9
    # seed 1's experts retrained (another score) and its merges moved with them: the change mixes the two, the
    # change over the seeds with the same experts (seed 0) is the method's alone
    experts = [{"pool": "fake", "seed": s, "task": t, "accuracy": 0.9} for s in (0, 1) for t in "abc"]
    frozen = grids.frozen_summary(
        {"records": before, "effects": effects, "config": {}, "experts": experts}, ["drm_h"], source="test"
    )
    assert set(frozen["summary"][0]["by_seed"]) == {"0", "1"}
    moved = [
        {**r, "value": r["value"] + 0.05}
        if r["seed"] == 1 and r["model"] == "merged" and r["metric"] == "accuracy"
        else r
        for r in now
    ]
    retrained = [{**e, "accuracy": 0.91} if e["seed"] == 1 and e["task"] == "a" else e for e in experts]
    changed = grids.changed_since(frozen, moved, experts=retrained, prune="joint")
    assert changed.same_seeds.tolist() == ["0", "0"] and changed.change_same.abs().max() < 1e-9
    assert changed.change.abs().min() > 0.1
    same = grids.changed_since(frozen, now, experts=experts, prune="joint")
    assert same.same_seeds.tolist() == ["0, 1", "0, 1"] and same.change_same.abs().max() < 1e-9
    assert "change_same" not in grids.changed_since(frozen, now, prune="joint")
    verdicts = grids.verdicts_since(frozen, [{**effects[0], "ours": -1.0, "agrees": "no"}])
    assert verdicts.flipped.tolist() == [True] and verdicts.ours_now.tolist() == [-1.0]
    assert grids.verdicts_since(frozen, []).empty


# --- figures: drawn from results dicts built with the fake pools -----------------------------------


@pytest.fixture
def figures_dir(tmp_path, monkeypatch):
    from lib import paths

    monkeypatch.setattr(paths, "FIGURES", tmp_path)
    return tmp_path / "smoke"


def fake_results(notebook: str, runs, config: dict) -> dict:
    records = run_fake(runs=runs, name="one") + run_fake(runs=runs, name="two", sizes=(2,))
    p = fake_pool()
    return {
        "notebook": notebook,
        "pools": {n: {"kind": "text", "tasks": list(p.tasks)} for n in ("one", "two")},
        "records": records,
        "config": config,
        "star_ranks": {
            "one": {"seed": 0, "etas": [10, 40, 100], "rows": pool.star_ranks(p.base, p.bodies, [10, 40, 100])}
        },
        "drm_rows": {n: pool.drm_profile(p.base, p.bodies, "layer.0.weight") for n in ("one", "two")},
    }


def test_star_figures_are_written_from_results(figures_dir):
    from lib.figures import f04_star

    runs = [pool.canonical_run("star", eta=e, rescale=r) for e in (10, 40, 100) for r in (True, False)]
    runs += [pool.canonical_run("average"), pool.canonical_run("ties")]
    compare = [{"run": r.label(), "name": pool.short_name(r)} for r in runs[2:3] + runs[-2:]]
    written = f04_star.draw(fake_results("04_star", runs, {"default_eta": 40, "compare": compare}), smoke=True)
    assert sorted(p.name for p in written) == [
        f"04_star_{n}.png" for n in ("best_eta", "eta_sweep", "methods", "ranks_one", "rescale")
    ]
    assert all(p.parent == figures_dir and p.stat().st_size > 1000 for p in written)


def test_drm_figures_are_written_from_results(figures_dir):
    from lib.figures import f05_drm

    runs = [pool.canonical_run(m, renorm=r) for m in ("drm_h", "drm_v") for r in (True, False)]
    runs += [pool.canonical_run(m, density=d) for m in ("drm_h", "ties") for d in (0.1, 1.0)]
    runs += [pool.canonical_run("average")]
    config = {
        "default_density": 0.2,
        "density_sizes": {"text": [2]},
        "compare": [{"run": r.label(), "name": pool.short_name(r)} for r in runs[::2]],
        "density_methods": [
            {"method": "drm_h", "name": "DRM-H", "fixed": {"renorm": True}},
            {"method": "ties", "name": "TIES"},
        ],
    }
    written = f05_drm.draw(fake_results("05_drm", runs, config), smoke=True)
    assert sorted(p.name for p in written) == [f"05_drm_{n}.png" for n in ("density", "methods", "renorm", "rows")]
    assert all(p.stat().st_size > 1000 for p in written)


def test_renorm_figure_draws_joint_pruning_only(figures_dir, monkeypatch):
    # the per-task pruning ablation (Table 8) shares renorm and density with the renormalisation
    # series: without the prune filter its records would be averaged into the joint ones
    from lib.figures import f05_drm

    runs = [
        pool.canonical_run(m, renorm=r, prune=p)
        for m in ("drm_h", "drm_v")
        for r in (True, False)
        for p in ("joint", "per_task")
    ]
    results = fake_results("05_drm", runs, {"default_density": 0.2})
    drawn, select = [], pool.select
    monkeypatch.setattr(pool, "select", lambda *a, **k: drawn.append(select(*a, **k)) or drawn[-1])
    f05_drm.draw_renorm(results, smoke=True)
    assert len(drawn) == 8 and all(len(d) and set(d.hp_prune) == {"joint"} for d in drawn)
    # records published before the prune hyperparameter existed are drawn as they are
    for r in results["records"]:
        r.get("hparams", {}).pop("prune", None)
    drawn.clear()
    f05_drm.draw_renorm(results, smoke=True)
    assert len(drawn) == 8 and all(len(d) for d in drawn)


@pytest.mark.parametrize("module", ["f04_star", "f05_drm"])
def test_each_notebook_module_names_its_notebook(module):
    import importlib

    assert importlib.import_module(f"lib.figures.{module}").NOTEBOOK == module[1:]
