"""Command line: ``python -m lib <command>``.

  figures   redraw every figure from results/*.json (``--run-missing`` runs a notebook first
            where its results are missing)
  experts   train every expert the notebooks use, once (full mode; resumable)
  report    rewrite README.md's results and runtimes tables from results/*.json (``--check``)
  records   what the record store holds: rows per method, stale rows (``--delete-stale``);
            ``records import [SHARDS]`` loads committed shards (default results/records/*.jsonl),
            ``records export NOTEBOOK`` writes a notebook's rows into results/records/NOTEBOOK.jsonl,
            ``records compute NOTEBOOK --seeds 1`` computes those seeds of its grid and exports them
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
    from .cli import EXIT_BAD_INPUT, _one_line
    from .store import StoreError

    actions = {"show": _records_show, "import": _records_import, "export": _records_export, "compute": _records_compute}
    try:
        if args.action != "show" and args.delete_stale:
            raise ValueError("--delete-stale goes with `records` alone, not with import/export/compute")
        if args.action != "export" and args.out is not None:
            raise ValueError("--out goes with `records export`")
        if args.action in ("show", "import") and (args.seeds or args.executor):
            raise ValueError(f"--seeds and --executor go with `records export` or `records compute`, not {args.action}")
        return actions[args.action](args)
    except (StoreError, ValueError, OSError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _records_show(args) -> int:
    from .store import RecordStore

    if args.targets:
        raise ValueError(f"`records` alone takes no arguments (got {' '.join(args.targets)}); did you mean import?")
    store = RecordStore()
    if not store.path.exists():
        print(f"{store.path}: no record store yet (a notebook, make reproduce or `records import` writes one)")
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


def _records_import(args) -> int:
    from pathlib import Path

    from . import grids
    from .store import RecordStore, read_shard

    shards = [Path(p) for p in args.targets] if args.targets else grids.shard_paths()
    if not shards:
        print(f"no shards in {grids.shard_dir()}: nothing to import")
        return 0
    for path in shards:  # every line of every shard is checked before anything is imported
        if path.is_dir():
            raise ValueError(f"{path} is a folder; give shard files (results/records/*.jsonl)")
        read_shard(path)
    store = RecordStore()
    for path, counts in grids.import_shards(shards, store=store, quiet=True).items():
        print(
            f"{path}: {counts['imported']} imported, {counts['present']} there already"
            + (f", {counts['differing']} computed otherwise in the store (kept)" if counts["differing"] else "")
        )
    print(f"{store.path}: {len(store)} records")
    return 0


def _records_notebooks(args) -> list[str]:
    from . import grids

    if not args.targets:
        raise ValueError(f"name the notebook(s): {', '.join(grids.GRID_NOTEBOOKS)}")
    if args.out is not None and len(args.targets) > 1:
        raise ValueError("--out takes one notebook")
    for name in args.targets:
        grids.notebook_grid(name, seeds=args.seeds)  # an unknown notebook or seed fails before any work
    return list(args.targets)


def _records_export(args) -> int:
    from pathlib import Path

    from . import grids
    from .store import RecordStore

    notebooks = _records_notebooks(args)
    store = RecordStore()
    if not store.path.exists():
        raise ValueError(f"no record store at {store.path}: nothing to export (compute or import first)")
    for name in notebooks:
        g = grids.notebook_grid(name, seeds=args.seeds)
        out = Path(args.out) if args.out is not None else grids.shard_path(name)
        counts = store.export_rows(g.configs + [grids.expert_info_config(s) for s in g.specs], out)
        print(
            f"{out}: {counts['exported']} rows of {name}'s grid exported ({counts['added']} new), "
            f"{counts['missing']} not in the store, {counts['kept'] + counts['added']} rows in the shard"
        )
    return 0


def _records_compute(args) -> int:
    import os

    from . import grids

    notebooks = _records_notebooks(args)
    executor = args.executor or os.environ.get("EXECUTOR", "inline")
    for name in notebooks:
        g = grids.notebook_grid(name, seeds=args.seeds)
        seeds = sorted({s["seed"] for s in g.specs})
        print(f"{name}: {len(g.configs)} records of seeds {seeds}, executor {executor}")
        grids.run_grid(name, g.configs, smoke=False, executor=executor)
        if name != "06_mergeability":  # 06 reads its experts itself; 04, 05 and 07 table each pool's experts
            for spec in g.specs:
                grids.expert_info(name, spec, smoke=False)
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

    p = sub.add_parser(
        "records",
        help="what the record store holds; import/export committed shards (results/records/*.jsonl); "
        "compute some seeds of a notebook's grid",
    )
    p.add_argument(
        "action",
        nargs="?",
        default="show",
        choices=["show", "import", "export", "compute"],
        help="show (default): rows per method and stale rows; import [SHARDS]; export NOTEBOOK...; compute NOTEBOOK...",
    )
    p.add_argument(
        "targets",
        nargs="*",
        help="import: shard files (default: every results/records/*.jsonl); "
        "export/compute: notebooks (04_star 05_drm 06_mergeability 07_lora)",
    )
    p.add_argument("--delete-stale", action="store_true", help="delete rows of outdated method versions")
    p.add_argument("--seeds", type=int, nargs="+", help="export/compute: these seeds of the grid only (default: all)")
    p.add_argument("--out", help="export: the shard to write (default: results/records/NOTEBOOK.jsonl)")
    p.add_argument("--executor", help="compute: where the merges run (default: $EXECUTOR, else inline)")
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
