"""The record store (lib.store): round trip, keys of canonical configurations, rows that cannot
be trusted are errors naming their key, method versions, one transaction per record."""

from __future__ import annotations

import dataclasses
import math
import sqlite3

import pytest

from lib import store as store_module
from lib.merge import METHODS
from lib.store import CorruptRecord, ForeignRecord, RecordStore, config_key, method_version

CONFIG = {
    "record": "merge",
    "pool": {"name": "p", "seed": 0, "tasks": ["a", "b"]},
    "subset": ["a", "b"],
    "method": "ties",
    "hparams": {"density": 0.2, "lam": 1.0, "scope": "model"},
    "version": method_version("ties"),
}
PAYLOAD = [
    {"task": "a", "metric": "accuracy", "value": 0.875, "merge_s": 0.1},
    {"task": "b", "metric": "mcc", "value": float("nan"), "merge_s": 0.1},
]


@pytest.fixture
def store(tmp_path):
    with RecordStore(tmp_path / "records.sqlite") as s:
        yield s


def test_round_trip_keeps_every_value_and_nan(store):
    key = store.put(CONFIG, PAYLOAD, seconds=1.5)
    assert key == config_key(CONFIG) and len(store) == 1
    got = store.get(CONFIG)
    assert got[0] == PAYLOAD[0] and math.isnan(got[1]["value"]) and got[1]["task"] == "b"
    assert store.get({**CONFIG, "subset": ["b", "a"]}) is None
    assert store.have([CONFIG, {**CONFIG, "method": "x"}]) == [True, False]


def test_default_path_is_under_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECTRAL_MERGE_CACHE", str(tmp_path))
    assert store_module.default_path() == tmp_path.resolve() / "records.sqlite"


def test_the_key_is_the_canonical_configuration():
    shuffled = dict(reversed(list(CONFIG.items())))
    assert config_key(shuffled) == config_key(CONFIG)
    assert config_key({**CONFIG, "subset": ("a", "b")}) == config_key(CONFIG)
    assert config_key({**CONFIG, "hparams": {**CONFIG["hparams"], "density": 0.5}}) != config_key(CONFIG)
    with pytest.raises(ValueError, match="plain JSON"):
        config_key({**CONFIG, "hparams": {"density": float("nan")}})


def test_the_first_row_of_a_key_wins(store):
    store.put(CONFIG, PAYLOAD)
    store.put(CONFIG, [{"value": 0.0}])
    assert store.get(CONFIG)[0]["value"] == 0.875


def test_a_foreign_row_is_an_error_naming_its_key(store):
    key = store.put(CONFIG, PAYLOAD)
    with sqlite3.connect(store.path) as conn:
        conn.execute(
            "update records set config = ? where key = ?",
            (store_module.canonical({**CONFIG, "method": "average"}), key),
        )
    with pytest.raises(ForeignRecord, match=key):
        store.get(CONFIG)
    with pytest.raises(ForeignRecord, match=key):
        store.put(CONFIG, PAYLOAD)


@pytest.mark.parametrize("payload", ['[{"value": 0.5}]', "[{not json"])
def test_a_corrupt_row_is_an_error_naming_its_key(store, payload):
    key = store.put(CONFIG, PAYLOAD)
    with sqlite3.connect(store.path) as conn:
        conn.execute("update records set payload = ? where key = ?", (payload, key))
    with pytest.raises(CorruptRecord, match=f"{key}.*checksum"):
        store.get(CONFIG)
    if payload.startswith("[{not"):  # even with a matching checksum, it must parse
        with sqlite3.connect(store.path) as conn:
            conn.execute("update records set checksum = ? where key = ?", (store_module._checksum(payload), key))
        with pytest.raises(CorruptRecord, match=f"{key}.*not JSON"):
            store.get(CONFIG)


def test_a_new_version_or_new_defaults_invalidate_a_method_s_records(store, monkeypatch):
    store.put(CONFIG, PAYLOAD)
    before = method_version("ties")
    ties = METHODS["ties"]
    if getattr(ties, "version", None) is not None:  # the registry versions the method's code
        monkeypatch.setitem(METHODS, "ties", dataclasses.replace(ties, version=ties.version + 1))
    else:
        monkeypatch.setitem(store_module.VERSIONS, "ties", 2)
    assert method_version("ties") != before
    assert store.get({**CONFIG, "version": method_version("ties")}) is None
    assert [r["key"] for r in store.stale()] == [config_key(CONFIG)]
    monkeypatch.setitem(METHODS, "ties", ties)
    monkeypatch.delitem(store_module.VERSIONS, "ties", raising=False)
    assert method_version("ties") == before and store.stale() == []
    monkeypatch.setitem(METHODS, "ties", dataclasses.replace(ties, defaults={**ties.defaults, "density": 0.3}))
    assert method_version("ties") != before
    assert store.delete(r["key"] for r in store.stale()) == 1 and len(store) == 0
    assert method_version("expert") == method_version("alone")


def test_a_write_that_fails_leaves_no_row(store):
    store.put(CONFIG, PAYLOAD)
    with pytest.raises(TypeError):
        store.put({**CONFIG, "method": "average"}, [{"value": object()}])
    conn = store.conn
    with pytest.raises(sqlite3.IntegrityError), conn:  # a transaction that fails half-way is rolled back
        conn.execute(
            "insert into records (key, method, version, config, payload, checksum, written_at)"
            " values ('k', 'm', 'v', '{}', '[]', 'c', 0)"
        )
        conn.execute("insert into records (key) values ('k2')")  # not null constraints fail
    assert store.keys() == {config_key(CONFIG)}


def test_the_store_is_in_wal_mode_and_pickles_as_its_path(store):
    import pickle

    store.put(CONFIG, PAYLOAD)
    assert store.conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    again = pickle.loads(pickle.dumps(store))
    assert again.path == store.path and again.get(CONFIG)[0] == PAYLOAD[0]
    again.close()
