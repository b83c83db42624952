"""Command line: ``python -m lib <command>``.

  figures   redraw every figure from results/*.json (``--run-missing`` runs a notebook first
            where its results are missing)
  experts   train every expert the notebooks use, once (full mode; resumable)
  report    rewrite README.md's results and runtimes tables from results/*.json (``--check``)
  records   what the record store holds: rows per method, stale rows (``--delete-stale``)
  scan      spectra and SNR of every matrix of a checkpoint on disk -> CSV (+ plot)   (lib/cli.py -> lib/merge/stream.py)
  merge     merge checkpoints on disk, streaming, into a loadable model folder      (lib/cli.py -> lib/merge/stream.py)

Each command lives in its own function below and is added to the parser in ``main``.
"""

from __future__ import annotations

import argparse
import sys


def _figures(args) -> int:
    from .figures import draw_all

    draw_all(run_missing=args.run_missing, smoke=args.smoke, only=args.only or None)
    return 0


def _experts(args) -> int:
    from .experts import main as experts_main

    return experts_main(args)


def _report(args) -> int:
    from .report import main as report_main

    return report_main(args)


def _records(args) -> int:
    from .store import RecordStore

    store = RecordStore()
    if not store.path.exists():
        print(f"{store.path}: no record store yet (a notebook or make reproduce writes one)")
        return 0
    rows = store.conn.execute(
        "select method, count(*), sum(seconds) from records group by method order by method"
    ).fetchall()
    print(f"{store.path}: {len(store)} records")
    for method, n, seconds in rows:
        print(f"  {method:<20} {n:>6} records  {(seconds or 0) / 60:8.1f} min computing")
    stale = store.stale()
    if stale:
        print(
            f"{len(stale)} stale records (their method's code or defaults changed since; never reused): "
            + ", ".join(sorted({r["method"] for r in stale}))
        )
        if args.delete_stale:
            print(f"deleted {store.delete(r['key'] for r in stale)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib", description="spectral-merge command line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("figures", help="redraw figures from results/*.json")
    p.add_argument(
        "--run-missing", action="store_true", help="run a notebook (papermill) where its results are missing"
    )
    p.add_argument("--smoke", action="store_true", help="use results/smoke and figures/smoke")
    p.add_argument("only", nargs="*", help="notebook stems to draw (default: all)")
    p.set_defaults(func=_figures)

    p = sub.add_parser("experts", help="train every expert of every notebook once (full mode, resumable)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, train nothing")
    p.add_argument("--smoke", action="store_true", help="tiny slices, seconds per expert")
    p.add_argument(
        "--lora",
        action="store_true",
        help="plan the LoRA experts of the text tasks instead (rank 16, alpha 32, query and value)",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="train these seeds only (default: 0 1 2)")
    p.add_argument("--tasks", nargs="+", help="train these tasks only (default: every task of the plan)")
    p.set_defaults(func=_experts)

    p = sub.add_parser("report", help="rewrite README.md's tables from results/*.json")
    p.add_argument("--check", action="store_true", help="only say whether README.md is current (exit 1 if not)")
    p.set_defaults(func=_report)

    p = sub.add_parser("records", help="what the record store holds (rows per method, stale rows)")
    p.add_argument("--delete-stale", action="store_true", help="delete rows of outdated method versions")
    p.set_defaults(func=_records)

    from .cli import add_commands

    add_commands(sub)

    args = parser.parse_args(argv)
    return args.func(args)


#: commands whose process ends without the interpreter's teardown (see :func:`exit_now`)
FAST_EXIT = ("merge", "scan")


def exit_now(code: int) -> None:
    """End the process at once with ``code``, after flushing stdout and stderr.

    The teardown of an interpreter that imported torch (its CUDA build) raises resident memory
    by about 130 MB by itself (``benchmarks/stream_merge.py``: import only, then a normal exit,
    peaks at 670-690 MB; the same with ``os._exit`` at the 540-560 MB after import) -- more than a
    streamed merge of BERT-base needs. ``merge`` and ``scan`` have closed every file they wrote
    (atomically) when they return, so skipping the teardown loses nothing and keeps the
    process's peak at the merge's own."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    status = main()
    if len(sys.argv) > 1 and sys.argv[1] in FAST_EXIT:
        exit_now(status)
    sys.exit(status)
