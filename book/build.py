"""Stage and build the course book: ``python book/build.py`` (``make book``) -> build/book/.

The book's own pages (``book/*.md``, ``_config.yml``, ``_toc.yml``) are copied into a staging
folder, ``build/book-src/``, beside what is generated for them:

* ``chapters/NN_*.ipynb``: notebooks 00-07 executed from their committed results
  (:data:`EXECUTE_ENV`, :func:`execute_chapter`: the one place that says how a chapter is run);
  a notebook without that mode yet is shown unexecuted, with its published figures appended;
* ``results.md``: the README's results and runtimes tables, rendered by :mod:`lib.report` from
  ``results/*.json`` (never copied by hand), with every published figure;
* ``figures/``: the published PNGs the results page shows.

Jupyter Book (Sphinx) then renders the staging folder into ``build/book/``; it executes only the
exercises page (seconds: its solutions read ``results/*.json``), never a chapter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
sys.path.insert(0, str(ROOT))

from lib import paths, report  # noqa: E402

#: the chapters, in reading order
CHAPTERS = sorted((ROOT / "notebooks").glob("0[0-7]_*.ipynb"))
#: how a chapter is executed: from its committed results/<notebook>.json, without training or merging
EXECUTE_ENV = {
    "FROM_RESULTS": "1",
    "SMOKE": "0",
    # a static page cannot run widget JavaScript offline: no progress bars in the book
    "TQDM_DISABLE": "1",
}
#: the parameter a notebook must read for the book to execute it (else it would train for an hour)
MODE_FLAG = "FROM_RESULTS"
#: the book's own sources, copied as they are
PAGES = [
    "_config.yml",
    "_toc.yml",
    "intro.md",
    "strategies.md",
    "glossary.md",
    "reading.md",
    "exercises.md",
    "lab.ipynb",
    "solutions.py",
]


def has_results_mode(notebook: Path) -> bool:
    """Whether the notebook's parameters cell reads :data:`MODE_FLAG`."""
    cells = json.loads(notebook.read_text())["cells"]
    return any(
        MODE_FLAG in "".join(c["source"])
        for c in cells
        if c["cell_type"] == "code" and "parameters" in c.get("metadata", {}).get("tags", [])
    )


class ChapterFailed(RuntimeError):
    pass


def execute_chapter(notebook: Path, out: Path, *, timeout: int = 600) -> None:
    """Run ``notebook`` top to bottom under :data:`EXECUTE_ENV` (papermill), outputs into ``out``;
    :class:`ChapterFailed` with the notebook's own error line if a cell fails."""
    env = {**os.environ, **EXECUTE_ENV, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "papermill",
        "--log-level",
        "WARNING",
        "-k",
        "python3",
        "--cwd",
        str(notebook.parent),
        "--execution-timeout",
        str(timeout),
        str(notebook),
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"^[A-Z]\w*(Error|Exception|Mismatch)\b.*:", line)]
        out.unlink(missing_ok=True)
        raise ChapterFailed((errors or lines or ["papermill failed"])[-1])


def unexecuted_chapter(notebook: Path, out: Path, why: str) -> None:
    """The stripped notebook with a note on top saying ``why``, and its published figures at the end."""
    nb = json.loads(notebook.read_text())
    stem = notebook.stem
    note = (
        f"```{{note}}\nThis chapter is shown without outputs: {why}. Its published figures, drawn from "
        f"`results/{stem}.json`, are at the end of the page.\n```"
    )
    figures = sorted((paths.figures_dir(False)).glob(f"{stem}_*.png"))
    tail = "## Published figures\n\n" + "\n\n".join(f"![{f.stem}](../figures/{f.name})" for f in figures)
    nb["cells"].insert(1, {"cell_type": "markdown", "metadata": {}, "source": note})
    nb["cells"].append({"cell_type": "markdown", "metadata": {}, "source": tail})
    out.write_text(json.dumps(nb, indent=1))


def results_page(results: dict, figure_dir: Path) -> str:
    """README's tables (lib.report, from results/*.json) and every published figure, as MyST."""
    parts = [
        "# Results\n",
        "Every number on this page is rendered by `lib.report` from the committed `results/*.json` when the "
        "book is built: the same tables as the README's (`python -m lib report`). Chapters explain where "
        "each one comes from; the {doc}`glossary` defines the terms.\n",
        report.results_markdown(results),
        "\n## Runtimes\n",
        report.runtimes_markdown(results),
        "\n## Figures\n",
    ]
    for nb in report.NOTEBOOKS:
        mine = sorted(figure_dir.glob(f"{nb}_*.png"))
        if mine:
            parts.append(f"### `{nb}`\n")
            parts += [f"![{f.stem}](figures/{f.name})\n" for f in mine]
    return "\n".join(parts)


def stage(src: Path, *, execute: bool = True, strict: bool = False) -> list[str]:
    """Fill ``src`` with the book's sources; returns one line per chapter saying how it was made.
    A chapter that fails in results mode is shown unexecuted with the reason, or with ``strict``
    stops the build."""
    if src.exists():
        shutil.rmtree(src)
    (src / "chapters").mkdir(parents=True)
    for name in PAGES:
        shutil.copy2(BOOK / name, src / name)
    figure_dir = src / "figures"
    shutil.copytree(paths.figures_dir(False), figure_dir, ignore=shutil.ignore_patterns("smoke"))
    (src / "results.md").write_text(results_page(report.load(), figure_dir))
    log = []
    for notebook in CHAPTERS:
        out = src / "chapters" / notebook.name
        start = time.perf_counter()
        if not execute:
            why = "the book was built with --no-execute"
        elif not has_results_mode(notebook):
            why = (
                f"notebook `{notebook.stem}` has no `{MODE_FLAG}` mode yet, and executing it would train and "
                f"merge (see its runtime section)"
            )
        else:
            try:
                execute_chapter(notebook, out)
                log.append(f"{notebook.stem}: executed with {MODE_FLAG}=1 in {time.perf_counter() - start:.1f} s")
                continue
            except ChapterFailed as err:
                if strict:
                    raise
                why = f"executing it with `{MODE_FLAG}=1` failed: `{err}`"
        unexecuted_chapter(notebook, out, why)
        log.append(f"{notebook.stem}: NOT EXECUTED, {why}")
    return log


def build(src: Path, out: Path) -> None:
    """Jupyter Book 1.x renders ``src`` (into ``src/_build/html``); the site is then copied to ``out``."""
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", "--all", str(src)]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src / "_build" / "html", out)
    # GitHub Pages runs Jekyll unless told not to, and Jekyll drops _static/ and _images/
    (out / ".nojekyll").touch()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "build" / "book-src", help="staging folder")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "book", help="the static site")
    ap.add_argument(
        "--no-execute", action="store_true", help="show every chapter unexecuted (a quick look at the layout)"
    )
    ap.add_argument("--strict", action="store_true", help="stop if a chapter fails in results mode")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    for line in stage(args.src, execute=not args.no_execute, strict=args.strict):
        print(line, flush=True)
    build(args.src, args.out)
    print(f"book built in {time.perf_counter() - start:.0f} s: {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
