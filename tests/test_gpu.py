"""The GPU paths (issue 20): every routine that runs on ``lib.device``'s choice gives on CUDA what
it gives on the CPU. Marked ``gpu``; every test skips without CUDA, so ``make test`` stays green
on a CPU-only machine. ``make gpu-check`` (``benchmarks/gpu_check.py``) runs them with
``pytest -m gpu`` on a GPU machine.

``GPU_TEST_DEVICE`` names the device under test (default ``cuda``). ``GPU_TEST_DEVICE=cpu`` is a
rehearsal on a machine without a GPU: every comparison then runs CPU against CPU, which proves
nothing about a GPU but runs each test's code end to end (what ``gpu_check.py --rehearse`` does),
so the GPU time goes to measuring, not to fixing the tests. The CUDA memory test still skips.

All tensors are synthetic with the shapes of BERT-base (or the tiny model of ``conftest.py``):
nothing is downloaded, and the GPU machine needs no more than torch, numpy, pandas, safetensors
and pytest.

Tolerances, per method, are relative Frobenius errors of the merged deltas (``merged - base``),
CUDA against CPU, on identical float32 inputs:

* elementwise float32 methods (average, task arithmetic, TIES, DARE, the SNR strategies): a few
  float32 roundings (``eps = 6e-8``) of sums taken in another order; DARE's masks are drawn on
  the CPU whatever the device (:mod:`lib.merge.dare`), TIES' thresholds are exact counts, and the
  SNR strategies' decisions are ranks of float32 SNRs, which a 1e-6 change does not reorder here.
* STAR and DRM compute in float64 (``PRECISION``); their docstrings measure the float64 Gram path
  at 2.5e-8 (STAR) and 6e-12 (DRM) from a float64 SVD reference, the float32 rounding of the
  output included, and ``tests/test_drm_reference.py`` holds DRM to 1e-6 on BERT shapes: the
  1e-6 below. (DRM, like TIES, jumps where an entry crosses its pruning threshold; identical
  inputs and float64 differences of 1e-15 do not move an entry across.)
"""

from __future__ import annotations

import gc
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib import spectral
from lib.linalg import gram_eigh, thin_svd
from lib.merge import METHODS, merge

DEVICE = os.environ.get("GPU_TEST_DEVICE", "cuda")
ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (make gpu-check on a GPU machine; GPU_TEST_DEVICE=cpu rehearses)",
    ),
]

ALL = sorted(METHODS)
N_EXPERTS = 3
#: relative Frobenius error of the merged deltas, device against CPU (module docstring): float32
#: rounding for the float32 methods, the documented float64 agreement for STAR and DRM
FLOAT32_ROUNDING = 1e-6
FLOAT64_SPECTRAL = {"star": 1e-6, "drm_h": 1e-6, "drm_v": 1e-6}
TOLERANCE = {name: FLOAT64_SPECTRAL.get(name, FLOAT32_ROUNDING) for name in METHODS}

HIDDEN, INTERMEDIATE, VOCAB, POSITIONS = 768, 3072, 30522, 512
#: one encoder layer of BERT-base, with the parameters a merge meets beside its matrices
BERT_LAYER = {
    "attention.self.query.weight": (HIDDEN, HIDDEN),
    "attention.self.query.bias": (HIDDEN,),
    "attention.self.key.weight": (HIDDEN, HIDDEN),
    "attention.self.value.weight": (HIDDEN, HIDDEN),
    "attention.output.dense.weight": (HIDDEN, HIDDEN),
    "attention.output.LayerNorm.weight": (HIDDEN,),
    "intermediate.dense.weight": (INTERMEDIATE, HIDDEN),
    "intermediate.dense.bias": (INTERMEDIATE,),
    "output.dense.weight": (HIDDEN, INTERMEDIATE),
    "output.LayerNorm.bias": (HIDDEN,),
}
#: every distinct matrix shape of BERT-base (word, position and token-type embeddings, attention
#: and pooler, the two feed-forward projections) and how many of each one model holds
BERT_MATRIX_SHAPES = {
    (VOCAB, HIDDEN): 1,
    (POSITIONS, HIDDEN): 1,
    (2, HIDDEN): 1,
    (HIDDEN, HIDDEN): 49,
    (INTERMEDIATE, HIDDEN): 12,
    (HIDDEN, INTERMEDIATE): 12,
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    scale = float(expected.norm())
    diff = float((actual.double() - expected).norm())
    return diff / scale if scale > 0 else diff


def low_rank_plus_noise(shape, generator, *, rank: int = 8, scale: float = 1e-3, spike: float = 10.0) -> torch.Tensor:
    """A fine-tuning-like update: a rank-``rank`` part ``spike`` times the noise above a noise
    bulk (matrices), or noise."""
    if len(shape) < 2:
        return scale * torch.randn(shape, generator=generator)
    rows, cols = shape
    u = torch.randn(rows, rank, generator=generator) / rank**0.5
    v = torch.randn(rank, cols, generator=generator) / cols**0.5
    return scale * (spike * u @ v + torch.randn(rows, cols, generator=generator) / max(rows, cols) ** 0.5)


@pytest.fixture(scope="module")
def bert_layer():
    """A float32 base (one BERT-base encoder layer, an integer buffer) and three experts whose
    low-rank parts differ in strength, so that the SNR strategies' rankings of experts have no
    near-ties that a float32 rounding (another batching, another device) could reorder."""
    g = torch.Generator().manual_seed(20)
    base = {f"encoder.layer.0.{k}": 0.02 * torch.randn(s, generator=g) for k, s in BERT_LAYER.items()}
    base["embeddings.position_ids"] = torch.arange(POSITIONS).unsqueeze(0)
    experts = []
    for i in range(N_EXPERTS):
        experts.append(
            {
                k: (w + low_rank_plus_noise(w.shape, g, spike=5.0 * (i + 1)) if w.is_floating_point() else w.clone())
                for k, w in base.items()
            }
        )
    return base, experts


def assert_same_merge(actual, expected, base, tolerance: float, what: str) -> None:
    assert list(actual) == list(expected), f"{what}: keys or their order differ"
    for k, want in expected.items():
        got = actual[k]
        assert got.shape == want.shape and got.dtype == want.dtype and got.device.type == "cpu", f"{what}: {k}"
        if not want.is_floating_point():
            assert torch.equal(got, want), f"{what}: integer buffer {k} differs"
            continue
        err = relative_error(got - base[k].to(got.dtype), want - base[k].to(want.dtype))
        assert err <= tolerance, (
            f"{what}: {k} differs from the CPU result by {err:.1e} (relative), tolerance {tolerance:.0e}"
        )


@pytest.mark.parametrize("name", ALL)
def test_merge_on_device_equals_cpu_on_bert_shapes(name, bert_layer):
    base, experts = bert_layer
    on_cpu = merge(name, base, experts, device="cpu")
    on_device = merge(name, base, experts, device=DEVICE)
    assert_same_merge(on_device, on_cpu, base, TOLERANCE[name], f"{name} on {DEVICE}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", ALL)
def test_half_precision_inputs_merge_in_float32_on_device(name, dtype, tiny_base, tiny_experts):
    """float16/bfloat16 checkpoints (the tiny model of conftest.py): computed in float32 on the
    device, returned in their own dtype on the CPU, equal to the CPU's merge up to one rounding
    to that dtype."""
    base32, experts32 = tiny_base, tiny_experts
    low = lambda sd: {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}  # noqa: E731
    base, experts = low(base32), [low(e) for e in experts32]
    on_device = merge(name, base, experts, device=DEVICE)
    on_cpu = merge(name, base, experts, device="cpu")
    for k, want in on_cpu.items():
        got = on_device[k]
        assert got.dtype == base[k].dtype and got.device.type == "cpu", k
        if want.is_floating_point():  # assert_close's defaults for the dtype: about one rounding to it
            torch.testing.assert_close(got, want, msg=lambda m: f"{name} {dtype} {k}: {m}")
        else:
            assert torch.equal(got, want), k


def bert_base_matrices(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every matrix of one BERT-base: planted spikes in a noise bulk, float32."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for (rows, cols), count in BERT_MATRIX_SHAPES.items():
        for i in range(count):
            strengths = [4.0, 3.0, 2.0] if min(rows, cols) > 8 else [4.0]
            out[f"m{rows}x{cols}.{i}"] = 0.02 * spectral.planted_spikes(rows, cols, strengths, generator=g)
    return out


def test_scan_on_device_equals_cpu_on_bert_base():
    """``scan`` of every BERT-base matrix: float32 Gram eigenvalues differ by round-off (about
    ``sqrt(k) * eps * lambda_max``, ``k`` the Gram size), which moves the fitted columns by far
    less than 1e-4 and no eigenvalue across the detection threshold."""
    weights = bert_base_matrices()
    on_cpu = spectral.scan(weights, device="cpu")
    on_device = spectral.scan(weights, device=DEVICE)
    assert list(on_device["name"]) == list(on_cpu["name"])
    assert (on_device["n_signal"] == on_cpu["n_signal"]).all(), "a spike was found on one device only"
    for column in ["sigma2", "lambda_plus", "threshold", "lambda_max", "signal_fraction", "snr_mp", "snr"]:
        torch.testing.assert_close(
            torch.tensor(on_device[column].to_numpy()),
            torch.tensor(on_cpu[column].to_numpy()),
            rtol=1e-4,
            atol=0.0,
            msg=lambda m: f"scan column {column}: {m}",
        )
    cpu_spectra = spectral.spectra(list(weights.values()), device="cpu")
    device_spectra = spectral.spectra(list(weights.values()), device=DEVICE)
    for name, ours, ref in zip(weights, device_spectra, cpu_spectra):
        k = len(ref.eigenvalues)
        err = float((ours.eigenvalues - ref.eigenvalues).abs().max()) / ref.lambda_max
        assert err <= 10 * k**0.5 * torch.finfo(torch.float32).eps, (
            f"{name}: eigenvalues differ by {err:.1e} of lambda_max"
        )


@pytest.mark.parametrize("shape", list(BERT_MATRIX_SHAPES), ids=[f"{r}x{c}" for r, c in BERT_MATRIX_SHAPES])
def test_batched_gram_eigensolver_on_stacks_of_bert_base_shapes(shape):
    """``gram_eigh``/``thin_svd`` in float64 on a stack of one BERT-base shape (the N = 3 task
    vectors of one matrix; of four for the square attention shape, as STAR batches them):
    computed on the device (no CPU fallback), the singular values of the CPU's to
    ``1e-10 * sigma_max``, the factorisation exact to 1e-10. (Stacks stay small because the CPU
    reference is the slow side: 4 minutes per large shape on a loaded 2-core CPU.)"""
    rows, cols = shape
    batch = N_EXPERTS * (4 if shape == (HIDDEN, HIDDEN) else 1)
    g = torch.Generator().manual_seed(rows + cols)
    stack = torch.stack([low_rank_plus_noise(shape, g) for _ in range(batch)])
    on_device = stack.to(DEVICE)
    sigma, vectors, right = gram_eigh(on_device)
    assert sigma.device == on_device.device and vectors.device == on_device.device, "eigh fell back to another device"
    assert sigma.dtype == torch.float64
    sigma_cpu, _, right_cpu = gram_eigh(stack)
    assert right == right_cpu
    err = ((sigma.cpu() - sigma_cpu).abs().amax(-1) / sigma_cpu[:, 0]).max()
    assert float(err) <= 1e-10, f"singular values differ by {float(err):.1e} of sigma_max"
    u, s, vh = thin_svd(on_device)
    reconstruction = (u * s.unsqueeze(-2)) @ vh
    assert relative_error(reconstruction.cpu(), stack) <= 1e-10
    del on_device, sigma, vectors, u, s, vh, reconstruction


def test_batched_gram_eigensolver_in_float32_on_device():
    """The float32 path (``dtype=torch.float32``) also runs on the device; its singular values
    are known to about ``eps * sigma_max**2 / sigma`` (:mod:`lib.linalg`), checked at the top."""
    g = torch.Generator().manual_seed(32)
    stack = torch.stack([low_rank_plus_noise((HIDDEN, HIDDEN), g) for _ in range(2 * N_EXPERTS)])
    sigma, _, _ = gram_eigh(stack.to(DEVICE), dtype=torch.float32)
    assert sigma.device.type == torch.device(DEVICE).type and sigma.dtype == torch.float32
    sigma64, _, _ = gram_eigh(stack)
    top = slice(0, 8)  # the planted rank-8 part: well above round-off
    err = ((sigma.cpu().double()[:, top] - sigma64[:, top]).abs() / sigma64[:, top]).max()
    assert float(err) <= 1e-4, f"float32 top singular values differ by {float(err):.1e} (relative)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.memory_allocated needs a CUDA GPU")
@pytest.mark.parametrize("name", ALL)
def test_merge_releases_device_memory(name, bert_layer):
    """After a merge returns (its result is on the CPU), the CUDA memory it allocated is free
    again: no tensor of it is kept in a cache, a context or a reference cycle."""
    base, experts = bert_layer
    merge(name, base, experts, device=DEVICE)  # first-call allocations (cuBLAS/cuSOLVER workspaces) out of the count
    gc.collect()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    merged = merge(name, base, experts, device=DEVICE)
    assert all(t.device.type == "cpu" for t in merged.values())
    gc.collect()
    torch.cuda.synchronize()
    leaked = torch.cuda.memory_allocated() - start
    assert leaked == 0, f"{name} left {leaked / 2**20:.1f} MiB allocated on {DEVICE} after the merge"


#: the CLI imports these at module level; the GPU machine may not have them
CLI_MODULES = ("yaml", "tqdm", "safetensors")
#: one of each kind of streamed merge: elementwise in row blocks with a two-pass model-wide
#: prepass (TIES), a spectral prepass (SNR), batched float64 spectra per stack (STAR, DRM-H)
CLI_METHODS = ["ties", "snr_winner", "star", "drm_h"]


@pytest.mark.parametrize("name", CLI_METHODS)
def test_streaming_cli_merge_on_device(name, bert_layer, tmp_path):
    """``python -m lib merge ... --device cuda`` on checkpoints written here equals
    ``lib.merge.merge`` on the CPU (the streamed and in-memory merges are equal on the CPU:
    tests/test_cli.py)."""
    missing = [m for m in CLI_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"lib.cli imports {', '.join(missing)}, not installed here: the streaming merge cannot start")
    from safetensors.torch import load_file, save_file

    base, experts = bert_layer
    paths = []
    for i, sd in enumerate([base, *experts]):
        path = tmp_path / f"model_{i}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
        paths.append(str(path))
    out = tmp_path / "merged"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lib",
            "merge",
            "--method",
            name,
            "--base",
            paths[0],
            "--experts",
            *paths[1:],
            "--out",
            str(out),
            "--device",
            DEVICE,
            "--quiet",
            "--block-size",
            "1MiB",
        ],  # the 3072-row matrices (9 MiB) stream in row blocks
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"python -m lib merge --device {DEVICE} failed:\n{proc.stdout}\n{proc.stderr}"
    streamed = {}
    for shard in sorted(out.glob("*.safetensors")):
        streamed.update(load_file(shard))
    on_cpu = merge(name, base, experts, device="cpu")
    assert_same_merge({k: streamed[k] for k in on_cpu}, on_cpu, base, TOLERANCE[name], f"streamed {name} on {DEVICE}")
