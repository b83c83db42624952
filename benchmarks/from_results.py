"""Every notebook 00-06 executed with ``FROM_RESULTS=1`` (issue 19: under two minutes in all):
the wall seconds of each, one process per notebook as a reader would run it, written to
``benchmarks/results/from_results.json``.

    python benchmarks/from_results.py

The executed copies go to ``build/from_results/`` (never over the stripped notebooks).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib import report  # noqa: E402
from lib.paths import write_json  # noqa: E402

OUT = ROOT / "build" / "from_results"
TARGET_S = 120


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FROM_RESULTS": "1", "SMOKE": "0"}
    rows, load_before = [], os.getloadavg()[0]
    for name in report.NOTEBOOKS:
        start = time.perf_counter()
        subprocess.run(
            [
                str(Path(sys.executable).parent / "jupyter"),
                "nbconvert",
                "--to",
                "notebook",
                "--execute",
                "--ExecutePreprocessor.timeout=600",
                "--output-dir",
                str(OUT),
                str(ROOT / "notebooks" / f"{name}.ipynb"),
            ],
            check=True,
            env=env,
            capture_output=True,
        )
        rows.append({"notebook": name, "wall_s": time.perf_counter() - start})
        print(f"{name:28s} {rows[-1]['wall_s']:6.1f} s", flush=True)
    total = sum(r["wall_s"] for r in rows)
    print(f"all {len(rows)}: {total:.1f} s (target under {TARGET_S} s): {'met' if total < TARGET_S else 'NOT met'}")
    write_json(
        ROOT / "benchmarks" / "results" / "from_results.json",
        {
            "benchmark": "from_results",
            "notebooks": rows,
            "total_s": total,
            "target_s": TARGET_S,
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "cpu_count": os.cpu_count(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
