"""STAR and DRM-H: the fast merge paths against the slow references, in the same run (issue 4).

Builds a base and N experts with the weight-matrix shapes of BERT-base's encoder (per layer four
768x768 attention matrices, the 3072x768 intermediate and the 768x3072 output projection; 12
layers, 85M parameters per model) whose deltas are low rank plus noise, then for N = 3 and 8:

* ``fast``: ``lib.merge.merge(method, base, experts)`` -- batched float64 Gram
  eigendecompositions on the selected device (``lib.device.get_device()``);
* ``reference``: the tests' references (``tests/test_star_drm.py``: full float64
  ``torch.linalg.svd``, one matrix at a time, on the CPU), applied matrix by matrix.

and prints the wall-clock times and their ratio (targets on a 2-core CPU: STAR >= 5x, DRM >= 2x),
the agreement (relative Frobenius error of the merged deltas over the whole model, and the worst
single matrix; the tests require <= 1e-4) and the peak extra memory of each (resident memory
sampled every 5 ms above its level before the call; on CUDA also the peak allocated GPU memory).
Nothing is asserted. Timings on a shared machine vary with its load: the load average is
printed with them.

On a GPU (``--device cuda``, or the default device there) the fast path is also timed on the CPU
(``--no-cpu-path`` skips that), so the GPU's gain over the same method's CPU path is printed
beside its gain over the reference; a warm-up merge of one layer keeps CUDA's first-call costs
out of the timings. The figures go to ``benchmarks/results/merge.json`` (``merge.quick.json`` with
``--quick``, ``merge_vs_peft.json`` with ``--against-peft``, ``.busy`` before ``.json`` with
``--busy``; ``--json PATH`` elsewhere). Without ``psutil`` the
resident-memory columns read nan.

    python benchmarks/merge.py [--quick] [--layers 12] [--experts 3 8] [--methods star drm_h] [--threads N]
                               [--device cuda] [--no-cpu-path] [--json PATH]

``--quick``: one layer, three experts (about a minute).

``--against-peft`` times TIES and DARE-TIES instead (issue 22), on the same BERT-base-shaped
experts: ``ties`` with ``scope="tensor"`` and ``scope="model"`` against PEFT's per-tensor loop of
``merge_utils.ties``, and ``dare(then="ties")`` against ``merge_utils.dare_ties``, each pair in
the same run, with the ratios (target: ours >= 3x faster), and the CPU time of DARE's seeded
mask draws alone (the floor: ours can be at most PEFT's time over it faster). It checks that ``scope="tensor"``
gives PEFT's tensors (entries differing, and how many of those sit at a tie of the magnitude
threshold, where PEFT keeps an arbitrary subset), and that DARE-TIES does given our masks.
``--busy`` runs a busy loop pinned to one core beside it (a shared machine: the case where
two torch threads had made TIES slower than PEFT).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch

try:
    import psutil
except ImportError:  # a bare GPU machine (issue 20): time without the resident-memory sampling
    psutil = None

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the references live with the tests; the benchmark times the same ones

from test_star_drm import drm_h_reference, low_rank_plus_noise, relative_error, star_reference  # noqa: E402

from lib.device import get_device  # noqa: E402
from lib.merge import merge  # noqa: E402
from lib.paths import write_json  # noqa: E402

HIDDEN, INTERMEDIATE = 768, 3072
LAYER_SHAPES = {
    "attention.self.query.weight": (HIDDEN, HIDDEN),
    "attention.self.key.weight": (HIDDEN, HIDDEN),
    "attention.self.value.weight": (HIDDEN, HIDDEN),
    "attention.output.dense.weight": (HIDDEN, HIDDEN),
    "intermediate.dense.weight": (INTERMEDIATE, HIDDEN),
    "output.dense.weight": (HIDDEN, INTERMEDIATE),
}
#: repeated calls behind the warm DARE-TIES figures (--against-peft)
WARM = 3
REFERENCES = {
    "star": lambda deltas: torch.stack([star_reference(d, eta=40) for d in deltas]).mean(0),
    "drm_h": drm_h_reference,
}


def bert_like(layers: int, n_experts: int, seed: int = 0):
    """A float32 base and ``n_experts`` experts with BERT-base encoder weight shapes."""
    g = torch.Generator().manual_seed(seed)
    shapes = {f"encoder.layer.{i}.{name}": shape for i in range(layers) for name, shape in LAYER_SHAPES.items()}
    base = {k: 0.02 * torch.randn(shape, generator=g) for k, shape in shapes.items()}
    experts = [{} for _ in range(n_experts)]
    for j, (k, shape) in enumerate(shapes.items()):
        deltas = low_rank_plus_noise(n_experts, *shape, spike=10.0, seed=seed + 1 + j)
        for expert, delta in zip(experts, deltas):
            expert[k] = base[k] + delta
    return base, experts


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every 5 ms by a thread (and the
    peak allocated CUDA memory when the device is a GPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.process = psutil.Process() if psutil is not None else None

    def rss(self) -> float:
        return self.process.memory_info().rss if self.process is not None else float("nan")

    def __enter__(self):
        self.start = self.peak = self.rss()
        self.running = self.process is not None
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.extra_mib = (self.peak - self.start) / 2**20
        self.gpu_mib = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None


def timed(fn, device):
    """``(fn(), wall seconds, memory)``; ``memory.cpu_s`` is the process's CPU seconds in the call
    (all threads: what the call cost the machine)."""
    with PeakMemory(device) as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        memory.cpu_s = time.process_time() - cpu_start
    return out, seconds, memory


def reference_merge(method, base, experts):
    """base + the reference merged delta, matrix by matrix (all tensors here are matrices).

    The deltas are taken in float32 as ``lib.merge.merge`` takes them, so both sides see the same
    inputs: DRM prunes at a magnitude threshold, and the 1e-6 relative difference between float32
    and float64 subtraction already flips an entry or two per matrix, which moves the result by
    about 1e-3 -- a property of DRM (and TIES), not an error of either implementation."""
    reference = REFERENCES[method]
    return {k: (w + reference((torch.stack([e[k] for e in experts]) - w).double()).float()) for k, w in base.items()}


def agreement(merged, expected, base) -> tuple[float, float]:
    """Relative Frobenius error of the merged deltas over the whole model, and of the worst matrix."""
    deltas = {k: (merged[k].double() - base[k].double(), expected[k].double() - base[k].double()) for k in base}
    whole = relative_error(
        torch.cat([f.flatten() for f, _ in deltas.values()]), torch.cat([r.flatten() for _, r in deltas.values()])
    )
    return whole, max(relative_error(f, r) for f, r in deltas.values())


def compare(method, base, experts, device, *, cpu_path: bool = False) -> dict:
    fast, fast_s, fast_mem = timed(lambda: merge(method, base, experts, device=device), device)
    ref, ref_s, ref_mem = timed(lambda: reference_merge(method, base, experts), torch.device("cpu"))
    whole, worst = agreement(fast, ref, base)
    gpu = f"  gpu peak {fast_mem.gpu_mib:7.0f} MiB" if fast_mem.gpu_mib is not None else ""
    print(
        f"{method:6s} N={len(experts)}  fast {fast_s:8.2f} s  reference {ref_s:8.2f} s  speed-up {ref_s / fast_s:5.1f}x  "
        f"rel. error {whole:.1e} (worst matrix {worst:.1e})  peak extra RSS fast {fast_mem.extra_mib:6.0f} MiB, "
        f"reference {ref_mem.extra_mib:6.0f} MiB{gpu}  load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    figures = {
        "method": method,
        "experts": len(experts),
        "device": str(device),
        "fast_s": fast_s,
        "reference_s": ref_s,
        "fast_vs_reference": ref_s / fast_s,
        "error_vs_reference": whole,
        "worst_matrix_error_vs_reference": worst,
        "fast_extra_rss_mib": fast_mem.extra_mib,
        "reference_extra_rss_mib": ref_mem.extra_mib,
        "gpu_peak_mib": fast_mem.gpu_mib,
    }
    if cpu_path:  # the same method on the CPU: what the device itself gains
        on_cpu, cpu_s, _ = timed(lambda: merge(method, base, experts, device="cpu"), torch.device("cpu"))
        whole_cpu, worst_cpu = agreement(fast, on_cpu, base)
        print(
            f"{method:6s} N={len(experts)}  {device} {fast_s:8.2f} s  same method on the CPU {cpu_s:8.2f} s  "
            f"speed-up {cpu_s / fast_s:5.1f}x  rel. difference {whole_cpu:.1e} (worst matrix {worst_cpu:.1e})",
            flush=True,
        )
        figures |= {
            "cpu_path_s": cpu_s,
            "fast_vs_cpu_path": cpu_s / fast_s,
            "difference_vs_cpu_path": whole_cpu,
            "worst_matrix_difference_vs_cpu_path": worst_cpu,
        }
    return figures


def busy_loop() -> None:  # pragma: no cover - runs in a child process
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    while True:
        pass


def peft_loop(fn, base, experts, **kw):
    """PEFT's way: one ``merge_utils`` call per tensor on the list of its task vectors."""
    weights = torch.ones(len(experts))
    return {k: w + fn([e[k] - w for e in experts], weights, **kw) for k, w in base.items()}


def against_peft(base, experts, *, density: float = 0.2, keep: float = 0.1) -> list[dict]:
    """Time ours against PEFT, pair by pair in this run, print the ratios and the agreement."""
    from peft.utils import merge_utils

    from lib.merge.dare import draws, keep_mask

    pairs = [
        (
            "ties scope=tensor",
            lambda: merge("ties", base, experts, density=density, scope="tensor"),
            "peft ties",
            lambda: peft_loop(merge_utils.ties, base, experts, density=density),
        ),
        ("ties scope=model", lambda: merge("ties", base, experts, density=density), "peft ties", None),
        (
            "dare then=ties",
            lambda: merge("dare", base, experts, keep=keep, then="ties"),
            "peft dare_ties",
            lambda: peft_loop(merge_utils.dare_ties, base, experts, density=keep),
        ),
    ]
    runs, peft_s, peft_cpu = [], {}, {}
    for ours_name, ours_fn, peft_name, peft_fn in pairs:
        ours, ours_s, ours_mem = timed(ours_fn, torch.device("cpu"))
        if peft_fn is not None:
            reference, peft_s[peft_name], peft_mem = timed(peft_fn, torch.device("cpu"))
            peft_cpu[peft_name] = peft_mem.cpu_s
        theirs, theirs_cpu = peft_s[peft_name], peft_cpu[peft_name]
        line = (
            f"{ours_name:18s} {ours_s:7.2f} s ({ours_mem.cpu_s:6.2f} CPU s)   {peft_name:15s} {theirs:7.2f} s "
            f"({theirs_cpu:6.2f} CPU s)   ours {theirs / ours_s:4.1f}x faster ({theirs_cpu / ours_mem.cpu_s:4.1f}x in CPU time)"
        )
        if ours_name == "ties scope=tensor":
            line += "   " + tie_explained_difference(ours, reference, base, experts, density)
        print(line + f"   load {os.getloadavg()[0]:.1f}", flush=True)
        runs.append(
            {
                "ours": ours_name,
                "ours_s": ours_s,
                "ours_cpu_s": ours_mem.cpu_s,
                "peft": peft_name,
                "peft_s": theirs,
                "peft_cpu_s": theirs_cpu,
                "speedup": theirs / ours_s,
                "speedup_cpu": theirs_cpu / ours_mem.cpu_s,
                "load": os.getloadavg()[0],
            }
        )
    # DARE's floor: the seeded per-(key, expert) torch.rand draws that make the published masks,
    # timed alone; ours can be at most peft / draws faster however cheap the rest becomes
    start = time.process_time()
    for k, w in base.items():
        for i in range(len(experts)):
            draws(w.shape, key=k, expert=i, seed=0)
    draws_cpu = time.process_time() - start
    dare = runs[-1]
    dare |= {
        "draws_cpu_s": draws_cpu,
        "draws_share_of_ours": draws_cpu / dare["ours_cpu_s"],
        "floor_speedup_cpu": dare["peft_cpu_s"] / draws_cpu,
    }
    print(
        f"dare's mask draws (torch.rand, same sizes) {draws_cpu:6.2f} CPU s: {dare['draws_share_of_ours']:.0%} of ours; "
        f"with all else free ours would be {dare['floor_speedup_cpu']:.1f}x PEFT's dare_ties in CPU time",
        flush=True,
    )

    # the first call of each pays the kernel's page faults for its fresh buffers (system time,
    # which varies by 2 s from run to run on this machine); repeated calls, the best of WARM,
    # show the arithmetic and the draws alone
    def best_cpu(fn) -> float:
        times = []
        for _ in range(WARM):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        return min(times)

    warm = {
        "ours_warm_cpu_s": best_cpu(lambda: merge("dare", base, experts, keep=keep, then="ties")),
        "peft_warm_cpu_s": best_cpu(lambda: peft_loop(merge_utils.dare_ties, base, experts, density=keep)),
        "draws_warm_cpu_s": best_cpu(
            lambda: [draws(w.shape, key=k, expert=i, seed=0) for k, w in base.items() for i in range(len(experts))]
        ),
    }
    warm["speedup_cpu_warm"] = warm["peft_warm_cpu_s"] / warm["ours_warm_cpu_s"]
    warm["floor_speedup_cpu_warm"] = warm["peft_warm_cpu_s"] / warm["draws_warm_cpu_s"]
    dare |= warm
    print(
        f"dare then=ties warm (best of {WARM}): ours {warm['ours_warm_cpu_s']:.2f} CPU s, peft dare_ties "
        f"{warm['peft_warm_cpu_s']:.2f} CPU s: ours {warm['speedup_cpu_warm']:.1f}x faster; the draws alone "
        f"{warm['draws_warm_cpu_s']:.2f} CPU s, so no implementation drawing these masks can be more than "
        f"{warm['floor_speedup_cpu_warm']:.1f}x faster",
        flush=True,
    )
    # DARE-TIES given the same masks (PEFT draws its own from torch's global generator)
    masks = iter(
        [keep_mask(w.shape, 1.0 - keep, key=k, expert=i, seed=0) for k, w in base.items() for i in range(len(experts))]
    )
    original = merge_utils.random_pruning
    merge_utils.random_pruning = lambda tensor, density, rescale: tensor * next(masks) / density
    try:
        same_masks = peft_loop(merge_utils.dare_ties, base, experts, density=keep)
    finally:
        merge_utils.random_pruning = original
    ours = merge("dare", base, experts, keep=keep, then="ties")
    differing = sum(int((ours[k] != same_masks[k]).sum()) for k in base)
    print(
        f"dare then=ties vs PEFT dare_ties given our masks: {differing} of {sum(w.numel() for w in base.values())} entries differ",
        flush=True,
    )
    return runs


def tie_explained_difference(ours, reference, base, experts, density) -> str:
    """Entries where ours and PEFT's per-tensor TIES differ, and how many of those have an
    expert's magnitude equal to its threshold (kept by us, by PEFT only if its top-k chose it)."""
    from lib.merge.ties import floor_kept_count, kth_largest

    differing = at_tie = 0
    for k, w in base.items():
        diff = ours[k] != reference[k]
        if not diff.any():
            continue
        differing += int(diff.sum())
        taus = torch.stack([e[k] - w for e in experts]).reshape(len(experts), -1).abs()
        threshold = kth_largest(taus, floor_kept_count(taus.shape[1], density))
        at_tie += int(((taus == threshold) & diff.reshape(1, -1)).any(0).sum())
    total = sum(w.numel() for w in base.values())
    return f"{differing} of {total} entries differ from PEFT's, {at_tie} of them at a tie of the threshold"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one layer, three experts")
    parser.add_argument("--layers", type=int, default=None, help="encoder layers (default 12; 1 with --quick)")
    parser.add_argument(
        "--experts", type=int, nargs="+", default=None, help="expert counts (default 3 8; 3 with --quick)"
    )
    parser.add_argument("--methods", nargs="+", default=list(REFERENCES), choices=list(REFERENCES))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: lib.device.get_device())")
    parser.add_argument(
        "--no-cpu-path", action="store_true", help="on a GPU, do not also time the fast path on the CPU"
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="write the figures to this JSON file, atomically (default: benchmarks/results/, docstring)",
    )
    parser.add_argument(
        "--against-peft", action="store_true", help="TIES and DARE-TIES against PEFT instead (module docstring)"
    )
    parser.add_argument("--busy", action="store_true", help="a busy loop on one core beside the benchmark")
    args = parser.parse_args(argv)
    layers = args.layers or (1 if args.quick else 12)
    expert_counts = args.experts or ([3] if args.quick or args.against_peft else [3, 8])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    cpu_path = device.type != "cpu" and not args.no_cpu_path
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU thread(s), "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {layers} BERT-base layer(s)",
        flush=True,
    )
    busy = None
    if args.busy:
        import multiprocessing

        busy = multiprocessing.get_context("spawn").Process(target=busy_loop, daemon=True)
        busy.start()
        print("a busy loop runs on core 0 beside the benchmark", flush=True)
    try:
        runs = []
        if args.against_peft:
            for n_experts in expert_counts:
                runs += against_peft(*bert_like(layers, n_experts))
        else:
            runs = star_and_drm(args, layers, expert_counts, device, cpu_path)
    finally:
        if busy is not None:
            busy.terminate()
    name = "merge_vs_peft" if args.against_peft else "merge.quick" if args.quick else "merge"
    target = args.json or ROOT / "benchmarks" / "results" / f"{name}{'.busy' if args.busy else ''}.json"
    print(
        "results:",
        write_json(
            target,
            {
                "benchmark": name,
                "torch": torch.__version__,
                "device": str(device),
                "layers": layers,
                "threads": torch.get_num_threads(),
                "busy": args.busy,
                "runs": runs,
            },
        ),
    )
    return 0


def star_and_drm(args, layers, expert_counts, device, cpu_path) -> list[dict]:
    runs = []
    for n_experts in expert_counts:
        base, experts = bert_like(layers, n_experts)
        if device.type != "cpu":  # cuBLAS/cuSOLVER initialisation out of the timings
            first_layer = [k for k in base if k.startswith("encoder.layer.0.")]
            for method in args.methods:
                merge(
                    method,
                    {k: base[k] for k in first_layer},
                    [{k: e[k] for k in first_layer} for e in experts],
                    device=device,
                )
        for method in args.methods:
            runs.append(compare(method, base, experts, device, cpu_path=cpu_path))
    return runs


if __name__ == "__main__":
    sys.exit(main())
