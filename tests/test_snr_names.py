"""The report's text SNR is ``"report_text"``; its old name ``"seed"`` still works everywhere a user
types it (the Python API, ``python -m lib scan|merge``) and gives the same numbers, the same merged
tensors and the same record keys, while labels and records carry the name in use. The migration of
results files written before the rename changes those labels and nothing else."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lib import migrate, paths, pool, runner, sweep
from lib.__main__ import main
from lib.claims import Claim
from lib.merge import merge, select_keys
from lib.merge.snr import expert_snrs
from lib.spectral import SNR_ALIASES, SNR_METHODS, canonical_snr_method, scan, snr, snr_batch
from lib.store import config_key


def noise(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- the names ------------------------------------------------------------------------------------


def test_the_canonical_names_and_the_alias():
    assert list(SNR_METHODS) == ["mp", "max_median", "report_text"], "iterating lists the names in use only"
    assert SNR_ALIASES == {"seed": "report_text"}
    assert "seed" in SNR_METHODS and "report_text" in SNR_METHODS and "svd" not in SNR_METHODS
    assert SNR_METHODS["seed"] is SNR_METHODS["report_text"]
    assert canonical_snr_method("seed") == "report_text"
    assert [canonical_snr_method(m) for m in SNR_METHODS] == list(SNR_METHODS)


@pytest.mark.parametrize("bad", ["svd", "Seed", "report-text", "", None, 3])
def test_an_unknown_name_is_a_one_line_error_listing_the_names(bad):
    with pytest.raises(ValueError) as err:
        canonical_snr_method(bad)
    message = str(err.value)
    assert "\n" not in message and repr(bad) in message
    assert all(repr(name) in message for name in ("mp", "max_median", "report_text", "seed"))
    with pytest.raises(ValueError, match="unknown SNR method"):
        snr(noise((8, 8), 0), bad)
    if bad is not None:  # a run without an snr_method leaves it to the method's default
        with pytest.raises(ValueError, match="unknown SNR method"):
            sweep.Run("snr_winner", snr_method=bad, top=0.5)


def test_the_alias_gives_the_same_numbers_as_the_name():
    mats = [noise((48, 96), 1), noise((96, 48), 2), noise((8, 4, 3, 3), 3)]
    for W in mats:
        assert snr(W, "seed") == snr(W, "report_text")
    assert snr(mats[0], "report_text") != snr(mats[0], "mp"), (
        "the two definitions must differ for the test to mean anything"
    )
    assert torch.equal(snr_batch(mats, "seed"), snr_batch(mats, "report_text"))
    sd = {f"m{i}.weight": W for i, W in enumerate(mats)}
    assert scan(sd, method="seed").equals(scan(sd, method="report_text"))


# --- merges, runs, records --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["snr_winner", "snr_weighted", "snr_base_reset"])
def test_a_merge_under_the_alias_has_the_same_tensors(method, tiny_base, tiny_experts):
    old = merge(method, tiny_base, tiny_experts, snr_method="seed", top=0.5)
    new = merge(method, tiny_base, tiny_experts, snr_method="report_text", top=0.5)
    assert list(old) == list(new)
    assert all(torch.equal(old[k], new[k]) for k in new)
    items = [(k, None, [e[k] for e in tiny_experts]) for k in select_keys(tiny_base)]
    keys, by_old = expert_snrs(items, snr_method="seed")
    _, by_new = expert_snrs(items, snr_method="report_text")
    _, by_mp = expert_snrs(items, snr_method="mp")
    assert all(torch.equal(by_old[k], by_new[k]) for k in by_new)
    assert any(not torch.equal(by_new[k], by_mp[k]) for k in by_new)


def test_runs_and_labels_carry_the_name_in_use():
    old, new = (
        sweep.Run("snr_winner", snr_method="seed", top=0.25),
        sweep.Run("snr_winner", snr_method="report_text", top=0.25),
    )
    assert old == new and old.snr_method == "report_text"
    assert old.label() == "snr_winner(snr_method=report_text, top=0.25)"
    assert sweep.snr_runs(["snr_max"], ["mp", "seed"], [0.5]) == sweep.snr_runs(
        ["snr_max"], ["mp", "report_text"], [0.5]
    )
    assert sweep.threshold_runs(["snr_max"], "seed", [3])[0].snr_method == "report_text"
    assert (
        pool.canonical_run("snr_winner", snr_method="seed").label()
        == pool.canonical_run("snr_winner", snr_method="report_text").label()
    )
    assert "report_text" in pool.canonical_run("snr_winner", snr_method="seed").label()
    assert sweep.canonical_label("snr_max(snr_method=seed, top=0.5)") == "snr_max(snr_method=report_text, top=0.5)"
    for unchanged in ("average()", "expert:seed", "dare(seed=3)", "snr_max(snr_method=mp, top=0.5)"):
        assert sweep.canonical_label(unchanged) == unchanged


SPEC = {
    "name": "synthetic",
    "tasks": ["a", "b"],
    "seed": 0,
    "smoke": True,
    "variant": None,
    "source": "tests:none",
    "experts": {"a": "k:a", "b": "k:b"},
    "evaluation": {"score": "none"},
}


def test_records_under_the_alias_and_the_name_have_one_key():
    old = runner.merge_config(SPEC, ["a", "b"], "snr_winner", {"snr_method": "seed", "top": 0.5})
    new = runner.merge_config(SPEC, ["a", "b"], "snr_winner", {"snr_method": "report_text", "top": 0.5})
    mp = runner.merge_config(SPEC, ["a", "b"], "snr_winner", {"snr_method": "mp", "top": 0.5})
    assert old == new and old["hparams"]["snr_method"] == "report_text"
    assert config_key(old) == config_key(new) != config_key(mp)
    swept = [
        runner.sweep_config(SPEC, sweep.Run("snr_base_reset", snr_method=m, top=0.7)) for m in ("seed", "report_text")
    ]
    assert swept[0] == swept[1] and config_key(swept[0]) == config_key(swept[1])
    assert swept[0]["run"]["snr_method"] == "report_text"
    assert "report_text" in runner.describe(swept[0])


def test_spectra_records_carry_the_name_in_use():
    g = torch.Generator().manual_seed(0)
    expert = {"w.weight": torch.randn(64, 32, generator=g), "v.weight": torch.randn(48, 48, generator=g)}
    expert["w.weight"] += 4.0 * torch.randn(64, 1, generator=g) @ torch.randn(1, 32, generator=g) / 45.0
    layers, esd = sweep.snr_and_spectra({"a": expert}, ["mp", "seed"], seed=0)
    again, esd_again = sweep.snr_and_spectra({"a": expert}, ["mp", "report_text"], seed=0)
    assert layers == again and esd == esd_again
    assert {r["snr_method"] for r in layers} == {"mp", "report_text"}
    assert all("seed" not in e["why"] for e in esd)
    assert sweep.telling_layers(layers, "a", theirs="seed") == sweep.telling_layers(layers, "a", theirs="report_text")


def test_a_claim_written_with_the_old_label_finds_the_run():
    def record(run, snr_method, value, seed):
        return {
            "seed": seed,
            "method": "snr_winner",
            "model": "merged",
            "run": run,
            "snr_method": snr_method,
            "top": 0.5,
            "threshold": None,
            "task": "a",
            "metric": "accuracy",
            "value": value,
        }

    records = [
        record("snr_winner(snr_method=report_text, top=0.5)", "report_text", v, s) for s, v in enumerate([0.6, 0.8])
    ]
    old_records = [record("snr_winner(snr_method=seed, top=0.5)", "seed", v, s) for s, v in enumerate([0.6, 0.8])]
    for claim_run in ("snr_winner(snr_method=seed, top=0.5)", "snr_winner(snr_method=report_text, top=0.5)"):
        claim = Claim("a", 0.75, runs=(claim_run,), task="a")
        for recs in (records, old_records):
            (row,) = sweep.compare_with_report(recs, [claim]).to_dict("records")
            assert row["run"] == "snr_winner(snr_method=report_text, top=0.5)"
            assert row["ours_mean"] == pytest.approx(0.7) and row["seeds"] == 2


# --- the command line -------------------------------------------------------------------------------


@pytest.fixture
def checkpoints(tmp_path):
    g = torch.Generator().manual_seed(5)
    base = {
        "l1.weight": torch.randn(40, 24, generator=g),
        "l1.bias": torch.zeros(40),
        "l2.weight": torch.randn(24, 40, generator=g),
    }
    files = {"base": tmp_path / "base.safetensors"}
    save_file(base, files["base"])
    for i in range(2):
        spike = torch.randn(40, 1, generator=g) @ torch.randn(1, 24, generator=g)
        expert = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        expert["l1.weight"] += (i + 1) * spike / 6.0
        files[f"e{i}"] = tmp_path / f"e{i}.safetensors"
        save_file(expert, files[f"e{i}"])
    return files


def test_scan_takes_the_alias_on_the_command_line(checkpoints, tmp_path, capsys):
    out = {}
    for name in ("seed", "report_text"):
        out[name] = tmp_path / f"scan_{name}.csv"
        assert main(["scan", str(checkpoints["e0"]), "--out", str(out[name]), "--snr-method", name, "--quiet"]) == 0
    assert out["seed"].read_bytes() == out["report_text"].read_bytes()
    assert (
        main(["scan", str(checkpoints["e0"]), "--out", str(tmp_path / "x.csv"), "--snr-method", "sed", "--quiet"]) == 1
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("error: ") and "'sed'" in err[-1] and "report_text" in err[-1]


def test_merge_takes_the_alias_on_the_command_line(checkpoints, tmp_path):
    merged = {}
    for name in ("seed", "report_text"):
        out = tmp_path / f"merged_{name}"
        argv = ["merge", "--method", "snr_winner", "--base", str(checkpoints["base"]), "--experts"]
        argv += [str(checkpoints["e0"]), str(checkpoints["e1"]), "--out", str(out)]
        argv += ["--set", f"snr_method={name}", "--set", "top=0.5", "--quiet"]
        assert main(argv) == 0
        record = yaml.safe_load((out / "merge_config.yaml").read_text())
        assert record["parameters"]["snr_method"] == "report_text", "the output records the name in use"
        merged[name] = {}
        for f in sorted(out.glob("*.safetensors")):
            merged[name].update(load_file(f))
    assert merged["seed"].keys() == merged["report_text"].keys() and merged["seed"]
    assert all(torch.equal(merged["seed"][k], merged["report_text"][k]) for k in merged["seed"])


# --- migrating results written under the old name ------------------------------------------------------


OLD_RESULTS = {
    "config": {
        "seeds": [0, 1],
        "snr_methods": ["mp", "seed"],
        "runs": ["average()", "snr_winner(snr_method=seed, top=0.25)"],
    },
    "records": [
        {"seed": 0, "run": "snr_max(snr_method=seed, top=0.7)", "snr_method": "seed", "value": 0.123456789},
        {"seed": 1, "run": "snr_max(snr_method=mp, top=0.7)", "snr_method": "mp", "value": math.pi},
        {"seed": 2, "run": "dare(seed=2)", "snr_method": None, "value": -0.0},
    ],
    "shape_bias": [{"shape": [64, 576], "snr_mp": [0.0], "snr_max_median": [2.5], "snr_seed": [1e8, 2e8]}],
    "bias": [{"seed": 0, "rho(mp, aspect)": 0.1, "rho(seed, aspect)": 0.9, "rho(mp, seed)": -0.2}],
    "esd": [{"why": "ranked 30 places apart by mp and seed"}, {"why": "highest SNR (mp)"}],
    "notes": "heads start from the same seeded draw; the seed's two-class head",
}
NEW_RESULTS = {
    "config": {
        "seeds": [0, 1],
        "snr_methods": ["mp", "report_text"],
        "runs": ["average()", "snr_winner(snr_method=report_text, top=0.25)"],
    },
    "records": [
        {
            "seed": 0,
            "run": "snr_max(snr_method=report_text, top=0.7)",
            "snr_method": "report_text",
            "value": 0.123456789,
        },
        {"seed": 1, "run": "snr_max(snr_method=mp, top=0.7)", "snr_method": "mp", "value": math.pi},
        {"seed": 2, "run": "dare(seed=2)", "snr_method": None, "value": -0.0},
    ],
    "shape_bias": [{"shape": [64, 576], "snr_mp": [0.0], "snr_max_median": [2.5], "snr_report_text": [1e8, 2e8]}],
    "bias": [{"seed": 0, "rho(mp, aspect)": 0.1, "rho(report_text, aspect)": 0.9, "rho(mp, report_text)": -0.2}],
    "esd": [{"why": "ranked 30 places apart by mp and report_text"}, {"why": "highest SNR (mp)"}],
    "notes": "heads start from the same seeded draw; the seed's two-class head",
}


def test_the_migration_renames_labels_only_and_once():
    before = copy.deepcopy(OLD_RESULTS)
    new, counts = migrate.rename_snr_methods(OLD_RESULTS)
    assert OLD_RESULTS == before, "the input is left as it was"
    assert json.dumps(new) == json.dumps(NEW_RESULTS), "values, other strings and key order unchanged"
    assert counts == {
        "snr_methods entry": 1,
        "run label": 2,
        "snr_method value": 1,
        "snr_<method> key": 1,
        "rho(...) key": 2,
        "esd why": 1,
    }
    again, none = migrate.rename_snr_methods(new)
    assert again == new and not none
    with pytest.raises(ValueError, match="collide"):
        migrate.rename_snr_methods({"snr_seed": 1, "snr_report_text": 2})


def test_migrating_a_file_rewrites_it_once(tmp_path, capsys):
    path = tmp_path / "r.json"
    paths.write_json(path, OLD_RESULTS)
    assert migrate.main([str(path), "--check"]) == 1
    assert paths.read_json(path) == OLD_RESULTS, "--check writes nothing"
    assert migrate.main([str(path)]) == 0
    text = path.read_text()
    assert json.loads(text) == NEW_RESULTS
    assert not migrate.migrate_file(path) and path.read_text() == text
    assert migrate.main([str(path), "--check"]) == 0
    assert "nothing to rename" in capsys.readouterr().out


@pytest.mark.parametrize("name", migrate.RESULTS_FILES)
def test_the_committed_results_carry_the_name_in_use(name):
    path = paths.ROOT / name
    if not path.exists():
        pytest.skip(f"{name} is not there")
    assert not migrate.migrate_file(path, write=False), f"{name} still has old SNR names: python -m lib.migrate"
