"""The sweep runner of notebooks 01-03, with tiny state dicts, a fake merge and a fake
evaluation (so nothing here needs a trained model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lib import stats, sweep
from lib.claims import Claim


def tiny(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "body.weight": scale * torch.randn(6, 4, generator=g),
        "body.bias": scale * torch.randn(6, generator=g),
        "classifier.weight": scale * torch.randn(2, 6, generator=g),
        "bn.num_batches_tracked": torch.tensor(3),
    }


class CountingEvaluate:
    """A fake evaluation: two tasks, a score that depends on every float tensor, and a count of
    calls so that the cache can be checked."""

    def __init__(self):
        self.calls = 0

    def __call__(self, sd):
        self.calls += 1
        total = float(sum(v.double().sum() for v in sd.values() if v.is_floating_point()))
        return {"a": {"accuracy": total}, "b": {"accuracy": -total, "mcc": 2 * total}}


def fake_merge(method, base, experts, *, top=None, snr_method=None, threshold=None, **kwargs):
    """A merge whose result depends on ``top`` but not on ``snr_method`` at top 0 and 1, like
    the real SNR strategies: both definitions agree when all or no layers are high-SNR."""
    shift = float(top or 0.0) + (0.01 if snr_method == "report_text" and top not in (0.0, 1.0) else 0.0)
    return {k: (v + shift if v.is_floating_point() else v) for k, v in experts[0].items()}


def test_snr_runs_cover_the_grid_grouped_by_prepass():
    runs = sweep.snr_runs(["snr_winner", "snr_max"], ["mp", "report_text"], np.linspace(0, 1, 11))
    assert len(runs) == 2 * 2 * 11
    assert runs[0] == sweep.Run("snr_winner", snr_method="mp", top=0.0)
    assert [r.top for r in runs[:11]] == list(sweep.TOPS), "linspace noise (0.30000000000000004) must be rounded"
    # runs that share (snr_method, strategy) are consecutive, so a shared SNR prepass could serve them
    keys = [(r.snr_method, r.method) for r in runs]
    assert keys == sorted(keys, key=keys.index)


def test_top_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"top .* \[0, 1\], got 1.5"):
        sweep.snr_runs(["snr_winner"], ["mp"], [1.5])


def test_run_hparams_leave_unset_coordinates_to_the_method():
    assert sweep.Run("average").hparams() == {}
    assert sweep.Run("snr_max", snr_method="max_median", threshold=5.0).hparams() == {
        "snr_method": "max_median",
        "threshold": 5.0,
    }
    assert sweep.Run("ties", extra={"density": 0.2}).label() == "ties(density=0.2)"
    th = sweep.threshold_runs(["snr_low_a", "snr_low_b"], "max_median", [3, 25])
    assert [(r.method, r.threshold) for r in th] == [
        ("snr_low_a", 3.0),
        ("snr_low_a", 25.0),
        ("snr_low_b", 3.0),
        ("snr_low_b", 25.0),
    ]


def test_fingerprint_sees_every_change_and_nothing_else():
    sd = tiny(0)
    same = {k: v.clone() for k, v in reversed(list(sd.items()))}
    assert sweep.fingerprint(sd) == sweep.fingerprint(same), "key order and storage must not matter"
    changed = {**sd, "body.weight": sd["body.weight"].clone()}
    changed["body.weight"][3, 2] += 1e-6
    assert sweep.fingerprint(changed) != sweep.fingerprint(sd)
    assert sweep.fingerprint({**sd, "body.bias": sd["body.bias"].double()}) != sweep.fingerprint(sd)
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}
    assert len(sweep.fingerprint(half)) == 32
    transposed = {**sd, "body.weight": sd["body.weight"].t().contiguous().t()}  # non-contiguous view of equal values
    assert sweep.fingerprint(transposed) == sweep.fingerprint(sd)


def test_run_sweep_evaluates_identical_models_once():
    experts = [tiny(1), tiny(2)]
    evaluate = CountingEvaluate()
    runs = sweep.snr_runs(["snr_winner"], ["mp", "report_text"], [0.0, 0.5, 1.0])
    recs = sweep.run_sweep(tiny(0), experts, evaluate, runs, seed=7, merge_fn=fake_merge, progress=False)
    # top 0 and 1 give the same model under both SNR definitions: 6 runs, 4 distinct models
    assert evaluate.calls == 4
    assert len(recs) == len(runs) * 3, "one record per run, task and metric"
    df = sweep.records_frame(recs)
    assert set(df["seed"]) == {7}
    reused = df.drop_duplicates("run").set_index("run")["reused"]
    assert reused.sum() == 2 and not reused["snr_winner(snr_method=mp, top=0.0)"]
    assert reused["snr_winner(snr_method=report_text, top=1.0)"]
    # a reused evaluation gives exactly the numbers of the first one
    v = df[(df.task == "a") & (df.top == 1.0)]["value"]
    assert v.nunique() == 1


def test_run_sweep_passes_merge_options_and_reports_the_failing_run():
    seen = []

    def recording_merge(method, base, experts, **kw):
        seen.append(kw)
        if kw.get("top") == 0.5:
            raise ValueError("boom")
        return experts[0]

    runs = sweep.snr_runs(["snr_max"], ["mp"], [0.0, 0.5])
    with pytest.raises(RuntimeError, match=r"snr_max\(snr_method=mp, top=0.5\) failed \(seed 3\): boom"):
        sweep.run_sweep(
            tiny(0),
            [tiny(1)],
            CountingEvaluate(),
            runs,
            seed=3,
            merge_fn=recording_merge,
            share_prepass=False,
            progress=False,
            exclude="classifier",
        )
    assert seen[0] == {"exclude": "classifier", "snr_method": "mp", "top": 0.0}


def test_run_sweep_with_the_real_average_merge():
    experts = [tiny(1), tiny(2)]
    recs = sweep.run_sweep(None, experts, CountingEvaluate(), sweep.reference_runs(["average"]), seed=0, progress=False)
    expected = sum(
        float((experts[0][k].double() + experts[1][k].double()).sum()) / 2
        for k in experts[0]
        if experts[0][k].is_floating_point()
    )
    got = [r["value"] for r in recs if r["task"] == "a"]
    assert got == [pytest.approx(expected, rel=1e-6)]
    assert recs[0]["top"] is None and recs[0]["model"] == "merged"


def test_evaluate_must_return_tasks_of_metrics():
    with pytest.raises(TypeError, match=r"\{task: \{metric: value\}\}"):
        sweep.evaluate_models({"x": tiny(0)}, lambda sd: {"accuracy": 0.5}, seed=0)


def test_experts_alone_share_the_cache_with_merges():
    experts = {"a": tiny(1), "b": tiny(2)}
    evaluate = CountingEvaluate()
    cache = sweep.CachedEvaluate(evaluate)
    alone = sweep.evaluate_models(experts, evaluate, seed=0, cache=cache)
    # a merge that returns expert 0 unchanged is recognised as the expert evaluated above
    merged = sweep.run_sweep(
        None,
        list(experts.values()),
        evaluate,
        [sweep.Run("x")],
        seed=0,
        merge_fn=lambda m, b, e, **kw: e[0],
        cache=cache,
        share_prepass=False,
        progress=False,
    )
    assert evaluate.calls == 2
    assert {r["run"] for r in alone} == {"expert:a", "expert:b"}
    assert all(r["reused"] for r in merged)


def test_summarize_gives_mean_and_sample_std_over_seeds():
    runs = sweep.snr_runs(["snr_winner"], ["mp"], [0.0, 0.5]) + sweep.reference_runs(["average"])
    recs = []
    for seed in range(3):
        recs += sweep.run_sweep(
            tiny(0),
            [tiny(10 + seed), tiny(20 + seed)],
            CountingEvaluate(),
            runs,
            seed=seed,
            merge_fn=fake_merge,
            progress=False,
        )
    s = sweep.summarize(recs)
    assert len(s) == 3 * 3, "three models x three (task, metric) pairs"
    assert (s["n"] == 3).all()
    df = sweep.records_frame(recs)
    sel = df[(df.top == 0.5) & (df.task == "b") & (df.metric == "mcc")]["value"].to_numpy()
    row = s[(s.top == 0.5) & (s.task == "b") & (s.metric == "mcc")].iloc[0]
    assert row["mean"] == pytest.approx(sel.mean())
    assert row["std"] == pytest.approx(sel.std(ddof=1))
    ref = s[s.method == "average"]
    assert len(ref) == 3 and ref["top"].isna().all(), "a reference has no top and must survive the grouping"


def test_summarize_of_one_seed_has_no_std():
    recs = sweep.run_sweep(None, [tiny(1)], CountingEvaluate(), [sweep.Run("average")], seed=0, progress=False)
    assert sweep.summarize(recs)["std"].map(math.isnan).all()


def test_timing_counts_each_model_once():
    runs = sweep.snr_runs(["snr_winner"], ["mp", "report_text"], [0.0, 0.5, 1.0])
    recs = sweep.run_sweep(tiny(0), [tiny(1)], CountingEvaluate(), runs, seed=0, merge_fn=fake_merge, progress=False)
    t = sweep.timing(recs)
    assert (t["models"], t["merges"], t["evaluations"], t["evaluations_reused"]) == (6, 6, 4, 2)
    assert min(t["merge_s"], t["eval_s"], t["prepass_s"]) >= 0


def test_versions_name_the_device_and_libraries():
    v = sweep.versions(["numpy", "surely-not-a-package"])
    assert v["numpy"] == np.__version__ and v["torch"] == torch.__version__
    assert v["surely-not-a-package"] == "not installed"
    assert v["device"].split(":")[0] in {"cpu", "cuda", "mps"}


# --- figures: drawn from a results dict built by the runner with fakes --------------------------


def fake_results(notebook: str) -> dict:
    runs = (
        sweep.snr_runs(["snr_winner", "snr_low_b"], ["mp", "report_text"], [0.0, 0.5, 1.0])
        + sweep.threshold_runs(["snr_low_a"], "max_median", [3, 25])
        + sweep.reference_runs(["average"])
    )
    records = []
    for seed in range(2):
        experts = {"a": tiny(10 + seed), "b": tiny(20 + seed)}
        records += sweep.run_sweep(
            tiny(0), list(experts.values()), CountingEvaluate(), runs, seed=seed, merge_fn=fake_merge, progress=False
        )
        records += sweep.evaluate_models(experts, CountingEvaluate(), seed=seed)
    layers = [
        {
            "seed": 0,
            "expert": e,
            "key": f"l{i}.weight",
            "rows": 4 * (1 + i % 2),
            "cols": 4,
            "snr_method": m,
            "snr": float(1 + i + (e == "b")) if i else math.inf,
        }
        for e in "ab"
        for m in ("mp", "report_text")
        for i in range(5)
    ]
    return {
        "notebook": notebook,
        "config": {"snr_methods": ["mp", "report_text"]},
        "tasks": {
            "a": {"metrics": ["accuracy"], "n_eval": 10, "majority": 0.6},
            "b": {"metrics": ["accuracy", "mcc"], "n_eval": 12},
        },
        "records": records,
        "layers": layers,
        "head_variants": {
            "own": {"title": "own heads", "records": [r for r in records if r["model"] == "merged"]},
            "report": {"title": "re-initialised head", "records": records[:6], "majority": {"b": 0.7}},
        },
    }


@pytest.fixture
def figures_dir(tmp_path, monkeypatch):
    from lib import paths

    monkeypatch.setattr(paths, "FIGURES", tmp_path)
    return tmp_path / "smoke"


def test_sweep_figures_are_written_from_results(figures_dir):
    from lib.figures import snr_sweep

    results = fake_results("99_fake")
    written = []
    for fn in (
        snr_sweep.draw_top_sweep,
        snr_sweep.draw_threshold_sweep,
        snr_sweep.draw_layer_snr,
        snr_sweep.draw_head_variants,
    ):
        written += fn(results, smoke=True)
    assert sorted(p.name for p in written) == sorted(
        f"99_fake_{n}.png" for n in ("top_sweep", "threshold_sweep", "layer_snr", "head_variants")
    )
    assert all(p.parent == figures_dir and p.stat().st_size > 1000 for p in written)


def test_panels_follow_the_tasks_and_their_metrics():
    from lib.figures import snr_sweep

    assert snr_sweep.panels(fake_results("x")) == [("a", "accuracy"), ("b", "accuracy"), ("b", "mcc")]


@pytest.mark.parametrize("module", ["f01_resnet_fashion_kmnist", "f02_text_sst2_emotion", "f03_text_sst2_cola"])
def test_each_notebook_module_names_its_notebook(module):
    import importlib

    mod = importlib.import_module(f"lib.figures.{module}")
    assert mod.NOTEBOOK == module[1:], "the results file and the figure names are keyed by the notebook's stem"


# --- the shared SNR prepass, the experts' spectra, the report comparison ------------------------


class FingerprintEvaluate:
    """Records which model each call saw, so two sweeps can be compared model by model."""

    def __init__(self):
        self.seen = []

    def __call__(self, sd):
        self.seen.append(sweep.fingerprint(sd))
        return {"t": {"accuracy": 0.0}}


def test_shared_snr_prepass_builds_the_models_the_merge_would(tiny_base, make_experts):
    experts = make_experts(tiny_base, 2)
    runs = (
        sweep.snr_runs(
            ["snr_winner", "snr_base_reset", "snr_low_b", "snr_weighted"], ["mp", "report_text"], [0.0, 0.3, 0.7, 1.0]
        )
        + sweep.threshold_runs(["snr_max"], "max_median", [3.0, 25.0])
        + [sweep.Run("snr_winner", snr_method="mp", top=0.5, extra={"score": "mean"})]
        + sweep.reference_runs(["average", "task_arithmetic"])
    )
    shared, plain = FingerprintEvaluate(), FingerprintEvaluate()
    for evaluate, share in ((shared, True), (plain, False)):
        sweep.run_sweep(
            tiny_base,
            experts,
            evaluate,
            runs,
            seed=0,
            share_prepass=share,
            cache=sweep.CachedEvaluate(evaluate),
            progress=False,
            exclude="classifier",
        )
    # the caches differ in nothing, so both evaluated the same distinct models in the same order
    assert shared.seen == plain.seen and len(shared.seen) > 10


def test_snr_prepass_computes_each_definition_once(tiny_base, make_experts, monkeypatch):
    calls = []
    real = sweep.expert_snrs
    monkeypatch.setattr(
        sweep, "expert_snrs", lambda items, snr_method: calls.append(snr_method) or real(items, snr_method=snr_method)
    )
    pre = sweep.SnrPrepass(tiny_base, make_experts(tiny_base, 2))
    for run in sweep.snr_runs(["snr_winner", "snr_max"], ["mp", "report_text"], [0.2, 0.8]):
        assert pre.context(run) is not None
    assert calls == ["mp", "report_text"]
    assert pre.context(sweep.Run("average")) is None


def spiked_expert(seed: int) -> dict[str, torch.Tensor]:
    """Noise matrices of three shapes, one with a strong planted rank-one spike."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "square.weight": torch.randn(64, 64, generator=g),
        "wide.weight": torch.randn(32, 128, generator=g),
        "spiked.weight": torch.randn(96, 48, generator=g),
        "spiked.bias": torch.zeros(96),
        "head.weight": torch.randn(2, 64, generator=g),  # two eigenvalues: too few to show a spectrum
    }
    u, v = torch.randn(96, 1, generator=g), torch.randn(1, 48, generator=g)
    sd["spiked.weight"] += 3.0 * (u @ v) / (96 * 48) ** 0.25
    return sd


def test_layer_records_and_telling_layers_find_the_planted_spike():
    layers = sweep.layer_snr_records({"a": spiked_expert(0)}, ["mp", "report_text"], seed=4)
    assert len(layers) == 4 * 2, "one row per matrix and SNR definition; the bias has no spectrum"
    assert {r["seed"] for r in layers} == {4}
    mp = {r["key"]: r for r in layers if r["snr_method"] == "mp"}
    assert mp["spiked.weight"]["n_signal"] >= 1 and mp["square.weight"]["n_signal"] == 0
    picks = sweep.telling_layers(layers, "a", theirs="report_text")
    assert picks[0] == ("spiked.weight", "highest SNR (mp)")
    assert len({k for k, _ in picks}) == len(picks)
    assert "head.weight" not in {k for k, _ in picks}, "a 2-row matrix has no bulk to draw"
    with pytest.raises(ValueError, match="max_median"):
        sweep.telling_layers(layers, "a", theirs="max_median")


def test_esd_records_carry_the_fit_and_draw(figures_dir):
    from lib.figures import snr_sweep

    sd = spiked_expert(1)
    esd = sweep.esd_records(sd, [("spiked.weight", "planted spike"), ("square.weight", "noise")], expert="a")
    assert [len(e["eigenvalues"]) for e in esd] == [48, 64], "eigenvalues of the smaller Gram matrix"
    assert esd[0]["n_signal"] >= 1 and esd[0]["lambda_plus"] < max(esd[0]["eigenvalues"])
    assert esd[1]["n_signal"] == 0
    (path,) = snr_sweep.draw_esd({"notebook": "99_fake", "esd": esd}, smoke=True)
    assert path.name == "99_fake_esd.png" and path.stat().st_size > 1000


def test_sweep_seed_evaluates_experts_first_and_shares_the_cache():
    experts = {"a": tiny(1), "b": tiny(2)}
    evaluate = CountingEvaluate()
    # with no layer high-SNR, snr_low_a is expert a itself: recognised, not evaluated again
    runs = [sweep.Run("snr_low_a", snr_method="mp", top=0.0), sweep.Run("average")]
    recs = sweep.sweep_seed(None, experts, evaluate, runs, seed=1, progress=False)
    assert [r["run"] for r in recs[::3]] == ["expert:a", "expert:b", "snr_low_a(snr_method=mp, top=0.0)", "average()"]
    assert evaluate.calls == 3
    assert [r["reused"] for r in recs[::3]] == [False, False, True, False]


def test_compare_with_report_puts_numbers_side_by_side():
    runs = sweep.snr_runs(["snr_winner"], ["mp"], [0.5, 1.0])
    recs = []
    for seed in range(2):
        recs += sweep.run_sweep(
            tiny(0),
            [tiny(10 + seed)],
            CountingEvaluate(),
            runs,
            seed=seed,
            merge_fn=fake_merge,
            share_prepass=False,
            progress=False,
        )
    best = "snr_winner(snr_method=mp, top=1.0)"  # fake_merge adds top to every weight: task a grows with it
    claims = [
        Claim("a, best top", 0.5, runs=("snr_winner(snr_method=mp, top=0.5)", best), task="a"),
        Claim("not in this grid", 0.1, runs=("average()",), task="a"),
    ]
    table = sweep.compare_with_report(recs, claims)
    values = [r["value"] for r in recs if r["task"] == "a" and r["run"] == best]
    assert table.loc[0, "run"] == best
    assert table.loc[0, "ours_mean"] == pytest.approx(np.mean(values))
    assert table.loc[0, "difference"] == pytest.approx(np.mean(values) - 0.5)
    assert table.loc[0, "seeds"] == 2
    assert math.isnan(table.loc[1, "ours_mean"]) and table.loc[1, "run"] == "not measured in this run"


def test_leaderboard_keeps_each_strategy_at_its_best_setting():
    results = fake_results("x")
    board = sweep.leaderboard(results["records"], "a", "accuracy")
    assert list(board["mean"]) == sorted(board["mean"], reverse=True)
    # fake_merge grows task a's score with top, so each SNR family is best at top=1
    swept = board[board.top.notna()]
    assert set(swept.top) == {1.0} and len(swept) == 2 * 2, "two strategies x two SNR definitions"
    assert {"expert:a", "expert:b", "average()"} <= set(board.run)
    with pytest.raises(ValueError, match="no records for task 'a' and metric 'mcc'"):
        sweep.leaderboard(results["records"], "a", "mcc")


def test_shape_bias_sees_a_definition_that_tracks_the_aspect_ratio():
    rng = np.random.default_rng(0)
    shapes = [(64, c) for c in (8, 16, 24, 32, 48, 64)]
    layers = [
        {
            "seed": 0,
            "expert": "a",
            "key": f"l{i}",
            "rows": r,
            "cols": c,
            "snr_method": m,
            "snr": (c / r if m == "report_text" else float(rng.uniform())),
        }
        for i, (r, c) in enumerate(shapes)
        for m in ("mp", "report_text")
    ]
    (row,) = sweep.shape_bias(layers).to_dict("records")
    assert row["rho(report_text, aspect)"] == pytest.approx(1.0)
    assert abs(row["rho(mp, aspect)"]) < 1.0 and row["layers"] == 6


def test_verdict_states_the_difference_and_whether_seeds_resolve_it():
    results = fake_results("x")
    text = sweep.verdict(results["records"], "a", "accuracy")
    assert "snr_" in text and "average()" in text and "paired 95% t-interval over" in text
    # the interval is Student's over the seeds' paired differences, not two standard errors
    frame = sweep.records_frame(results["records"])
    best = sweep.leaderboard(results["records"], "a", "accuracy")
    best = best[best.snr_method.notna()].run.iloc[0]
    a = frame[(frame.task == "a") & (frame.metric == "accuracy")]
    paired = a[a.run == best].groupby("seed").value.mean() - a[a.run == "average()"].groupby("seed").value.mean()
    low, high = stats.t_interval(paired)
    assert f"[{low:+.3f}, {high:+.3f}]" in text
    assert "The a expert alone scores" in text
    one_seed = [r for r in results["records"] if r["seed"] == 0]
    assert "one seed" in sweep.verdict(one_seed, "a", "accuracy")


def test_a_claim_is_a_value_or_an_effect_never_both_nor_neither():
    with pytest.raises(ValueError, match="either runs and a task"):
        Claim("neither", 1.0)
    with pytest.raises(ValueError, match="either runs and a task"):
        Claim("both", 1.0, runs=("average()",), task="a", better="average()", worse="base")
    with pytest.raises(ValueError, match="either runs and a task"):
        Claim("half an effect", 1.0, better="average()")
    assert Claim("an effect", None, better="average()", worse="base").is_effect
