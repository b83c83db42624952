"""Record shards (lib.store export_rows/import_rows, lib.grids, ``python -m lib records``): the
record store's rows travel with the repository as ``results/records/*.jsonl``, so a grid longer
than a session can be computed seed by seed. An export/import round trip gives a fresh store the
same records; importing twice changes nothing; a tampered line is refused naming file and line;
merging into a shard never drops or overwrites a row; the command line's bad input is one line.
Small fake configurations and payloads (and test_runner's synthetic pool); no training."""

from __future__ import annotations

import json
import math

import pytest
from test_cli import error_line, run_cli
from test_runner import SOURCE, TASKS, write_experts

from lib import grids, paths, pool, runner
from lib.store import RecordStore, ShardError, config_key, method_version, read_shard


def config(subset=("a", "b"), method="ties", seed=0, **hparams):
    return {
        "record": "merge",
        "pool": {"name": "p", "seed": seed, "tasks": ["a", "b", "c"]},
        "subset": list(subset),
        "method": method,
        "hparams": {"density": 0.2, **hparams},
        "version": method_version(method),
    }


def payload(value=0.875, nan=False):
    return [
        {"task": "a", "metric": "accuracy", "value": value, "merge_s": 0.25, "hparams": {"z": 1, "a": 2}},
        {"task": "b", "metric": "mcc", "value": float("nan") if nan else 0.5, "merge_s": 0.25},
    ]


CONFIGS = [config(), config(("a", "c")), config(("b", "c"), method="average")]


def same(a, b) -> bool:
    # NaN-aware equality of two payloads, field order included
    return json.dumps(a) == json.dumps(b)


@pytest.fixture
def filled(tmp_path):
    with RecordStore(tmp_path / "a.sqlite") as s:
        s.put(CONFIGS[0], payload(nan=True), seconds=1.5)
        s.put(CONFIGS[1], payload(0.5))
        s.put(CONFIGS[2], payload(0.25), seconds=3.0)
        yield s


def test_export_then_import_into_a_fresh_store_gives_the_same_records(filled, tmp_path):
    shard = tmp_path / "records" / "nb.jsonl"
    counts = filled.export_rows(CONFIGS + [config(("x", "y"))], shard)
    assert counts == {"exported": 3, "added": 3, "kept": 0, "missing": 1}
    lines = shard.read_text().splitlines()
    assert len(lines) == 3 and [json.loads(line)["key"] for line in lines] == sorted(config_key(c) for c in CONFIGS)
    with RecordStore(tmp_path / "b.sqlite") as fresh:
        assert fresh.import_rows(shard) == {"imported": 3, "present": 0, "differing": 0}
        for c in CONFIGS:
            assert same(fresh.get(c), filled.get(c))
        assert math.isnan(fresh.get(CONFIGS[0])[1]["value"])
        assert list(fresh.get(CONFIGS[0])[0]["hparams"]) == ["z", "a"]  # field order kept
        seconds = dict(fresh.conn.execute("select key, seconds from records"))
        assert seconds[config_key(CONFIGS[0])] == 1.5 and seconds[config_key(CONFIGS[1])] is None
        # exporting the imported rows again writes the same bytes
        again = tmp_path / "again.jsonl"
        fresh.export_rows(CONFIGS, again)
        assert again.read_bytes() == shard.read_bytes()


def test_import_is_idempotent(filled, tmp_path):
    shard = tmp_path / "s.jsonl"
    filled.export_rows(CONFIGS, shard)
    with RecordStore(tmp_path / "b.sqlite") as fresh:
        fresh.import_rows(shard)
        assert fresh.import_rows(shard) == {"imported": 0, "present": 3, "differing": 0}
        assert len(fresh) == 3
    assert filled.import_rows(shard) == {"imported": 0, "present": 3, "differing": 0}


def tamper(shard, line_no, change):
    lines = shard.read_text().splitlines()
    row = json.loads(lines[line_no - 1])
    change(row)
    lines[line_no - 1] = json.dumps(row, separators=(",", ":"))
    shard.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["payload"][0].update(value=0.99), "fails its checksum"),
        (lambda r: r["config"].update(subset=["c", "a"]), "hashes to"),
        (lambda r: r.update(method="dare"), "method 'dare' is not its configuration's"),
        (lambda r: r.pop("checksum"), "missing checksum"),
        (lambda r: r.update(seconds="soon"), "seconds 'soon'"),
        (lambda r: r.update(key="not a key"), "is not 32 lowercase hex digits"),
    ],
)
def test_a_tampered_line_is_refused_naming_file_and_line_and_nothing_is_imported(filled, tmp_path, change, message):
    shard = tmp_path / "s.jsonl"
    filled.export_rows(CONFIGS, shard)
    tamper(shard, 2, change)
    with RecordStore(tmp_path / "b.sqlite") as fresh:
        with pytest.raises(ShardError, match=message) as err:
            fresh.import_rows(shard)
        assert str(err.value).startswith(f"{shard}:2: ") and "\n" not in str(err.value)
        assert len(fresh) == 0


def test_a_line_that_is_not_json_is_refused_naming_its_line(filled, tmp_path):
    shard = tmp_path / "s.jsonl"
    filled.export_rows(CONFIGS, shard)
    shard.write_text(shard.read_text() + '{"key": "abc",\n')
    with pytest.raises(ShardError, match=rf"^{shard}:4: not JSON"):
        read_shard(shard)


def test_merging_into_a_shard_keeps_every_row_and_never_overwrites_one(filled, tmp_path):
    shard = tmp_path / "s.jsonl"
    filled.export_rows(CONFIGS[:2], shard)
    with RecordStore(tmp_path / "b.sqlite") as other:
        other.import_rows(shard)  # the second session starts from the shard, as the notebooks do
        new = config(("a", "b"), seed=1)
        other.put(new, payload(0.1))
        counts = other.export_rows([CONFIGS[1], new], shard)
        assert counts == {"exported": 2, "added": 1, "kept": 2, "missing": 0}
    rows = read_shard(shard)
    assert set(rows) == {config_key(c) for c in CONFIGS[:2]} | {config_key(new)}
    # the same configuration computed again elsewhere (another payload): an error naming the key, the shard untouched
    before = shard.read_bytes()
    with RecordStore(tmp_path / "c.sqlite") as third:
        third.put(CONFIGS[0], payload(0.7))
        with pytest.raises(ShardError, match=f"row {config_key(CONFIGS[0])} holds another payload"):
            third.export_rows([CONFIGS[0]], shard)
        # importing keeps the store's own row and says so
        assert third.import_rows(shard)["differing"] == 1
        assert third.get(CONFIGS[0])[0]["value"] == 0.7
    assert shard.read_bytes() == before


def test_a_key_twice_in_a_shard_must_be_the_same_row(filled, tmp_path):
    shard = tmp_path / "s.jsonl"
    filled.export_rows(CONFIGS[:1], shard)
    line = shard.read_text()
    shard.write_text(line + line)  # e.g. two branches that each added the row
    assert len(read_shard(shard)) == 1
    with RecordStore(tmp_path / "other.sqlite") as other:
        other.put(CONFIGS[0], payload(0.3))
        other.export_rows(CONFIGS[:1], tmp_path / "t.jsonl")
    shard.write_text(line + (tmp_path / "t.jsonl").read_text())
    with pytest.raises(ShardError, match=rf"{shard}:2: row {config_key(CONFIGS[0])} differs .* line 1"):
        read_shard(shard)


# --- the notebooks' hook (lib.grids) -------------------------------------------------------------


@pytest.fixture
def results_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "RESULTS", tmp_path / "results")
    monkeypatch.setenv("SPECTRAL_MERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPECTRAL_MERGE_RECORDS", raising=False)
    runner.release()
    yield tmp_path / "results"
    runner.release()


def synthetic_grid(folder, seed):
    spec = runner.pool_spec(TASKS, seed=seed, smoke=True, name="synthetic", source=SOURCE, folder=str(folder))
    return spec, runner.pool_grid(spec, [("a", "b")], [pool.canonical_run("average")])


def test_a_grid_done_seed_by_seed_in_fresh_sessions_assembles_from_the_shard(results_dir, tmp_path):
    experts = {seed: write_experts(tmp_path / f"experts{seed}", seed) for seed in (0, 1)}
    specs, grid = {}, {}
    for seed in (0, 1):
        specs[seed], grid[seed] = synthetic_grid(experts[seed], seed)
    shard = results_dir / "records" / "nb.jsonl"
    # session 1: seed 1 only, in a store of its own; every record lands in the shard as it is stored
    with RecordStore(tmp_path / "session1.sqlite") as s1:
        one = grids.run_grid("nb", grid[1], smoke=False, store=s1, progress=False)
        grids.expert_info("nb", specs[1], smoke=False, store=s1)
    assert set(read_shard(shard)) == {config_key(c) for c in grid[1]} | {config_key(grids.expert_info_config(specs[1]))}
    # session 2: a fresh store, and seed 1's experts gone: the shard is imported, seed 0 computed
    (experts[1] / "a.safetensors").unlink()
    runner.release()
    with RecordStore(tmp_path / "session2.sqlite") as s2:
        records = grids.run_grid("nb", grid[0] + grid[1], smoke=False, store=s2, progress=False)
        info, loaded = grids.expert_info("nb", specs[1], smoke=False, store=s2)
    assert runner.comparable(records[len(records) - len(one) :]) == runner.comparable(one)
    assert not loaded and [e["task"] for e in info] == TASKS
    assert len(read_shard(shard)) == len(grid[0]) + len(grid[1]) + 1


def test_smoke_never_writes_into_results(results_dir, tmp_path):
    spec, grid = synthetic_grid(write_experts(tmp_path / "experts0", 0), 0)
    with RecordStore(tmp_path / "smoke.sqlite") as s:
        grids.run_grid("nb", grid, smoke=True, store=s, progress=False)
        grids.expert_info("nb", spec, smoke=True, store=s)
        assert grids.import_shards(smoke=True, store=s) == {}
        assert len(s) == len(grid) + 1
    assert not results_dir.exists()


def test_notebook_grids_take_some_seeds_and_refuse_others():
    all_seeds = grids.notebook_grid("05_drm", smoke=True)
    assert {s["seed"] for s in all_seeds.specs} == {0}
    full_one = grids.notebook_grid("05_drm", seeds=[1])
    assert {s["seed"] for s in full_one.specs} == {1} and full_one.configs
    assert all(c["pool"]["seed"] == 1 and not c["pool"]["smoke"] for c in full_one.configs)
    with pytest.raises(ValueError, match=r"seed 3 is not one of 05_drm's seeds \[0, 1, 2\]"):
        grids.notebook_grid("05_drm", seeds=[3])
    with pytest.raises(ValueError, match="no record grid for notebook '99_x'"):
        grids.notebook_grid("99_x")


# --- python -m lib records -------------------------------------------------------------------------


@pytest.fixture
def cli_store(monkeypatch, tmp_path, filled):
    monkeypatch.setattr(paths, "RESULTS", tmp_path / "results")
    monkeypatch.setenv("SPECTRAL_MERGE_RECORDS", str(tmp_path / "cli.sqlite"))
    shard = tmp_path / "results" / "records" / "nb.jsonl"
    filled.export_rows(CONFIGS, shard)
    return shard


def test_records_import_loads_every_shard_by_default(cli_store, capsys, tmp_path):
    rc, out, err = run_cli(capsys, "records", "import")
    assert rc == 0 and f"{cli_store}: 3 imported, 0 there already" in out
    rc, out, err = run_cli(capsys, "records", "import", cli_store)
    assert rc == 0 and "0 imported, 3 there already" in out
    with RecordStore(tmp_path / "cli.sqlite") as s:
        assert len(s) == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["records", "import", "missing.jsonl"], "cannot read shard missing.jsonl"),
        (["records", "import", "--seeds", "1"], "--seeds and --executor go with"),
        (["records", "export"], "name the notebook"),
        (["records", "export", "99_x"], "no record grid for notebook '99_x'"),
        (["records", "export", "05_drm", "--seeds", "7"], "seed 7 is not one of 05_drm's seeds"),
        (["records", "compute", "04_star", "05_drm", "--out", "x.jsonl"], "--out goes with `records export`"),
        (["records", "export", "04_star", "05_drm", "--out", "x.jsonl"], "--out takes one notebook"),
        (["records", "import", "--delete-stale"], "--delete-stale goes with `records` alone"),
        (["records", "show", "extra"], "takes no arguments"),
    ],
)
def test_records_bad_input_is_one_line(cli_store, capsys, argv, message):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 1 and message in error_line(err)


def test_records_import_of_a_bad_shard_names_the_line_and_imports_nothing(cli_store, capsys, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_bytes(cli_store.read_bytes())
    tamper(cli_store, 3, lambda r: r["payload"][0].update(value=0.1))
    rc, out, err = run_cli(capsys, "records", "import", good, cli_store)
    assert rc == 1 and error_line(err).startswith(f"error: {cli_store}:3: ") and "checksum" in err
    assert not (tmp_path / "cli.sqlite").exists() or len(RecordStore(tmp_path / "cli.sqlite")) == 0


def test_records_export_of_an_empty_store_is_an_error_and_an_unknown_action_is_argparse_s(cli_store, capsys):
    rc, out, err = run_cli(capsys, "records", "export", "05_drm")
    assert rc == 1 and "no record store at" in error_line(err)
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "records", "bogus")
    assert exit_.value.code == 2


def test_records_export_writes_what_the_store_has_of_a_notebook_s_grid(cli_store, capsys, tmp_path):
    g = grids.notebook_grid("06_mergeability")
    with RecordStore(tmp_path / "cli.sqlite") as s:
        s.put(g.configs[1], payload(0.4), seconds=2.0)
    out_path = tmp_path / "out.jsonl"
    rc, out, err = run_cli(capsys, "records", "export", "06_mergeability", "--out", out_path)
    assert rc == 0 and f"1 rows of 06_mergeability's grid exported (1 new), {len(g.configs)} not in the store" in out
    assert list(read_shard(out_path)) == [config_key(g.configs[1])]
