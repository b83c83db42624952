"""Issue 20: the GPU paths checked on a GPU, in one run of under 5 minutes (``make gpu-check``).

Runs with the GPU machine's own ``python3`` (no ``make setup``; ``lib`` is imported from this
checkout) and only needs torch, numpy, pandas, safetensors and pytest; what else is missing is
listed, and each part that needs it is reported as skipped. Steps:

1. ``pytest -m gpu tests/test_gpu.py``: every merge method and ``scan`` on CUDA against the CPU,
   float16/bfloat16 inputs, the batched Gram eigensolver on every BERT-base shape, the streaming
   CLI merge with ``--device cuda``, CUDA memory released after a merge. (Only that file: the
   other test modules import packages the GPU machine may lack, and hold no ``gpu`` test.)
2. what bounds a GPU path: host-to-device and back bandwidth, float64/float32 Gram-product
   throughput, batched ``eigh`` time per matrix at the Gram sizes of BERT-base (768, 2304), and
   from them each benchmark's estimated transfer, product and eigensolver seconds;
3. the benchmarks of ``make bench`` on the GPU: ``benchmarks/spectral.py`` (``scan`` against the
   per-matrix float64 SVD on the CPU, and against ``scan`` on the CPU), ``benchmarks/merge.py``
   (STAR and DRM-H of three BERT-base experts against their CPU paths and the SVD references)
   and ``benchmarks/stream_merge.py --quick`` (streamed merge memory, ``SPECTRAL_MERGE_DEVICE=cuda``);
4. ``benchmarks/results/gpu_check.json`` (written atomically): GPU name, torch and CUDA versions,
   each ratio with its target, met or missed, and what bounds a missed one; then a short summary.

Without CUDA it still runs end to end: the tests skip, nothing is timed, and the JSON goes to
``gpu_check.no-cuda.json`` (ignored by git), never to the file that holds GPU results.
``--rehearse`` runs every step on the CPU instead (tests CPU against CPU, benchmarks in their
quick mode) into ``gpu_check.rehearsal.json``: a check of this script, not a measurement.

    python3 benchmarks/gpu_check.py [--rehearse] [--quick] [--layers 12] [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # lib from this checkout, not an installed copy

import torch  # noqa: E402

from lib.paths import write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: issue 20's targets: ratio name -> (what is compared, least ratio)
TARGETS = {
    "scan_vs_float64_svd": ("scan of BERT-base on the GPU vs the per-matrix float64 SVD on the CPU", 20.0),
    "star_vs_cpu_path": ("STAR of three BERT-base experts, GPU vs its CPU path", 10.0),
    "drm_h_vs_cpu_path": ("DRM-H of three BERT-base experts, GPU vs its CPU path", 10.0),
}
#: what each part needs beyond torch and the standard library
NEEDED = {
    "tests": ["pytest", "numpy", "pandas", "safetensors"],
    "cli test": ["yaml", "tqdm"],
    "benchmarks": ["numpy", "pandas", "pytest"],
    "stream benchmark": ["transformers", "safetensors", "yaml", "tqdm"],
    "memory columns of benchmarks/merge.py": ["psutil"],
}
#: seconds each step may take (the whole run stays under 5 minutes on the GPU machine)
STEP_TIMEOUT = {"tests": 150, "spectral": 60, "merge": 90, "stream": 45}


def missing_modules() -> list[str]:
    names = sorted({m for mods in NEEDED.values() for m in mods})
    return [m for m in names if importlib.util.find_spec(m) is None]


def environment(device: torch.device) -> dict:
    env = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "cudnn": torch.backends.cudnn.version(),
        }
    return env


def run_step(name: str, cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run one step in a child (its own CUDA context, freed when it ends); its output is echoed."""
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    # a script in benchmarks/ sees only its own folder: lib comes from this checkout (no install)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": path, **(env or {})},
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT[name],
        )
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        output += f"\n(timed out after {STEP_TIMEOUT[name]} s)"
        code = None
    print(output[-6000:], flush=True)
    return {
        "command": " ".join(cmd),
        "returncode": code,
        "seconds": round(time.perf_counter() - start, 1),
        "output_tail": output[-3000:],
    }


def run_tests(device_under_test: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        step = run_step(
            "tests",
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "-rs",
                "-p",
                "no:cacheprovider",
                f"--junitxml={report}",
                "tests/test_gpu.py",
            ],
            env={"GPU_TEST_DEVICE": device_under_test},
        )
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        failures, skipped = [], {}
        if report.exists():
            for case in ET.parse(report).getroot().iter("testcase"):
                name = case.get("name")
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                skip = case.find("skipped")
                if bad is not None:
                    counts["failed"] += 1
                    failures.append(f"{name}: {(bad.get('message') or '').splitlines()[0][:300]}")
                elif skip is not None:
                    counts["skipped"] += 1
                    reason = skip.get("message") or ""
                    skipped[reason] = skipped.get(reason, 0) + 1
                else:
                    counts["passed"] += 1
    return step | counts | {"failures": failures, "skip_reasons": skipped}


def _seconds(fn, device: torch.device, repeats: int = 3) -> float:
    """Best of ``repeats`` wall-clock seconds of ``fn()``, waiting for the device."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def bounds(device: torch.device, layers: int, quick: bool) -> dict:
    """The three things a GPU merge or scan can wait on, measured here, and what they add up to
    for the benchmarks' workloads (``layers`` BERT-base layers, three experts)."""
    g = torch.Generator().manual_seed(0)
    host = torch.randn(
        1 << (24 if quick else 26), generator=g
    )  # 64 or 256 MiB of float32, pageable as lib's tensors are
    to_device = _seconds(lambda: host.to(device), device)
    on_device = host.to(device)
    to_host = _seconds(lambda on_device=on_device: on_device.to("cpu"), device)
    h2d, d2h = host.numel() * 4 / to_device, host.numel() * 4 / to_host
    del on_device
    out = {"host_to_device_gb_s": h2d / 1e9, "device_to_host_gb_s": d2h / 1e9}
    batch = 4 if quick else 12
    x = torch.randn(batch, 3072, 768, generator=g).to(device)
    for dtype, label in [(torch.float64, "float64"), (torch.float32, "float32")]:
        xd = x.to(dtype)
        t = _seconds(lambda xd=xd: xd.mT @ xd, device)
        out[f"{label}_gram_tflop_s"] = 2 * batch * 3072 * 768 * 768 / t / 1e12
    del x, xd
    eigh_ms = {}
    for size, count in [(768, 2 if quick else 12), (2304, 1 if quick else 3)]:
        a = torch.randn(count, size, size, generator=g, dtype=torch.float64)
        spd = (a @ a.mT).to(device)
        for dtype, label in [(torch.float64, "float64"), (torch.float32, "float32")]:
            m = spd.to(dtype)
            eigh_ms[f"{label}_{size}"] = 1e3 * _seconds(lambda m=m: torch.linalg.eigh(m), device, repeats=2) / count
        del spd, m
    out["eigh_ms_per_matrix"] = eigh_ms
    if device.type == "cuda":
        library = torch.backends.cuda.preferred_linalg_library()
        out["linalg_library"] = str(library)

    # the benchmarks' workloads: per layer 4 square 768x768 matrices and the two 768x3072 shapes
    entries = layers * (4 * 768 * 768 + 2 * 3072 * 768)  # one model's encoder matrices
    n = 3
    gram_flop_64 = {  # Gram products, plus the same again for reconstructing from the kept basis
        "star": n * layers * 2 * (4 * 2 * 768**3 + 2 * 2 * 3072 * 768**2),
        "drm_h": layers
        * 2
        * (4 * 2 * 768 * (n * 768) * 768 + 2 * 768 * (n * 3072) * 768 + 2 * 3072 * (n * 768) * (n * 768)),
    }
    eighs_64 = {"star": {768: n * layers * 6}, "drm_h": {768: layers * 5, 2304: layers}}
    moved = {"star": (n + 2) * entries * 4, "drm_h": (n + 2) * entries * 4}  # base + experts in, merged out
    est = {}
    for method in ("star", "drm_h"):
        est[method] = {
            "transfer_s": moved[method] / min(h2d, d2h),
            "float64_products_s": gram_flop_64[method] / (out["float64_gram_tflop_s"] * 1e12),
            "eigensolver_s": sum(c * eigh_ms[f"float64_{s}"] / 1e3 for s, c in eighs_64[method].items()),
        }
    est["scan"] = {
        "transfer_s": entries * 4 / h2d,
        "float32_products_s": layers * (4 * 2 * 768**3 + 2 * 2 * 3072 * 768**2) / (out["float32_gram_tflop_s"] * 1e12),
        "eigensolver_s": layers * 6 * eigh_ms["float32_768"] / 1e3,
    }
    out["estimates_s"] = est
    return out


def bound_of(parts: dict[str, float]) -> str:
    name, seconds = max(parts.items(), key=lambda kv: kv[1])
    total = sum(parts.values())
    return f"{name.removesuffix('_s').replace('_', ' ')} ({seconds:.2f} s of an estimated {total:.2f} s)"


def ratios(spectral: dict | None, merge: dict | None, probe: dict | None) -> list[dict]:
    found = {}
    if spectral:
        found["scan_vs_float64_svd"] = (spectral.get("scan_vs_svd"), spectral.get("scan_s"), "scan")
    for run in (merge or {}).get("runs", []):
        if run["experts"] == 3 and "fast_vs_cpu_path" in run:
            found[f"{run['method']}_vs_cpu_path"] = (run["fast_vs_cpu_path"], run["fast_s"], run["method"])
    rows = []
    for key, (what, target) in TARGETS.items():
        ratio, seconds, workload = found.get(key, (None, None, None))
        row = {
            "ratio": key,
            "what": what,
            "target": target,
            "value": ratio,
            "met": None if ratio is None else bool(ratio >= target),
        }
        if ratio is not None and ratio < target and probe:
            row["bounded_by"] = bound_of(probe["estimates_s"][workload]) + f"; measured {seconds:.2f} s on the GPU"
        rows.append(row)
    return rows


def other_ratios(spectral: dict | None, merge: dict | None) -> dict:
    out = {}
    if spectral and "scan_vs_scan_cpu" in spectral:
        out["scan_vs_scan_cpu"] = spectral["scan_vs_scan_cpu"]
    for run in (merge or {}).get("runs", []):
        out[f"{run['method']}_N{run['experts']}_vs_svd_reference"] = run["fast_vs_reference"]
        if "difference_vs_cpu_path" in run:
            out[f"{run['method']}_N{run['experts']}_difference_vs_cpu_path"] = run["difference_vs_cpu_path"]
    return out


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(record: dict) -> str:
    env, tests = record["environment"], record["steps"]["tests"]
    lines = [
        f"gpu-check ({record['mode']}): {env.get('gpu', 'no GPU')}, torch {env['torch']}, CUDA {env['cuda']}, "
        f"{record['elapsed_s']:.0f} s"
    ]
    if record["missing_modules"]:
        lines.append(f"  missing here: {', '.join(record['missing_modules'])} (parts needing them skipped)")
    lines.append(
        f"  gpu tests: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('skipped', 0)} skipped"
    )
    lines += [f"    FAILED {f}" for f in tests.get("failures", [])[:10]]
    lines += [f"    skipped {n}: {reason}" for reason, n in tests.get("skip_reasons", {}).items()]
    for row in record["targets"]:
        value = "not measured" if row["value"] is None else f"{row['value']:.1f}x ({'met' if row['met'] else 'MISSED'})"
        lines.append(f"  {row['what']}: {value}, target >= {row['target']:.0f}x")
        if "bounded_by" in row:
            lines.append(f"    bounded by {row['bounded_by']}")
    for key, value in record["other_ratios"].items():
        lines.append(f"  {key}: {value:.3g}")
    if record["mode"] != "gpu":
        lines.append(f"  NOT a GPU result: {record['note']}")
    lines.append(f"  -> {record['json']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rehearse", action="store_true", help="no GPU: run every step on the CPU (checks this script)"
    )
    parser.add_argument("--quick", action="store_true", help="benchmarks on one layer (default with --rehearse)")
    parser.add_argument("--layers", type=int, default=12, help="BERT-base layers in the benchmarks (default 12)")
    parser.add_argument("--out", help="JSON to write (default benchmarks/results/gpu_check[.no-cuda|.rehearsal].json)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    mode = "gpu" if cuda and not args.rehearse else "rehearsal" if args.rehearse else "no-cuda"
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    quick = args.quick or mode == "rehearsal"
    layers = 1 if quick else args.layers
    out = (
        Path(args.out)
        if args.out
        else RESULTS
        / {"gpu": "gpu_check.json", "no-cuda": "gpu_check.no-cuda.json", "rehearsal": "gpu_check.rehearsal.json"}[mode]
    )
    missing = missing_modules()
    print(
        f"gpu-check, mode {mode}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"{'GPU ' + torch.cuda.get_device_name(0) if cuda else 'no CUDA GPU'}; missing: {', '.join(missing) or 'nothing'}",
        flush=True,
    )

    steps: dict[str, dict] = {}
    tests = (
        run_tests("cuda" if mode != "rehearsal" else "cpu")
        if "pytest" not in missing
        else {"skipped_step": "no pytest"}
    )
    steps["tests"] = tests
    probe = spectral = merge = None
    if mode == "no-cuda":
        note = "no CUDA GPU here: the gpu tests skipped and nothing was timed"
    else:
        note = (
            "rehearsal on the CPU: every step ran, CPU against CPU; the figures say nothing about a GPU"
            if mode == "rehearsal"
            else ""
        )
        print("\n== bounds: transfer, Gram products, eigensolver", flush=True)
        probe = bounds(device, layers, quick)
        print(json.dumps(probe, indent=1), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            spectral_json, merge_json = Path(tmp) / "spectral.json", Path(tmp) / "merge.json"
            layer_args = ["--quick"] if quick else ["--layers", str(layers)]
            steps["spectral"] = run_step(
                "spectral",
                [
                    sys.executable,
                    "benchmarks/spectral.py",
                    *layer_args,
                    *([] if quick else ["--repeats", "2"]),
                    "--no-breakdown",
                    "--reference-dtype",
                    "float64",
                    "--device",
                    str(device),
                    "--json",
                    str(spectral_json),
                ],
            )
            steps["merge"] = run_step(
                "merge",
                [
                    sys.executable,
                    "benchmarks/merge.py",
                    *layer_args,
                    "--experts",
                    "3",
                    "--methods",
                    "star",
                    "drm_h",
                    "--device",
                    str(device),
                    *(["--no-cpu-path"] if device.type == "cpu" else []),
                    "--json",
                    str(merge_json),
                ],
            )
            spectral, merge = read_json(spectral_json), read_json(merge_json)
        if {"transformers", "safetensors", "yaml", "tqdm"} & set(missing):
            steps["stream"] = {"skipped_step": "stream_merge.py needs transformers, safetensors, yaml and tqdm"}
        else:
            steps["stream"] = run_step(
                "stream",
                [sys.executable, "benchmarks/stream_merge.py", "--quick", "--no-in-memory"],
                env={"SPECTRAL_MERGE_DEVICE": str(device)},
            )

    record = {
        "issue": 20,
        "mode": mode,
        "note": note,
        "environment": environment(device),
        "missing_modules": missing,
        "layers": layers,
        "targets": ratios(spectral, merge, probe),
        "other_ratios": other_ratios(spectral, merge),
        "bounds": probe,
        "spectral": spectral,
        "merge": merge,
        "steps": steps,
    }
    record["elapsed_s"] = time.perf_counter() - started
    record["json"] = str(out)
    write_json(out, record)
    print("\n" + summary(record), flush=True)
    crashed = [name for name, step in steps.items() if "returncode" in step and step["returncode"] != 0]
    return 1 if tests.get("failed") or crashed else 0


if __name__ == "__main__":
    sys.exit(main())
