"""Peak memory of ``python -m lib merge`` against the size of one checkpoint (issue 9).

Makes a base and N experts (default 3) with the shapes of BERT-base (110M float32 parameters,
440 MB each; ``--quick``: a 4-layer, 256-wide BERT of 45 MB) in a temporary folder, merges them
in a child process per method, and reads the child's peak resident memory (``ru_maxrss`` from
``wait4``, so only that child is counted). Also measured, for scale:

* ``import only``: a child that imports the command line and nothing else -- the fixed cost of
  the interpreter, torch and the merge registry, paid whatever the model size;
* ``in memory``: a child that loads every model whole and calls ``lib.merge.merge`` -- what the
  streaming avoids.

The issue's bound is peak RSS < 1.5 x one checkpoint. Not a test: nothing is asserted, the
numbers are printed. The checkpoints are deleted afterwards.

    python benchmarks/stream_merge.py [--quick] [--experts 3] [--methods task_arithmetic ties]
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

IN_MEMORY = """
import sys
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


def peak_rss(cmd: list[str]) -> tuple[int, float, str]:
    """Run ``cmd``; its peak RSS in bytes, its wall time in seconds and the tail of its stderr."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed with exit status {proc.returncode}:\n{tail}")
    return usage.ru_maxrss * RSS_UNIT, wall, tail


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 45 MB BERT instead of BERT-base")
    parser.add_argument("--experts", type=int, default=3, help="experts merged into the base (default 3)")
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    parser.add_argument("--no-in-memory", action="store_true", help="skip the load-everything comparison")
    parser.add_argument("--make", metavar="DIR", help=argparse.SUPPRESS)  # internal: the child that writes the models
    args = parser.parse_args(argv)
    if args.make:
        make_checkpoints(Path(args.make), args.quick, args.experts)
        return

    # This parent never imports torch: a child started with vfork/exec inherits the parent's
    # peak RSS as its own starting ru_maxrss, so a heavy parent would inflate every measurement.
    folder = Path(tempfile.mkdtemp(prefix="stream_merge_"))
    try:
        subprocess.run([sys.executable, __file__, "--make", str(folder), "--experts", str(args.experts),
                        *(["--quick"] if args.quick else [])], check=True)
        base, experts = folder / model_name(0), [folder / model_name(i + 1) for i in range(args.experts)]
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        print(f"checkpoint: {size / 1e6:.0f} MB ({'quick' if args.quick else 'BERT-base'}), base + {len(experts)} experts;"
              f" bound {BOUND} x = {BOUND * size / 1e6:.0f} MB; device {os.environ.get('SPECTRAL_MERGE_DEVICE', 'auto')}")
        imports, _, _ = peak_rss([sys.executable, "-c", "import lib.cli"])
        print(f"{'run':<28}{'peak RSS MB':>12}{'x ckpt':>8}{'above import MB':>17}{'x ckpt':>8}{'wall s':>8}")

        def report(label: str, rss: int, wall: float) -> None:
            print(f"{label:<28}{rss / 1e6:>12.0f}{rss / size:>8.2f}{(rss - imports) / 1e6:>17.0f}"
                  f"{(rss - imports) / size:>8.2f}{wall:>8.1f}", flush=True)

        report("import only", imports, 0.0)
        for method in args.methods:
            out = folder / f"out_{method}"
            cmd = [sys.executable, "-m", "lib", "merge", "--method", method, "--base", str(base),
                   "--experts", *map(str, experts), "--out", str(out), "--quiet"]
            rss, wall, _ = peak_rss(cmd)
            report(f"stream {method}", rss, wall)
            shutil.rmtree(out)
            if not args.no_in_memory:
                rss, wall, _ = peak_rss([sys.executable, "-c", IN_MEMORY, method, str(folder / "in_memory.safetensors"),
                                         str(base / "model.safetensors"), *(str(e / "model.safetensors") for e in experts)])
                report(f"in memory {method}", rss, wall)
                (folder / "in_memory.safetensors").unlink()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
