"""Peak memory of ``python -m lib merge`` against the size of one checkpoint (issue 9).

Makes a base and N experts (default 3) with the shapes of BERT-base (110M float32 parameters,
440 MB each; ``--quick``: a 4-layer, 256-wide BERT of 45 MB) in a temporary folder and merges
them in a child process per method. Each child reports two numbers, and the parent a third:

* ``process peak``: the child's peak resident memory over its whole life (``ru_maxrss`` from
  ``wait4``, so only that child is counted) -- what a batch scheduler sees;
* ``after import``: the child's resident memory once torch, the command line and the merge
  registry are imported, before any model is opened -- the fixed cost, whatever the model size;
* ``merge peak``: the child's peak resident memory when the merge has finished, before the
  interpreter shuts down. Shutting down a process that imported the CUDA build of torch adds
  about 130 MB of resident memory by itself (``import only``: 670-690 MB with a normal exit,
  540-560 MB without the teardown; neither the atexit handlers nor a garbage collection cause it), so
  ``python -m lib merge``/``scan`` end with ``os._exit`` once their files are closed
  (:func:`lib.__main__.exit_now`), and the streamed rows here end the same way.

The issue's bound is on the process peak: below 1.5 x one checkpoint. Import alone is 1.23-1.28 x
BERT-base (540-560 of 438 MB), which leaves the merge 100-120 MB. Measured on the 2-core CPU (BERT-base,
3 experts, 4 MiB blocks, after the changes of :func:`lib.merge.stream.return_freed_blocks_to_the_system`
and the in-place TIES step), on a quiet machine: process peak average 579 MB, task arithmetic
584 MB, TIES 608 MB, under the 657 MB bound (above import: 41, 46, 70 MB; 604/595/640 MB while
other work loaded the machine); loading every model whole instead: 2.7, 2.7 and 3.2 GB. The
whole run takes under a minute. ``above import`` = merge peak - after import is what merging
itself costs, whatever torch weighs. Rows: ``import only`` (a child that imports and exits,
normally and as the command line does), ``stream METHOD`` (the command line; with
``--block-sizes``, once per ``--block-size``, how the largest tensors are cut into blocks of
rows, see :mod:`lib.merge.stream`) and ``in memory METHOD`` (load every model whole and call
``lib.merge.merge``: what streaming avoids). Not a test: nothing is asserted, the numbers are
printed. The checkpoints are deleted afterwards.

    python benchmarks/stream_merge.py [--quick] [--experts 3] [--methods average task_arithmetic ties]
                                      [--block-sizes 4MiB 16MiB] [--no-in-memory]
                                      [--threads 1 2] [--busy]

A busy core (issue 22): ``--busy`` runs a busy loop pinned to one core beside every measured
child, as a shared machine or a CI runner has; ``--threads 1 2`` measures the streamed merge
once per ``--threads`` value of the command line (default: its own choice,
:func:`lib.merge.stream.merge_threads`), so the wall times show what a contended core costs at each count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BOUND = 1.5
#: Linux reports ru_maxrss in KiB, macOS in bytes
RSS_UNIT = 1 if sys.platform == "darwin" else 1024

#: every child: import (the fixed cost), note the resident memory, do ``{body}``, report both
#: numbers on stderr before the interpreter's shutdown can add its own
MEASURED = """
import resource, sys
import lib.cli

def resident():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except OSError:  # no /proc (macOS): the peak so far is the best available
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * {unit}

after_import = resident()
{body}
print("RSS", after_import, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * {unit}, file=sys.stderr)
{ending}
"""
#: how a measured child ends: as ``python -m lib merge`` does (no interpreter teardown), or normally
CLI_EXIT = "from lib.__main__ import exit_now; exit_now(0)"
NORMAL_EXIT = ""
IMPORT_ONLY = "pass"
STREAM = """
from lib.__main__ import main
if main(sys.argv[1:]) != 0:
    sys.exit("merge failed")
"""
IN_MEMORY = """
from safetensors.torch import load_file, save_file
import lib.merge
method, out, base, *experts = sys.argv[1:]
merged = lib.merge.merge(method, load_file(base), [load_file(p) for p in experts])
save_file(merged, out)
"""


def make_checkpoints(folder: Path, quick: bool, n_experts: int) -> None:
    """A base folder (config.json + model.safetensors) and ``n_experts`` fine-tuned-looking
    copies (base + a small dense update). Runs in a child process: see :func:`main`."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    if quick:
        config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    else:
        config = BertConfig()  # bert-base-uncased: 12 layers, 768 wide, 30522-token vocabulary
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in BertModel(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    base = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    for i in range(n_experts + 1):
        model = base if i == 0 else {k: w + 1e-3 * torch.randn(w.shape, generator=g) for k, w in base.items()}
        path = folder / model_name(i)
        path.mkdir()
        config.to_json_file(path / "config.json")
        save_file(model, path / "model.safetensors")
        del model


def model_name(i: int) -> str:
    return "base" if i == 0 else f"expert_{i}"


def measure(body: str, *args: str, ending: str = NORMAL_EXIT) -> tuple[int, int, int, float]:
    """Run :data:`MEASURED` with ``body`` in a child with ``args``; its process peak, resident
    memory after import and merge peak (bytes, see the module docstring) and wall time (s)."""
    cmd = [sys.executable, "-c", MEASURED.format(body=body, unit=RSS_UNIT, ending=ending), *args]
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err.seek(0)
        lines = err.read().decode(errors="replace").splitlines()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(
            f"{' '.join(args[:6])} ... failed with exit status {os.waitstatus_to_exitcode(status)}:\n"
            + "\n".join(lines[-20:])
        )
    after_import, merge_peak = (int(x) for x in lines[-1].split()[1:])
    return usage.ru_maxrss * RSS_UNIT, after_import, merge_peak, wall


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 45 MB BERT instead of BERT-base")
    parser.add_argument("--experts", type=int, default=3, help="experts merged into the base (default 3)")
    parser.add_argument("--methods", nargs="+", default=["average", "task_arithmetic", "ties"])
    parser.add_argument(
        "--block-sizes",
        nargs="+",
        default=[None],
        metavar="SIZE",
        help="--block-size values of the streamed merges (default: the command line's own)",
    )
    parser.add_argument("--no-in-memory", action="store_true", help="skip the load-everything comparison")
    parser.add_argument(
        "--threads",
        nargs="+",
        default=[None],
        metavar="N",
        help="--threads values of the streamed merges (default: the command line's own choice)",
    )
    parser.add_argument("--busy", action="store_true", help="a busy loop on one core beside every measurement")
    parser.add_argument("--make", metavar="DIR", help=argparse.SUPPRESS)  # internal: the child that writes the models
    args = parser.parse_args(argv)
    if args.make:
        make_checkpoints(Path(args.make), args.quick, args.experts)
        return

    # This parent never imports torch: a child started with vfork/exec inherits the parent's
    # peak RSS as its own starting ru_maxrss, so a heavy parent would inflate every measurement.
    # The models are written by a child for the same reason.
    folder = Path(tempfile.mkdtemp(prefix="stream_merge_"))
    busy = start_busy_core() if args.busy else None
    try:
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--make",
                str(folder),
                "--experts",
                str(args.experts),
                *(["--quick"] if args.quick else []),
            ],
            check=True,
        )
        base, experts = folder / model_name(0), [folder / model_name(i + 1) for i in range(args.experts)]
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        print(
            f"checkpoint: {size / 1e6:.0f} MB ({'quick' if args.quick else 'BERT-base'}), base + {len(experts)} experts;"
            f" bound {BOUND} x = {BOUND * size / 1e6:.0f} MB; device {os.environ.get('SPECTRAL_MERGE_DEVICE', 'auto')}"
        )
        print(
            f"{'run':<30}{'process peak MB':>16}{'after import MB':>16}{'merge peak MB':>14}"
            f"{'above import MB':>16}{'x ckpt':>8}{'wall s':>8}"
        )

        def report(label: str, body: str, *args: str, ending: str = NORMAL_EXIT) -> None:
            process_peak, after_import, merge_peak, wall = measure(body, *args, ending=ending)
            above = merge_peak - after_import
            print(
                f"{label:<30}{process_peak / 1e6:>16.0f}{after_import / 1e6:>16.0f}{merge_peak / 1e6:>14.0f}"
                f"{above / 1e6:>16.0f}{above / size:>8.2f}{wall:>8.1f}",
                flush=True,
            )

        report("import only", IMPORT_ONLY)
        report("import only, CLI exit", IMPORT_ONLY, ending=CLI_EXIT)
        for method in args.methods:
            out = folder / f"out_{method}"
            for block in args.block_sizes:
                for threads in args.threads:
                    label = (
                        f"stream {method}" + (f" ({block})" if block else "") + (f" {threads} thr" if threads else "")
                    )
                    report(
                        label,
                        STREAM,
                        "merge",
                        "--method",
                        method,
                        "--base",
                        str(base),
                        "--experts",
                        *map(str, experts),
                        "--out",
                        str(out),
                        "--quiet",
                        *(["--block-size", block] if block else []),
                        *(["--threads", str(threads)] if threads else []),
                        ending=CLI_EXIT,
                    )
                    shutil.rmtree(out)
            if not args.no_in_memory:
                report(
                    f"in memory {method}",
                    IN_MEMORY,
                    method,
                    str(folder / "in_memory.safetensors"),
                    str(base / "model.safetensors"),
                    *(str(e / "model.safetensors") for e in experts),
                )
                (folder / "in_memory.safetensors").unlink()
        print(f"bound: {BOUND} x checkpoint = {BOUND * size / 1e6:.0f} MB, to compare with 'above import'")
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        shutil.rmtree(folder, ignore_errors=True)


def start_busy_core() -> subprocess.Popen:
    """A child that spins on one core (the last one this process may use) until killed."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    code = (
        f"import os\nif hasattr(os, 'sched_setaffinity'): os.sched_setaffinity(0, {{{cores[-1]}}})\nwhile True: pass\n"
    )
    print(f"busy loop on core {cores[-1]} of {len(cores)}")
    return subprocess.Popen([sys.executable, "-c", code])


if __name__ == "__main__":
    main()
