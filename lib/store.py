"""The record store: every merged-and-evaluated record, written the moment it is computed.

One SQLite database (the standard library's :mod:`sqlite3`) under the cache directory,
``$SPECTRAL_MERGE_CACHE/records.sqlite`` by default, so a killed grid resumes where it stopped
and a merge that two notebooks ask for is computed once. Anyone can read it::

    sqlite3 .cache/records.sqlite "select method, count(*) from records group by method"
    pd.read_sql("select * from records", sqlite3.connect(".cache/records.sqlite"))

A *configuration* is a JSON-able dict that says everything a record depends on (for a pool
merge, :mod:`lib.runner` puts in the experts and their cache keys, the seed, the subset, the
method with its resolved hyperparameters and version, the merge keyword arguments, the head and
the evaluation split). Its key is the hash of its canonical JSON (:func:`canonical`: sorted
keys, no spaces), so equal configurations have one key whatever order their fields came in.
A *payload* is what the configuration produced: the list of tidy records of
:func:`lib.sweep.run_sweep` (one per task and metric).

Each row holds the key, the canonical configuration, the payload as JSON and a SHA-256
checksum of that JSON. Reading a row checks both, so a row is never silently reused:

* a row under the key whose stored configuration is not the one asked for (a hash collision, a
  row written by other code, a hand edit) is :class:`ForeignRecord`, naming the key;
* a row whose payload does not match its checksum or is not JSON is :class:`CorruptRecord`,
  naming the key.

Writing is one transaction per record (``with connection:``) in WAL mode with
``synchronous=FULL``: after :meth:`RecordStore.put` returns the row survives a SIGKILL or a
power loss, and a writer killed half-way leaves no row at all. The grid runner is the single
writer of its grid (workers return payloads to it); two runners sharing one store (two notebooks
at once) are serialised by SQLite's lock, and the first row written for a key wins
(``INSERT OR IGNORE``) -- the same configuration gives the same values, only its timings differ.

Method versions. A record is only as good as the code that made it: :func:`method_version`
is the registry's ``version`` of the method (``lib.merge.METHODS[name].version``; where a
registry has none, ``VERSIONS[method]``, default 1) plus a hash of its registered defaults, and the
runner puts it in every configuration, so bumping a method's version after
changing its code -- or changing, adding or removing one of its defaults -- gives its records
new keys: the old rows are no longer found (recomputed on the next run) and
:meth:`RecordStore.stale` lists them for deletion. Bump the registry's ``version`` after changing
a method's code; :data:`VERSIONS` versions what the registry does not hold (``alone``).

Shards. The store lives in the cache, which is not committed, so a grid longer than one session
would never finish. :meth:`RecordStore.export_rows` writes rows to a *shard*, a committed
JSON-lines file (``results/records/<notebook>.jsonl``: one row a line, sorted by key, each line
``key``, ``method``, ``version``, ``seconds``, ``checksum``, ``config``, ``payload``), and
:meth:`RecordStore.import_rows` loads one into a fresh store, so a grid can be computed seed by
seed over several sessions. Both check what :meth:`get` checks (the configuration hashes to the
key, the payload to the checksum): a bad line is :class:`ShardError` naming the file and line.
Exporting merges into the shard already there: its rows are kept, new ones are added, and a row
under the same key holding another configuration or payload is an error naming the key (never an
overwrite). Importing is ``INSERT OR IGNORE`` in one transaction: a row already in the store is
counted, not replaced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import paths

#: method -> version of its code; bump an entry when the method's results change for the same
#: hyperparameters (a method not listed is version 1). "alone" versions the records of experts
#: and bases scored on their own (``method`` "expert"/"base").
VERSIONS: dict[str, int] = {}

SCHEMA = """
create table if not exists records (
    key        text primary key,   -- sha256 of the canonical configuration (first 32 hex digits)
    method     text not null,      -- config['method'], for queries
    version    text not null,      -- config['version'] (method_version), for stale()
    config     text not null,      -- canonical JSON of the configuration
    payload    text not null,      -- JSON list of tidy records
    checksum   text not null,      -- sha256 of payload
    seconds    real,               -- wall seconds the record took to compute, where known
    written_at real not null       -- unix time of the write
)
"""


class StoreError(RuntimeError):
    """A row of the record store cannot be trusted."""


class ForeignRecord(StoreError):
    """The row under a key holds another configuration than the one asked for."""


class CorruptRecord(StoreError):
    """The row under a key fails its checksum or is not JSON."""


class ShardError(StoreError):
    """A line of a shard cannot be trusted, or two rows under one key differ."""


#: the fields of a shard's line, in the order they are written
SHARD_FIELDS = ("key", "method", "version", "seconds", "checksum", "config", "payload")
KEY_DIGITS = 32


def default_path() -> Path:
    """``$SPECTRAL_MERGE_RECORDS`` if set (a store of its own, e.g. on a shared filesystem), else
    ``$SPECTRAL_MERGE_CACHE/records.sqlite`` (read at call time, like the experts' cache)."""
    if os.environ.get("SPECTRAL_MERGE_RECORDS"):
        return Path(os.environ["SPECTRAL_MERGE_RECORDS"]).expanduser()
    return paths._env_path("SPECTRAL_MERGE_CACHE", paths.ROOT / ".cache") / "records.sqlite"


def canonical(config: Mapping[str, Any]) -> str:
    """The canonical JSON of ``config``: sorted keys, no spaces, tuples as lists. Refuses what
    JSON cannot hold exactly (NaN, objects), so that two equal configurations have one text."""
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"a record configuration must be plain JSON (dicts, lists, str, finite numbers, bool, None): {err}"
        ) from None


def config_key(config: Mapping[str, Any]) -> str:
    """The key of ``config``: the first 32 hex digits of the SHA-256 of :func:`canonical`."""
    return hashlib.sha256(canonical(config).encode()).hexdigest()[:32]


def method_version(method: str) -> str:
    """``"<VERSIONS[method]>-<hash of the registered defaults>"``; methods outside the registry
    (``expert``, ``base``: records of models scored alone) are versioned as ``"alone"``."""
    from .merge import METHODS

    entry = METHODS.get(method)
    defaults = entry.defaults if entry is not None else {}
    # the registry's version of the method's code where it has one, else this module's table
    version = getattr(entry, "version", None)
    if version is None:
        version = VERSIONS.get(method if entry is not None else "alone", 1)
    text = json.dumps(defaults, sort_keys=True, separators=(",", ":"), default=repr)
    return f"{version}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _payload_text(payload: Sequence[Mapping]) -> str:
    # NaN is a legitimate value (an undefined metric); JSON writes it as NaN and reads it back
    return json.dumps(list(payload), separators=(",", ":"), default=paths._json_default)


class RecordStore:
    """The SQLite record store at ``path`` (default :func:`default_path`). Cheap to create; one
    connection per store object, opened on first use."""

    def __init__(self, path: str | os.PathLike | None = None, *, timeout_s: float = 60.0):
        self.path = Path(path) if path is not None else default_path()
        self.timeout_s = timeout_s
        self._conn: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"RecordStore({str(self.path)!r})"

    # pickling a store (a grid's argument) carries its path, never an open connection
    def __getstate__(self):
        return {"path": self.path, "timeout_s": self.timeout_s}

    def __setstate__(self, state):
        self.__init__(state["path"], timeout_s=state["timeout_s"])

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level="DEFERRED")
            conn.execute("pragma journal_mode=wal")
            conn.execute("pragma synchronous=full")  # a committed record survives a power loss
            with conn:
                conn.execute(SCHEMA)
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- writing ---------------------------------------------------------------------------

    def put(self, config: Mapping[str, Any], payload: Sequence[Mapping], *, seconds: float | None = None) -> str:
        """Store ``payload`` under ``config``'s key in one transaction and return the key. A row
        already there for the same configuration is kept (first writer wins); one holding
        another configuration is :class:`ForeignRecord`."""
        text = canonical(config)
        key = config_key(config)
        body = _payload_text(payload)
        with self.conn:
            self.conn.execute(
                "insert or ignore into records (key, method, version, config, payload, checksum, seconds, written_at)"
                " values (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    str(config.get("method", "")),
                    str(config.get("version", "")),
                    text,
                    body,
                    _checksum(body),
                    None if seconds is None or not math.isfinite(seconds) else float(seconds),
                    time.time(),
                ),
            )
        stored = self.conn.execute("select config from records where key = ?", (key,)).fetchone()
        if stored[0] != text:
            raise ForeignRecord(self._foreign_message(key, stored[0], text))
        return key

    # --- reading ---------------------------------------------------------------------------

    def get(self, config: Mapping[str, Any]) -> list[dict] | None:
        """The payload stored for ``config``, or None. A row that fails its checks raises
        :class:`ForeignRecord` or :class:`CorruptRecord` naming its key."""
        text = canonical(config)
        key = config_key(config)
        row = self.conn.execute("select config, payload, checksum from records where key = ?", (key,)).fetchone()
        if row is None:
            return None
        stored_config, body, checksum = row
        if stored_config != text:
            raise ForeignRecord(self._foreign_message(key, stored_config, text))
        if not isinstance(body, str) or _checksum(body) != checksum:
            raise CorruptRecord(
                f"record {key} in {self.path} fails its checksum: its payload changed after it "
                f"was written; delete the row (delete from records where key = '{key}') to "
                "compute it again"
            )
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as err:
            raise CorruptRecord(
                f"record {key} in {self.path} is not JSON ({err}); delete the row to compute it again"
            ) from None
        if not isinstance(payload, list):
            raise CorruptRecord(f"record {key} in {self.path} holds {type(payload).__name__}, not a list of records")
        return payload

    def keys(self) -> set[str]:
        return {k for (k,) in self.conn.execute("select key from records")}

    def have(self, configs: Iterable[Mapping[str, Any]]) -> list[bool]:
        """For each configuration, whether the store has a row under its key (not yet checked:
        :meth:`get` checks)."""
        present = self.keys()
        return [config_key(c) in present for c in configs]

    def __len__(self) -> int:
        return self.conn.execute("select count(*) from records").fetchone()[0]

    def rows(self, items: Iterable[Mapping[str, Any] | str]) -> tuple[dict[str, dict], list[str]]:
        """``(rows, missing)``: the stored rows of ``items`` (configurations, or keys as strings) by
        key, checked as :meth:`get` checks them, and the keys the store lacks. A row is a dict of
        :data:`SHARD_FIELDS` holding the configuration's canonical JSON and the payload's JSON text."""
        wanted: dict[str, str | None] = {}
        for item in items:
            if isinstance(item, str):
                wanted.setdefault(item, None)
            else:
                wanted[config_key(item)] = canonical(item)
        found: dict[str, dict] = {}
        keys = list(wanted)
        for start in range(0, len(keys), 500):  # SQLite's limit on the parameters of one statement
            chunk = keys[start : start + 500]
            query = (
                "select key, method, version, seconds, checksum, config, payload from records"
                f" where key in ({','.join('?' * len(chunk))})"
            )
            for key, method, version, seconds, checksum, config, payload in self.conn.execute(query, chunk):
                asked = wanted[key]
                if asked is not None and config != asked:
                    raise ForeignRecord(self._foreign_message(key, config, asked))
                if asked is None and _config_text_key(config) != key:
                    raise ForeignRecord(
                        f"record {key} in {self.path} holds a configuration whose key is not {key}; delete the row"
                        f" (delete from records where key = '{key}') to compute it again"
                    )
                if not isinstance(payload, str) or _checksum(payload) != checksum:
                    raise CorruptRecord(
                        f"record {key} in {self.path} fails its checksum: its payload changed after it was "
                        f"written; delete the row (delete from records where key = '{key}') to compute it again"
                    )
                found[key] = {
                    "key": key,
                    "method": method,
                    "version": version,
                    "seconds": seconds,
                    "checksum": checksum,
                    "config": config,
                    "payload": payload,
                }
        return found, [k for k in keys if k not in found]

    def export_rows(self, items: Iterable[Mapping[str, Any] | str], path: str | os.PathLike) -> dict[str, int]:
        """Write the stored rows of ``items`` (configurations or keys) into the shard ``path``
        (:func:`write_shard`), merged with the rows the shard holds already: those are kept, new
        ones added; a row under the same key that holds another configuration or payload is
        :class:`ShardError` naming the key, and nothing is written. Items the store lacks are
        skipped (a grid exported half-way is the point). Returns ``exported`` (rows of ``items``
        found), ``added`` (new to the shard), ``kept`` (rows the shard held) and ``missing``."""
        path = Path(path)
        found, missing = self.rows(items)
        existing = read_shard(path) if path.exists() else {}
        merged, added = merge_rows(existing, found, into=path)
        if added or not path.exists():
            write_shard(path, merged)
        return {"exported": len(found), "added": added, "kept": len(existing), "missing": len(missing)}

    def import_rows(self, path: str | os.PathLike) -> dict[str, int]:
        """Load the shard ``path`` into the store in one transaction (``INSERT OR IGNORE``): every
        line is checked first (:func:`read_shard`: a bad line is :class:`ShardError` naming the
        file and line, and nothing is imported). Returns ``imported`` (new rows), ``present`` (the
        store held the same row) and ``differing`` (the store holds another payload for the same
        configuration -- computed again elsewhere, e.g. other timings; the store's row is kept).
        A row whose key holds another configuration in the store is :class:`ShardError`."""
        path = Path(path)
        rows = read_shard(path)
        counts = {"imported": 0, "present": 0, "differing": 0}
        now = time.time()
        with self.conn:
            for key, row in rows.items():
                cursor = self.conn.execute(
                    "insert or ignore into records (key, method, version, config, payload, checksum, seconds, written_at)"
                    " values (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key,
                        row["method"],
                        row["version"],
                        row["config"],
                        row["payload"],
                        row["checksum"],
                        row["seconds"],
                        now,
                    ),
                )
                if cursor.rowcount == 1:
                    counts["imported"] += 1
                    continue
                config, checksum = self.conn.execute(
                    "select config, checksum from records where key = ?", (key,)
                ).fetchone()
                if config != row["config"]:
                    raise ShardError(
                        f"{path}: row {key} holds another configuration than the row under that key in "
                        f"{self.path}; nothing was imported"
                    )
                counts["present" if checksum == row["checksum"] else "differing"] += 1
        return counts

    def stale(self) -> list[dict]:
        """Rows whose method version is no longer :func:`method_version` of their method (the
        method's code or defaults changed since): ``key``, ``method``, stored and current
        version. The runner never reads them (their configurations have other keys now)."""
        out = []
        for key, method, version in self.conn.execute("select key, method, version from records"):
            current = method_version(method)
            if version != current:
                out.append({"key": key, "method": method, "version": version, "current": current})
        return out

    def delete(self, keys: Iterable[str]) -> int:
        """Delete the rows under ``keys`` (e.g. :meth:`stale`'s) in one transaction; how many went."""
        keys = list(keys)
        with self.conn:
            return sum(self.conn.execute("delete from records where key = ?", (k,)).rowcount for k in keys)

    def _foreign_message(self, key: str, stored: str, wanted: str) -> str:
        return (
            f"record {key} in {self.path} holds another configuration than the one asked for "
            f"(stored {stored[:200]}{'...' if len(stored) > 200 else ''}; asked {wanted[:200]}"
            f"{'...' if len(wanted) > 200 else ''}); delete the row (delete from records where key = '{key}')"
            " to compute it again"
        )


# --- shards: rows that travel with the repository --------------------------------------------------


def _config_text_key(text: str) -> str | None:
    try:
        return config_key(json.loads(text))
    except (ValueError, TypeError):
        return None


def _row_line(row: Mapping[str, Any]) -> str:
    # the configuration and the payload as JSON objects (readable, diffable); the payload keeps its
    # field order, so writing it again with _payload_text gives the text its checksum was taken of
    obj = {
        "key": row["key"],
        "method": row["method"],
        "version": row["version"],
        "seconds": row["seconds"],
        "checksum": row["checksum"],
        "config": json.loads(row["config"]),
        "payload": json.loads(row["payload"]),
    }
    return json.dumps(obj, separators=(",", ":"))


def parse_line(text: str, where: str) -> dict:
    """One shard line, checked as :meth:`RecordStore.get` checks a row (its configuration hashes
    to its key, its payload to its checksum), as a row of :meth:`RecordStore.rows`. ``where``
    (``file:line``) starts every error."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ShardError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise ShardError(f"{where}: a line holds one JSON object, not {type(obj).__name__}")
    absent = [f for f in SHARD_FIELDS if f not in obj]
    extra = sorted(set(obj) - set(SHARD_FIELDS))
    if absent or extra:
        raise ShardError(
            f"{where}: a row has the fields {', '.join(SHARD_FIELDS)}"
            + (f"; missing {', '.join(absent)}" if absent else "")
            + (f"; unknown {', '.join(extra)}" if extra else "")
        )
    key = obj["key"]
    if not (isinstance(key, str) and len(key) == KEY_DIGITS and all(c in "0123456789abcdef" for c in key)):
        raise ShardError(f"{where}: key {str(key)[:40]!r} is not {KEY_DIGITS} lowercase hex digits")
    config = obj["config"]
    if not isinstance(config, dict):
        raise ShardError(f"{where}: row {key}: its configuration is {type(config).__name__}, not an object")
    try:
        config_text = canonical(config)
    except ValueError as err:
        raise ShardError(f"{where}: row {key}: {err}") from None
    if config_key(config) != key:
        raise ShardError(
            f"{where}: row {key}: its configuration hashes to {config_key(config)}, not its key "
            "(the configuration was changed after it was exported)"
        )
    payload = obj["payload"]
    if not isinstance(payload, list) or not all(isinstance(r, dict) for r in payload):
        raise ShardError(f"{where}: row {key}: its payload is not a list of records")
    body = _payload_text(payload)
    if _checksum(body) != obj["checksum"]:
        raise ShardError(f"{where}: row {key}: its payload fails its checksum (it was changed after it was exported)")
    for field in ("method", "version"):
        if obj[field] != str(config.get(field, "")):
            raise ShardError(
                f"{where}: row {key}: {field} {obj[field]!r} is not its configuration's {config.get(field)!r}"
            )
    seconds = obj["seconds"]
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds)
    ):
        raise ShardError(f"{where}: row {key}: seconds {seconds!r} is not a finite number or null")
    return {
        "key": key,
        "method": obj["method"],
        "version": obj["version"],
        "seconds": None if seconds is None else float(seconds),
        "checksum": obj["checksum"],
        "config": config_text,
        "payload": body,
    }


def _same(a: Mapping, b: Mapping) -> bool:
    return a["config"] == b["config"] and a["checksum"] == b["checksum"]


def read_shard(path: str | os.PathLike) -> dict[str, dict]:
    """The rows of the shard ``path`` by key, every line checked (:func:`parse_line`); blank lines
    are skipped, a key twice is allowed only for the same row."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ShardError(f"cannot read shard {path}: {getattr(err, 'strerror', None) or err}") from None
    rows: dict[str, dict] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = parse_line(line, f"{path}:{number}")
        key = row["key"]
        if key in rows and not _same(rows[key], row):
            raise ShardError(f"{path}:{number}: row {key} differs from the row under the same key on line {lines[key]}")
        rows.setdefault(key, row)
        lines.setdefault(key, number)
    return rows


def write_shard(path: str | os.PathLike, rows: Mapping[str, Mapping]) -> Path:
    """Write ``rows`` (key -> row) to ``path`` atomically, one JSON object a line, sorted by key
    (two exports of the same rows give the same bytes; new rows are new lines in a diff)."""
    lines = []
    for key in sorted(rows):
        line = _row_line(rows[key])
        if not _same(parse_line(line, f"{path} (row {key})"), rows[key]):  # what is written reads back the same
            raise ShardError(f"row {key} does not read back as written; not writing {path}")
        lines.append(line + "\n")
    return paths.atomic_write_bytes(path, "".join(lines).encode())


def merge_rows(existing: Mapping[str, dict], new: Mapping[str, dict], *, into: Any = "the shard") -> tuple[dict, int]:
    """``(existing + new, how many were added)``: every existing row kept, each new key added; a
    key of both whose rows differ (another configuration or payload) is :class:`ShardError`
    naming the key and ``into`` -- a row is never overwritten."""
    merged, added = dict(existing), 0
    for key, row in new.items():
        old = merged.get(key)
        if old is None:
            merged[key] = row
            added += 1
        elif not _same(old, row):
            what = "configuration" if old["config"] != row["config"] else "payload"
            raise ShardError(
                f"row {key} holds another {what} than the row under that key in {into}: not overwriting it "
                "(the same configuration was computed twice; import the shard before computing, or delete one row)"
            )
    return merged, added
