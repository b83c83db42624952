"""The grid runner (lib.runner) and its executors (lib.executors): a killed grid resumes and
computes exactly the missing records; inline, processes:2, a Dask LocalCluster and submitit's
local executor give the same records; a failing record names itself and keeps the finished ones.

The pools are synthetic (``SyntheticExperts``): three tiny experts saved as safetensors files in
a folder that workers load by path, scored by a deterministic function of the merged body, so
the whole file runs in well under a minute. ``GRID_TEST_LOG`` (a file each evaluation appends a
line to) counts what was computed; ``GRID_TEST_DELAY`` slows evaluations so a run can be
killed half-way.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lib import executors, pool, runner, sweep
from lib.store import RecordStore, config_key

TASKS = ["a", "b", "c"]
SOURCE = f"{__name__}:SyntheticExperts"
RUNS = [pool.canonical_run("average"), pool.canonical_run("ties")]


class SyntheticPool(pool.Pool):
    def evaluator(self, subset):
        log, delay = os.environ.get("GRID_TEST_LOG"), float(os.environ.get("GRID_TEST_DELAY", "0"))

        def evaluate(body):
            if log:
                with open(log, "a") as fh:
                    fh.write(f"{'+'.join(subset)} {sweep.fingerprint(body)}\n")
            time.sleep(delay)
            return {
                t: {"accuracy": float(torch.exp(-sum(((body[k] - self.bodies[t][k]) ** 2).sum() for k in body)))}
                for t in subset
            }

        return evaluate


class SyntheticExperts:
    """Experts ``<folder>/<task>.safetensors`` around ``<folder>/base.safetensors``."""

    @staticmethod
    def experts(spec):
        return {t: f"synthetic:{spec['seed']}:{t}" for t in spec["tasks"]}

    @staticmethod
    def evaluation(spec):
        return {"score": "exp(-|body - expert|^2)"}

    @staticmethod
    def prepare(spec):
        pass

    @staticmethod
    def build(spec):
        from safetensors.torch import load_file

        folder = Path(spec["folder"])
        files = {t: folder / f"{t}.safetensors" for t in ["base", *spec["tasks"]]}
        for name, path in files.items():
            if not path.is_file():
                raise FileNotFoundError(f"expert {name} of pool {spec['name']} seed {spec['seed']} is missing: {path}")
        sds = {name: load_file(path) for name, path in files.items()}
        bodies = {t: sds[t] for t in spec["tasks"]}
        return SyntheticPool(
            name=spec["name"],
            kind="synthetic",
            seed=spec["seed"],
            smoke=spec["smoke"],
            base=sds["base"],
            bodies=bodies,
            heads=bodies,
            expert_info=[{"task": t, "key": f"synthetic:{spec['seed']}:{t}"} for t in spec["tasks"]],
        )


def write_experts(folder: Path, seed: int) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base = {"layer.weight": torch.randn(6, 6, generator=g), "layer.bias": torch.randn(6, generator=g)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, folder / "base.safetensors")
    for t in TASKS:
        save_file(
            {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}, folder / f"{t}.safetensors"
        )
    return folder


def grid(folder: Path, seed: int = 0, subsets=(("a", "b"), ("a", "c")), runs=RUNS, alone=True) -> list[dict]:
    spec = runner.pool_spec(TASKS, seed=seed, smoke=True, name="synthetic", source=SOURCE, folder=str(folder))
    return runner.pool_grid(spec, subsets, runs, alone=alone)


@pytest.fixture
def experts(tmp_path):
    return write_experts(tmp_path / "experts0", 0)


@pytest.fixture(autouse=True)
def fresh_workers(monkeypatch, tmp_path):
    """Each test starts without pools memoised in this process, with its own cache."""
    monkeypatch.setenv("SPECTRAL_MERGE_CACHE", str(tmp_path / "cache"))
    runner.release()
    yield
    runner.release()


def logged(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def reference(configs) -> list[dict]:
    """Today's records: the same pool merged by lib.pool's own loop."""
    spec = configs[0]["pool"]
    r = pool.PoolRunner(SyntheticExperts.build(spec), progress=False)
    subsets = list(dict.fromkeys(tuple(c["subset"]) for c in configs if c["record"] == "merge"))
    return r.alone() + r.run(subsets, RUNS)


def test_inline_grid_gives_lib_pool_s_records_and_stores_each(experts, tmp_path):
    configs = grid(experts)
    store = RecordStore(tmp_path / "records.sqlite")
    records = runner.run_grid(configs, store=store, progress=False)
    assert len(store) == len(configs) == 5
    assert runner.comparable(records) == runner.comparable(reference(configs))
    assert records[0]["method"] == "expert" and records[-1]["run"] == RUNS[1].label()
    assert runner.assemble(configs, store) == records


def test_configurations_hold_the_experts_method_version_and_evaluation(experts):
    merge = grid(experts)[1]
    assert merge["pool"]["experts"] == {t: f"synthetic:0:{t}" for t in TASKS}
    assert merge["hparams"] == {"weights": None} and merge["version"].startswith("1-")
    assert merge["pool"]["evaluation"] and merge["subset"] == ["a", "b"]
    assert runner.describe(merge) == "synthetic seed 0: a+b average(weights=None)"


def test_a_grid_computes_only_what_the_store_lacks(experts, tmp_path, monkeypatch):
    log = tmp_path / "evaluations.log"
    monkeypatch.setenv("GRID_TEST_LOG", str(log))
    store = RecordStore(tmp_path / "records.sqlite")
    runner.run_grid(grid(experts, alone=False), store=store, progress=False)
    assert len(logged(log)) == 4
    runner.release()
    wider = grid(experts, subsets=(("a", "b"), ("a", "c"), ("b", "c")), alone=False)  # another notebook's grid
    done, todo = runner.plan(wider, store)
    assert (len(done), len(todo)) == (4, 2)
    records = runner.run_grid(wider + wider[:1], store=store, progress=False)  # a repeated config: once
    assert len(logged(log)) == 6 and len(records) == 6 * 2  # two tasks per merged pair


def test_a_failing_record_names_itself_and_keeps_the_finished_ones(experts, tmp_path):
    second = write_experts(tmp_path / "experts1", 1)
    configs = grid(experts) + grid(second, seed=1)
    (second / "b.safetensors").unlink()
    store = RecordStore(tmp_path / "records.sqlite")
    with pytest.raises(runner.GridError, match=r"synthetic seed 1: experts and base alone \(key \w+\).*b\.safetensors"):
        runner.run_grid(configs, store=store, progress=False)
    assert len(store) == 5 and runner.plan(configs[:5], store)[1] == []
    with pytest.raises(KeyError, match="synthetic seed 1"):
        runner.assemble(configs, store)


def test_a_corrupt_stored_record_stops_the_grid_before_any_work(experts, tmp_path, monkeypatch):
    from lib.store import CorruptRecord, config_key

    configs = grid(experts, alone=False)
    store = RecordStore(tmp_path / "records.sqlite")
    runner.run_grid(configs[:2], store=store, progress=False)
    key = config_key(configs[1])
    with sqlite3.connect(store.path) as conn:
        conn.execute("update records set payload = '[]' where key = ?", (key,))
    log = tmp_path / "evaluations.log"
    monkeypatch.setenv("GRID_TEST_LOG", str(log))
    with pytest.raises(CorruptRecord, match=key):
        runner.run_grid(configs, store=store, progress=False)
    assert logged(log) == [] and len(store) == 2


def test_a_cached_expert_missing_is_an_error_naming_it(tmp_path):
    spec = runner.pool_spec(["fashion_mnist", "kmnist"], seed=0, smoke=True, variant="mnist_base")
    assert set(spec["experts"]) == {"fashion_mnist", "kmnist", "mnist (base)"}
    with pytest.raises(
        FileNotFoundError, match=r"expert fashion_mnist \(seed 0, mnist_base, SMOKE mode\).*make experts"
    ):
        runner.CachedExperts.build(spec)


KILLED_RUN = """
import sys
from lib import runner
from lib.store import RecordStore, config_key
from test_runner import grid
runner.run_grid(grid(sys.argv[1], subsets={subsets!r}, alone=False), store=RecordStore(sys.argv[2]), progress=False)
"""
SUBSETS = (("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c"))


def kill_after_records(argv: list[str], *, env: dict, path: Path, k: int, timeout: float = 60) -> None:
    """Start ``argv`` (a grid run storing into ``path``) and SIGKILL it once the store holds ``k`` records."""
    proc = subprocess.Popen(argv, env=env)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                with sqlite3.connect(path) as conn:
                    try:
                        if conn.execute("select count(*) from records").fetchone()[0] >= k:
                            break
                    except sqlite3.OperationalError:  # the table is not created yet
                        pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the grid finished before it could be killed"


def test_a_killed_grid_resumes_and_computes_exactly_the_missing_records(experts, tmp_path, monkeypatch):
    configs = grid(experts, subsets=SUBSETS, alone=False)
    uninterrupted = runner.run_grid(configs, store=RecordStore(tmp_path / "reference.sqlite"), progress=False)
    runner.release()

    path, k = tmp_path / "records.sqlite", 3
    env = {
        **os.environ,
        "GRID_TEST_DELAY": "0.4",
        "GRID_TEST_LOG": str(tmp_path / "killed.log"),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    kill_after_records(
        [sys.executable, "-c", KILLED_RUN.format(subsets=SUBSETS), str(experts), str(path)], env=env, path=path, k=k
    )
    store = RecordStore(path)
    stored = len(store)
    assert k <= stored < len(configs)

    log = tmp_path / "rerun.log"
    monkeypatch.setenv("GRID_TEST_LOG", str(log))
    missing = runner.plan(configs, store)[1]
    resumed = runner.run_grid(configs, store=store, progress=False)
    assert len(logged(log)) == len(missing) == len(configs) - stored  # one evaluation per missing record
    assert {line.split()[0] for line in logged(log)} == {"+".join(c["subset"]) for c in missing}
    assert runner.comparable(resumed) == runner.comparable(uninterrupted)


@pytest.fixture
def inline_records(experts, tmp_path):
    """The inline records of ``grid(experts)`` and their store; the pool is released after."""
    store = RecordStore(tmp_path / "inline.sqlite")
    records = runner.run_grid(grid(experts), store=store, progress=False)
    runner.release()
    return runner.comparable(records), store


def test_processes_give_the_inline_records(experts, inline_records, tmp_path):
    with executors.make_executor("processes:2") as ex:
        assert ex.threads == executors.threads_per_worker(2)
        got = runner.run_grid(
            grid(experts), store=RecordStore(tmp_path / "processes.sqlite"), executor=ex, progress=False
        )
    assert runner.comparable(got) == inline_records[0]


def test_a_dask_local_cluster_gives_the_inline_records(experts, inline_records, tmp_path):
    pytest.importorskip("distributed")
    ex = executors.make_executor("dask:local:2", processes=False)
    try:
        got = runner.run_grid(grid(experts), store=RecordStore(tmp_path / "dask.sqlite"), executor=ex, progress=False)
    finally:
        ex.shutdown()
    assert runner.comparable(got) == inline_records[0]


def test_submitit_s_local_executor_gives_the_inline_records(experts, inline_records, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    # submitit starts a fresh interpreter per record: it must find this module (the pool source)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    small = grid(experts)[:3]
    got = runner.run_grid(
        small, store=RecordStore(tmp_path / "submitit.sqlite"), executor="submitit:local", progress=False
    )
    assert runner.comparable(got) == runner.comparable(runner.assemble(small, inline_records[1]))
    assert (tmp_path / "cache" / "submitit").is_dir()  # its job files live in the cache


def test_unknown_executors_and_missing_packages_are_one_line_errors(monkeypatch):
    for spec, message in [
        ("threads:2", "unknown executor 'threads:2'"),
        ("processes:0", "N >= 1"),
        ("processes", "N >= 1"),
        ("slurm:partition", "KEY=VALUE"),
    ]:
        with pytest.raises(ValueError, match=message):
            executors.make_executor(spec)
    monkeypatch.setitem(sys.modules, "submitit", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="pip install submitit"):
        executors.make_executor("submitit:local")
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ValueError, match="dask and distributed"):
        executors.make_executor("dask:local")
    assert isinstance(executors.make_executor(None), executors.InlineExecutor)
    monkeypatch.setenv("EXECUTOR", "processes:4")
    assert executors.from_env() == "processes:4"


def test_expected_wall_time_spreads_the_records_and_keeps_the_serial_part():
    records = (
        [  # two models of two tasks each (their timing fields repeat per row), one of one task
            {
                "pool": "p",
                "seed": 0,
                "run": "a",
                "model": "merged",
                "task": t,
                "prepass_s": 1.0,
                "merge_s": 2.0,
                "eval_s": 7.0,
            }
            for t in "xy"
        ]
        + [
            {
                "pool": "p",
                "seed": 0,
                "run": "b",
                "model": "merged",
                "task": t,
                "prepass_s": 0.0,
                "merge_s": 1.0,
                "eval_s": 29.0,
            }
            for t in "xy"
        ]
        + [{"pool": "p", "seed": 1, "run": "a", "model": "merged", "task": "x", "merge_s": 5.0, "eval_s": 5.0}]
    )
    times = runner.record_seconds(records)
    assert sorted(times.values()) == [10.0, 10.0, 30.0]
    plan = runner.expected_wall_seconds(times.values(), serial_s=50.0, workers=(1, 2, 16))
    assert plan["records"] == 3 and plan["parallel_s"] == 50.0
    assert plan["wall_s"] == {1: 100.0, 2: 80.0, 16: 80.0}  # never below the longest record (30 s)
    # a second notebook reusing one of these models counts it once, where it was first computed
    results = {
        "first": {"records": records, "total": 100.0},
        "second": {"records": records[:2] + [{**records[0], "run": "c", "eval_s": 17.0}], "total": 40.0},
    }
    rows = runner.cluster_plan(results, lambda r: r["total"], workers=(1, 4))
    assert [r["records"] for r in rows] == [3, 1, 4]
    assert rows[1]["serial_s"] == 20.0 and rows[2]["serial_s"] == 70.0
    assert rows[2]["wall_s"] == {1: 140.0, 4: 100.0}
    # records without a pool (notebooks 01-03) never match another notebook's
    bare = [{k: v for k, v in r.items() if k != "pool"} for r in records]
    rows = runner.cluster_plan(
        {"a": {"records": bare, "total": 60.0}, "b": {"records": bare, "total": 60.0}},
        lambda r: r["total"],
        workers=(1,),
    )
    assert [r["records"] for r in rows] == [3, 3, 6]


# --- experts trained with extra fit_expert keywords (expert_kw: LoRA experts, smaller recipes) -------


def test_a_spec_without_expert_kw_keeps_the_record_keys_stored_before_it(experts, tmp_path, monkeypatch):
    """Records stored under a pool spec as it was spelled before ``expert_kw`` existed (no such
    entry) are found by today's grid, and a grid asking for other experts finds none of them."""
    log = tmp_path / "evaluations.log"
    monkeypatch.setenv("GRID_TEST_LOG", str(log))
    old_spec = {
        "name": "synthetic",
        "tasks": TASKS,
        "seed": 0,
        "smoke": True,
        "variant": None,
        "source": SOURCE,
        "folder": str(experts),
        "experts": {t: f"synthetic:0:{t}" for t in TASKS},
        "evaluation": {"score": "exp(-|body - expert|^2)"},
    }
    old = [runner.merge_config(old_spec, s, r.method, r.hparams()) for s in (("a", "b"), ("a", "c")) for r in RUNS]
    store = RecordStore(tmp_path / "records.sqlite")
    runner.run_grid(old, store=store, progress=False)
    assert len(logged(log)) == 4
    today = grid(experts, alone=False)
    assert "expert_kw" not in today[0]["pool"]
    assert (
        runner.pool_spec(TASKS, seed=0, smoke=True, name="synthetic", source=SOURCE, folder=str(experts), expert_kw={})[
            "experts"
        ]
        == old_spec["experts"]
    )
    done, todo = runner.plan(today, store)
    assert (len(done), len(todo)) == (4, 0)
    spec = runner.pool_spec(
        TASKS, seed=0, smoke=True, name="synthetic", source=SOURCE, folder=str(experts), expert_kw={"lora": True}
    )
    assert spec["expert_kw"] == {"lora": True}
    other = runner.pool_grid(spec, (("a", "b"), ("a", "c")), RUNS, alone=False)
    done, todo = runner.plan(other, store)
    assert (len(done), len(todo)) == (0, 4)
    runner.run_grid(other, store=store, progress=False)
    assert len(logged(log)) == 8 and len(store) == 8  # the LoRA records beside the full ones, none replaced


def test_cached_experts_with_expert_kw_are_lora_experts_under_their_own_keys():
    from lib import cache as expert_cache
    from lib.lora_pool import lora_pool_spec

    tasks = ["sst2", "emotion"]
    full = runner.pool_spec(tasks, seed=0, smoke=True)
    lora = lora_pool_spec(tasks, seed=0, smoke=True)
    assert "expert_kw" not in full and lora["expert_kw"] == {"lora": True} and lora["name"] == "text-lora"
    assert full["experts"] == {
        t: expert_cache.config_key(expert_cache.expert_config(t, seed=0, smoke=True)) for t in tasks
    }
    assert lora["experts"] == {
        t: expert_cache.config_key(expert_cache.expert_config(t, seed=0, smoke=True, lora=True)) for t in tasks
    }
    assert all(lora["experts"][t] != full["experts"][t] for t in tasks)
    assert all(c["lora"] for c in runner.CachedExperts._configs(lora).values())
    assert not any("lora" in c for c in runner.CachedExperts._configs(full).values())
    assert config_key(runner.alone_config(full)) != config_key(runner.alone_config(lora))
    with pytest.raises(FileNotFoundError, match=r"expert sst2 \(seed 0, .*SMOKE mode\).*make experts"):
        runner.CachedExperts.build(lora)
