"""Rewrite old names in results files written before a rename, labels only.

The report's text SNR was called ``"seed"`` (after the report, seed 000, not a random seed) and
is now ``"report_text"`` (:data:`lib.spectral.SNR_ALIASES`). Results written under the old name
spell it in five kinds of places; :func:`rename_snr_methods` rewrites exactly those:

* a value ``"seed"`` under the key ``snr_method`` (records, per-layer SNR rows), or in the list
  under ``snr_methods`` (a notebook's configuration);
* ``snr_method=seed`` inside any string (run labels: ``snr_winner(snr_method=seed, top=0.25)``);
* the key ``snr_seed`` (notebook 00's per-definition SNR columns) -> ``snr_report_text``;
* the names inside a correlation key ``rho(mp, seed)`` -> ``rho(mp, report_text)``;
* the names in an ESD pick's ``why`` (``ranked 30 places apart by mp and seed``).

Nothing else is touched: every number, every other string and the order of every key stay as
they were (tested), and a second pass changes nothing. ``python -m lib.migrate FILE...``
rewrites files in place (atomically, :func:`lib.paths.write_json`) and says how many labels
changed in each; ``--check`` only counts.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import paths
from .spectral import SNR_ALIASES

#: the committed files written before the rename
RESULTS_FILES = (
    "results/00_marchenko_pastur.json",
    "results/01_resnet_fashion_kmnist.json",
    "results/02_text_sst2_emotion.json",
    "results/03_text_sst2_cola.json",
    "benchmarks/results/lab.json",
)

_IN_LABEL = re.compile(r"(?<=\bsnr_method=)\w+")
_RHO_KEY = re.compile(r"rho\(([^,()]+), ([^,()]+)\)")
_WHY = re.compile(r"(ranked \d+ places apart by )(\w+) and (\w+)")


def _name(name: str) -> str:
    return SNR_ALIASES.get(name, name)


def _key(key: str) -> tuple[str, str | None]:
    """``(new key, kind of change or None)``."""
    if key.startswith("snr_") and key[4:] in SNR_ALIASES:
        return f"snr_{_name(key[4:])}", "snr_<method> key"
    m = _RHO_KEY.fullmatch(key)
    if m and (m.group(1) in SNR_ALIASES or m.group(2) in SNR_ALIASES):
        return f"rho({_name(m.group(1))}, {_name(m.group(2))})", "rho(...) key"
    return key, None


def _string(text: str, key: str | None, counts: Counter) -> str:
    if key == "snr_method" and text in SNR_ALIASES:
        counts["snr_method value"] += 1
        return _name(text)
    out = _IN_LABEL.sub(lambda m: _name(m.group(0)), text)
    if out != text:
        counts["run label"] += 1
    if key == "why":
        m = _WHY.fullmatch(out)
        if m and (m.group(2) in SNR_ALIASES or m.group(3) in SNR_ALIASES):
            counts["esd why"] += 1
            out = f"{m.group(1)}{_name(m.group(2))} and {_name(m.group(3))}"
    return out


def _walk(obj: Any, key: str | None, counts: Counter) -> Any:
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            new, kind = _key(k) if isinstance(k, str) else (k, None)
            if kind is not None:
                counts[kind] += 1
            if new in out or (new != k and new in obj):
                raise ValueError(f"renaming key {k!r} to {new!r} would collide with a key already there")
            out[new] = _walk(v, k if isinstance(k, str) else None, counts)
        return out
    if isinstance(obj, list):
        if key == "snr_methods":
            changed = sum(isinstance(v, str) and v in SNR_ALIASES for v in obj)
            if changed:
                counts["snr_methods entry"] += changed
            return [_name(v) if isinstance(v, str) else v for v in obj]
        return [_walk(v, key, counts) for v in obj]
    if isinstance(obj, str):
        return _string(obj, key, counts)
    return obj


def rename_snr_methods(obj: Any) -> tuple[Any, Counter]:
    """``(obj with the old SNR variant names replaced, Counter of what changed by kind)``; ``obj``
    itself is left as it was."""
    counts: Counter = Counter()
    return _walk(obj, None, counts), counts


def migrate_file(path: str | Path, *, write: bool = True) -> Counter:
    """Rename the old SNR variant names in one JSON file (in place unless ``write=False``);
    returns what changed. A file already migrated is not rewritten."""
    path = Path(path)
    new, counts = rename_snr_methods(paths.read_json(path))
    if write and counts:
        paths.write_json(path, new)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help=f"JSON files (default: {', '.join(RESULTS_FILES)})")
    parser.add_argument("--check", action="store_true", help="only count what would change; exit 1 if anything")
    args = parser.parse_args(argv)
    files = [Path(f) for f in args.files] or [paths.ROOT / f for f in RESULTS_FILES]
    total = 0
    for f in files:
        try:
            counts = migrate_file(f, write=not args.check)
        except (OSError, ValueError) as err:
            print(f"error: {f}: {err}", file=sys.stderr)
            return 2
        total += sum(counts.values())
        what = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "nothing to rename"
        print(f"{f}: {what}{' (would change)' if args.check and counts else ''}")
    return 1 if args.check and total else 0


if __name__ == "__main__":
    raise SystemExit(main())
