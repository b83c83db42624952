"""README tables come from results/*.json: lib.report renders them, and the committed README must
match what the committed results give (no number typed by hand, none left stale)."""

from __future__ import annotations

import math

import pytest

from lib import paths, report
from lib.experts import summary_of

README = """# title
text before
<!-- results:begin -->
old table
<!-- results:end -->
middle
<!-- runtimes:begin -->
<!-- runtimes:end -->
after
"""


def experts_results():
    rows = [
        {
            "task": "cola",
            "variant": "pretrained",
            "seed": s,
            "runtime": {"train_s": 300.0 + 60 * s, "eval_s": 4.0},
            "metrics": {"accuracy": 0.7, "mcc": mcc, "n": 1043},
        }
        for s, mcc in ((0, 0.22), (1, 0.25))
    ]
    return {"experts": rows, "summary": summary_of(rows), "mergeability": []}


def test_render_replaces_only_the_marked_blocks():
    out = report.render(README, {"experts": experts_results()})
    assert out.startswith("# title\ntext before\n<!-- results:begin -->\n") and out.endswith(
        "middle\n" + out.split("middle\n")[1]
    )
    assert "old table" not in out and out.rstrip().endswith("after")
    assert report.render(out, {"experts": experts_results()}) == out, "rendering twice changes nothing"


def test_figures_are_linked_per_notebook():
    text = report.figures_markdown(["figures/04_star_methods.png", "figures/04_star_eta_sweep.png", "figures/x.png"])
    assert text.endswith(
        "* `04_star`: [methods](figures/04_star_methods.png), [eta_sweep](figures/04_star_eta_sweep.png)"
    )
    assert report.figures_markdown([]) == ""


def test_render_needs_both_blocks():
    with pytest.raises(ValueError, match="runtimes:begin"):
        report.render("<!-- results:begin -->\n<!-- results:end -->\n", {})


def test_experts_table_carries_the_numbers_and_says_when_a_target_is_missed():
    text = report.experts_section(experts_results())
    # the sample std (ddof=1) of the per-seed scores, as every other table
    assert "mcc 0.235 ± 0.021" in text and "mcc ≥ 0.25: **not met**" in text and "| 6 min |" in text
    assert f"| {report.PUBLISHED_SMALL_BERT['cola']} |" in text  # the published small-BERT figure beside ours


def test_missing_results_are_listed_not_invented():
    text = report.results_markdown({"experts": experts_results()})
    assert "Not run in full mode yet" in text and "`05_drm`" in text and "`experts`" not in text.split("yet")[1]
    assert report.runtimes_markdown({}) == ""


def test_runtimes_sum_the_experts_and_read_each_notebook_total():
    nb = {
        "config": {"seeds": [0, 1, 2]},
        "smoke": False,
        "runtimes": {"total_s": 3 * 3600 + 5 * 60},
        "experts": [{"from_cache": True}],
    }
    text = report.runtimes_markdown({"experts": experts_results(), "04_star": nb})
    assert "| `make experts` | 2 experts trained and evaluated | 11 min |" in text
    assert "| notebook 04_star | full mode, seeds 0, 1, 2 | 3 h 05 min | experts from the cache |" in text
    assert "| **total** | `make reproduce`, what is measured above | 3 h 16 min |" in text


def test_a_notebook_whose_records_came_from_the_store_is_timed_by_their_own_seconds():
    nb = {
        "config": {"seeds": [0, 1]},
        "smoke": False,
        "runtimes": {"total_s": 20.0, "per_seed_and_pool": [{"sweep_s": 3600.0}, {"sweep_s": 1800.0}]},
    }
    text = report.runtimes_markdown({"07_lora": nb})
    assert "| notebook 07_lora | full mode, seeds 0, 1 | 1 h 30 min |" in text and "this run 20 s" in text
    inline = {**nb, "runtimes": {**nb["runtimes"], "total_s": 6000.0}}  # computed in the run: its own total
    assert "| notebook 07_lora | full mode, seeds 0, 1 | 1 h 40 min |  |" in report.runtimes_markdown(
        {"07_lora": inline}
    )


@pytest.mark.parametrize("value, text", [(0.12345, "0.123"), (356383.7, "3.56e+05"), (float("nan"), "–"), (None, "–")])
def test_fmt(value, text):
    assert report.fmt(value) == text


def test_pm_leaves_out_the_std_of_one_seed():
    assert report.pm(0.5, math.nan, 1) == "0.500 (1)" and report.pm(0.5, 0.25) == "0.500 ± 0.250"


def test_readme_tables_match_the_committed_results():
    readme = (paths.ROOT / "README.md").read_text()
    assert report.render(readme, report.load(), report.figure_files(), report.load_lab()) == readme, (
        "README.md's tables are not what results/*.json give: run `python -m lib report` and commit README.md"
    )


def sweep_records(rows):
    """lib.sweep records of one seed: (run, method, model, snr_method, top, {task: value})."""
    metric = {"sst2": "accuracy", "cola": "mcc"}
    return [
        {
            "seed": seed,
            "run": run,
            "method": method,
            "model": model,
            "snr_method": snr,
            "top": top,
            "threshold": None,
            "task": task,
            "metric": metric[task],
            "value": value + 0.01 * seed,
            "reused": False,
        }
        for seed in (0, 1)
        for run, method, model, snr, top, values in rows
        for task, value in values.items()
    ]


def test_merges_table_picks_the_run_that_serves_both_tasks():
    rows = [
        ("expert:sst2", "expert", "sst2", None, None, {"sst2": 0.9, "cola": 0.0}),
        ("expert:cola", "expert", "cola", None, None, {"sst2": 0.5, "cola": 0.3}),
        ("base:base", "base", "base", None, None, {"sst2": 0.5, "cola": 0.0}),
        ("average()", "average", "merged", None, None, {"sst2": 0.8, "cola": 0.15}),
        # a copy of the SST-2 expert wins SST-2 outright but serves CoLA not at all
        ("snr_winner(snr_method=mp, top=0.0)", "snr_winner", "merged", "mp", 0.0, {"sst2": 0.9, "cola": 0.0}),
        # close to a copy of the CoLA expert: SST-2 at 0.555 of 0.905 looks like 61 %, but guessing gets 0.5
        ("snr_low_b(snr_method=mp, top=0.1)", "snr_low_b", "merged", "mp", 0.1, {"sst2": 0.55, "cola": 0.3}),
        ("snr_winner(snr_method=mp, top=0.5)", "snr_winner", "merged", "mp", 0.5, {"sst2": 0.7, "cola": 0.15}),
        ("ties()", "ties", "merged", None, None, {"sst2": 0.85, "cola": 0.1}),
    ]
    r = {
        "config": {"tasks": ["sst2", "cola"], "seeds": [0, 1], "snr_methods": ["mp"]},
        "records": sweep_records(rows),
        "tasks": {
            "sst2": {"split": "validation", "n_eval": 872, "majority": 0.5},
            "cola": {"split": "validation", "n_eval": 1043, "majority": 0.69},
        },
    }
    lines = report.merges_table("03", r).splitlines()
    best_mp = next(line for line in lines if line.startswith("| best SNR merge, `mp`"))
    # chance-corrected: min((0.705 - 0.5) / (0.905 - 0.5), 0.155 / 0.305); the CoLA copy scores 0.136 on SST-2
    assert "top=0.5" in best_mp and best_mp.endswith("| 0.506 |"), best_mp
    assert any(line.startswith("| best other method | `ties()`") for line in lines)
    assert any(line.startswith("| chance | always the most common label | 0.500 | 0.000 |") for line in lines)
    assert "sst2 validation (872), cola validation (1,043)" in lines[0] and "chance-corrected" in lines[0]


def test_lora_table_sets_each_adapter_beside_its_full_fine_tune_and_flags_a_gap():
    def row(task, acc, variant="pretrained", **other):
        metrics = {"accuracy": acc, **other}
        return {"task": task, "variant": variant, "seed": 0, "metrics": metrics, "runtime": {"train_s": 60}}

    full = {"experts": [row("sst2", 0.90), row("trec", 0.95), row("mrpc", 0.80), row("cola", 0.7, mcc=0.3)]}
    lora = {
        "experts": [row("sst2", 0.88), row("trec", 0.90), row("mrpc", 0.70), row("cola", 0.69, mcc=0.1)],
        "config": {"lora": {"r": 16}},
    }
    text = report.lora_section({"experts": full, "experts_lora": lora})
    lines = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ") and "task" not in ln}
    assert "-2.0" in lines["sst2"] and "yes" in lines["sst2"]
    assert "-5.0" in lines["trec"] and "**no**" in lines["trec"]
    assert "report only" in lines["mrpc"], "only SST-2, Emotion and TREC carry the 3-point target"
    assert "mcc 0.100 / 0.300" in lines["cola"], "CoLA is also shown by its own metric, Matthews correlation"
    assert lines["sst2"].count("|") == lines["cola"].count("|")
    assert "sst2 -2.0 (1 seed), trec -5.0 (1 seed)" in text, "the mean gap of each checked task is stated"
    assert report.lora_section({"experts": full}) == ""


def lab_result(total_s: float) -> dict:
    row = {"run": "expert:sst2", "task": "sst2", "metric": "accuracy", "lab": 0.8, "full": 0.87, "full_std": 0.01}
    return {
        "tasks": {"sst2": {"title": "SST-2", "majority": 0.509}},
        "experts": {"sst2": {"accuracy": 0.8, "n": 872}},
        "beside_full": [row | {"full_seeds": 3}, row | {"run": "snr_base_reset(x)", "full_seeds": 3}],
        "runtime": {
            "total_s": total_s,
            "experts_s": 200.0,
            "spectra_s": 1.0,
            "sweep_s": 100.0,
            "cpu_s": 600.0,
            "load_average": 2.0,
        },
    }


def test_lab_section_says_whether_the_lab_fits_ten_minutes():
    fits, slow = report.lab_markdown(lab_result(338.0)), report.lab_markdown(lab_result(1269.0))
    assert "**5.6 min wall**, within ten minutes" in fits and "**not** within" in slow
    assert "| `expert:sst2` | SST-2 | accuracy | 0.800 | 0.870 ± 0.010 |" in fits
    assert "snr_base_reset" not in fits, "only the verdict rows (experts, SNR Winner, the references) are shown"
    assert report.lab_markdown(None) == ""
    readme = "<!-- results:begin -->\n<!-- results:end -->\n<!-- runtimes:begin -->\n<!-- runtimes:end -->\n"
    out = report.render(readme + "<!-- lab:begin -->\n<!-- lab:end -->\n", {}, lab=lab_result(338.0))
    assert "5.6 min wall" in out and report.render(readme, {}) == report.render(readme, {}, lab=None)


def effect_row(claim, about=None, level=0.95, **kw):
    row = {
        "claim": claim,
        "pools": "text",
        "source": "Table 2",
        "paper": 1.5,
        "ours": 2.0,
        "ours_std": 0.5,
        "seeds": 3,
        "subsets": 3,
        "won": 3,
        "level": level,
        "ci_low": 0.8,
        "ci_high": 3.2,
        "worse_score": 80.0,
        "base_score": 40.0,
        "chance_score": 30.0,
        "baseline": "",
        "agrees": "yes",
        "note": "",
        **kw,
    }
    return row if about is None else {**row, "about": about}


def test_claims_tables_set_the_lora_rows_under_the_full_fine_tunes_with_a_setting_column():
    config = {"config": {"max_subsets": 1}}
    results = {
        "04_star": {**config, "effects": [effect_row("STAR beats ties (5 tasks)")]},
        "07_lora": {
            **config,
            "effects": [
                effect_row("STAR beats ties (7 tasks)", "STAR", pools="text-lora"),
                effect_row("DRM-H beats ties (7 tasks)", "DRM", pools="text-lora"),
            ],
        },
    }
    star = report.claims_section(results, "STAR")
    lines = [line for line in star.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| setting | claim |")
    body = lines[1:]  # the header, then the rows (the |---| line does not start with '| ')
    assert [line.split(" | ")[0] for line in body] == ["| full fine-tune", "| LoRA"]
    assert "STAR beats ties (5 tasks)" in body[0] and "STAR beats ties (7 tasks)" in body[1]
    assert "DRM-H" not in star
    drm = report.claims_section(results, "DRM")  # no 05 results: the LoRA rows alone
    assert [line.split(" | ")[0] for line in drm.splitlines() if line.startswith("| ")][1:] == ["| LoRA"]
    assert report.claims_section({"07_lora": {**config, "effects": []}}, "DRM") == ""
    results["07_lora"]["effects"][0]["level"] = 0.9
    with pytest.raises(ValueError, match="one interval level"):
        report.claims_section(results, "STAR")
