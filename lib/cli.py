"""``python -m lib scan`` and ``python -m lib merge``: spectra and merges of the user's own
Hugging Face checkpoints, streamed tensor by tensor from disk.

    python -m lib scan MODEL --out scan.csv [--plot scan.png]
    python -m lib merge --method ties --base BASE --experts A B --out merged [--set density=0.3]
    python -m lib merge --config merge.yaml --out merged

MODEL is a model folder (``config.json`` + safetensors, sharded or not) or one ``.safetensors``
file. The merge config follows mergekit's shape::

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/expert_a
        parameters: {weight: 0.7}      # per-model weights, for methods that take ``weights``
      - path/to/expert_b
    parameters: {density: 0.3}
    exclude: [classifier]              # regexes of keys kept from the base, as in lib.merge.merge

Flags override the config; ``--set`` overrides its parameters. Merging reads one tensor of
each model at a time and writes the merged tensor straight into its shard. Methods that look
across the whole model first visit every selected key in a prepass, whose small result (TIES'
thresholds, the SNR strategies' per-layer decisions) then merges each key on its own (see
:mod:`lib.merge`). A tensor larger than ``--block-size`` (in compute precision) is read, merged
and written in blocks of rows when that gives the same result: for the methods that act entry
by entry (``elementwise`` in the registry) and for tensors copied rather than merged; so the
memory a merge needs is a few blocks per model, not a few copies of the largest tensor (BERT's
word embeddings: 94 MB each). The result equals :func:`lib.merge.merge` on the same inputs.

Bad input (missing or corrupt file, architectures that differ, NaN/Inf, unknown method or
hyperparameter, an existing output without ``--force``) ends the command with one line on
stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import math
import re
import signal
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor
from tqdm.auto import tqdm

from . import merge as merging
from .checkpoint import (
    Checkpoint,
    ShardedWriter,
    atomic_output_dir,
    check_can_write,
    check_same_architecture,
    copy_side_files,
)
from .paths import atomic_write_bytes
from .statedict import compute_dtype, matches, module_of

#: the file written next to the shards that records how the model was made, in the same
#: format as ``--config`` so that the merge can be repeated
MERGE_RECORD = "merge_config.yaml"
CONFIG_KEYS = ("merge_method", "method", "base_model", "models", "parameters", "include", "exclude")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
#: largest block of rows of one tensor of one model merged at a time (in compute precision): a
#: merge holds its inputs and temporaries, 5 to 25 such blocks, so this sets the memory it needs
#: beyond the fixed cost of torch. benchmarks/stream_merge.py, BERT-base + 3 experts, resident
#: memory above the import: average 41 MB, task arithmetic 46 MB, TIES 70 MB with 4 MiB blocks
#: (process peaks 579, 584, 608 MB against the 657 MB of 1.5 checkpoints); before the fixed mmap
#: threshold and the in-place TIES step 42/49/153 MB at 4 MiB and 138/109/442 MB at 16 MiB;
#: 2.2, 2.2 and 2.7 GB loading every model whole
DEFAULT_BLOCK_BYTES = 4 * 2**20
EXIT_BAD_INPUT = 1
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------- parsing values and configs


def parse_value(text: str) -> Any:
    """``--set`` values: ``none``/``null`` -> None, ``true``/``false`` -> bool, numbers (``1e-3``
    too), ``[a, b]`` or ``a,b`` -> list, anything else stays a string."""
    s = text.strip()
    if s.lower() in ("none", "null", "~"):
        return None
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    for number in (int, float):
        try:
            return number(s)
        except ValueError:
            pass
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
        return [parse_value(x) for x in s.split(",")] if s.strip() else []
    if "," in s:
        return [parse_value(x) for x in s.split(",")]
    return s


def parse_assignments(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = parse_value(value)
    return out


def parse_size(text: str) -> int:
    """``"2GB"``, ``"500MiB"``, ``"1000"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in SIZE_UNITS:
        raise ValueError(f"cannot read size {text!r}; write e.g. 2GB, 500MB, 512MiB or a number of bytes")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


def load_config(path: str | Path) -> dict[str, Any]:
    """A mergekit-style YAML file as ``{method, base, experts, parameters, include, exclude}``
    (absent entries are left out, so command-line flags can fill them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a merge config is a mapping with keys {', '.join(CONFIG_KEYS)}")
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid: {', '.join(CONFIG_KEYS)}")
    spec: dict[str, Any] = {}
    method = raw.get("merge_method", raw.get("method"))
    if method is not None:
        spec["method"] = method
    if raw.get("base_model") is not None:
        spec["base"] = str(raw["base_model"])
    parameters = dict(raw.get("parameters") or {})
    if "models" in raw:
        spec["experts"], weights = _config_models(path, raw["models"])
        if any(w is not None for w in weights):
            if None in weights:
                raise ValueError(f"{path}: give a weight to every model or to none")
            parameters["weights"] = weights
    spec["parameters"] = parameters
    for key in ("include", "exclude"):
        if raw.get(key) is not None:
            spec[key] = raw[key]
    return spec


def _config_models(path: Path, models) -> tuple[list[str], list[float | None]]:
    if not isinstance(models, list) or not models:
        raise ValueError(f"{path}: 'models' must be a non-empty list of paths or {{model: path}} entries")
    experts, weights = [], []
    for entry in models:
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(f"{path}: each entry of 'models' is a path or {{model: path, parameters: ...}}, got {entry!r}")
        params = dict(entry.get("parameters") or {})
        other = sorted(set(params) - {"weight"})
        if other:
            raise ValueError(
                f"{path}: per-model parameters {other} are not supported (only 'weight'); "
                "put method hyperparameters under the top-level 'parameters'"
            )
        experts.append(str(entry["model"]))
        weights.append(params.get("weight"))
    return experts, weights


def merge_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The merge to run: the config file (if any), overridden by the flags that were given."""
    spec = load_config(args.config) if args.config else {"parameters": {}}
    for field, value in (("method", args.method), ("base", args.base), ("experts", args.experts),
                         ("include", args.include), ("exclude", args.exclude)):
        if value:
            spec[field] = value
    spec["parameters"] = {**spec["parameters"], **parse_assignments(args.set or [])}
    missing = [flag for field, flag in (("method", "--method"), ("experts", "--experts")) if not spec.get(field)]
    if missing:
        raise ValueError(f"missing {' and '.join(missing)} (give the flag or put it in --config)")
    return spec


# ---------------------------------------------------------------- streaming merge


def row_blocks(shape: Sequence[int], itemsize: int, block_bytes: int) -> list[slice | None]:
    """Slices of the first dimension that cut a tensor of ``shape`` (``itemsize`` bytes an entry)
    into blocks of at most ``block_bytes`` (at least one row each); ``[None]``, the whole tensor,
    when it fits in one block."""
    if block_bytes <= 0:
        raise ValueError(f"the block size must be positive, got {block_bytes} bytes")
    size = math.prod(shape) * itemsize
    if not shape or size <= block_bytes:
        return [None]
    step = max(1, block_bytes // (size // shape[0]))
    return [slice(first, min(first + step, shape[0])) for first in range(0, shape[0], step)]


def tensor_blocks(t: Tensor, block_bytes: int) -> list[slice | None]:
    """:func:`row_blocks` of a tensor (or meta tensor) whose entries take, in compute precision,
    4 or 8 bytes if floating-point (float16 is merged in float32) and their own size otherwise."""
    itemsize = compute_dtype(t).itemsize if t.dtype.is_floating_point else t.element_size()
    return row_blocks(t.shape, itemsize, block_bytes)


def merge_blocks(method: merging.Method, params: dict[str, Any], meta: dict[str, Tensor], selected: Sequence[str],
                 block_bytes: int) -> dict[str, list[slice | None]]:
    """Key -> the row blocks it is merged in: :func:`tensor_blocks` where the result does not
    depend on the cut (the method is elementwise, or the key is not merged but copied), the
    whole tensor otherwise."""
    by_rows = merging.is_elementwise(method, params)
    merged = set(selected)
    return {k: tensor_blocks(t, block_bytes) if by_rows or k not in merged else [None] for k, t in meta.items()}


class _PrepassItems:
    """Re-iterable ``(key, base, [experts])`` over the selected keys (over their row blocks when
    ``blocks`` is given), read lazily from disk in compute precision; each pass starts over (TIES'
    exact threshold reads the model twice)."""

    def __init__(self, base: Checkpoint | None, experts: Sequence[Checkpoint], keys: Sequence[str],
                 blocks: dict[str, list[slice | None]] | None, device, progress: bool):
        self.base, self.experts, self.keys, self.blocks = base, experts, keys, blocks
        self.device, self.progress = device, progress
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        bar = tqdm(self.keys, desc=f"prepass {self.passes}", unit="tensor", leave=False, disable=not self.progress)
        for k in bar:
            for rows in [None] if self.blocks is None else self.blocks[k]:
                # no local names the tensors, so this generator holds none of them while the
                # consumer asks for the next item: only one item is in memory at a time
                yield self._item(k, rows)

    def _item(self, key: str, rows: slice | None):
        base = None if self.base is None else merging.to_compute(self.base.read(key, rows), self.device)
        return key, base, [merging.to_compute(e.read(key, rows), self.device) for e in self.experts]


def merge_checkpoints(
    method: str,
    base: str | Path | None,
    experts: Sequence[str | Path],
    out: str | Path,
    *,
    parameters: dict[str, Any] | None = None,
    include=None,
    exclude=None,
    device=None,
    force: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = True,
) -> Path:
    """Merge checkpoints on disk into the model folder ``out``, streaming (module docstring).

    ``out`` receives safetensors shards, ``model.safetensors.index.json``, the non-weight files
    of the reference model (the base, or expert 0 without a base: config, tokenizer) and
    ``merge_config.yaml``. Tensors larger than ``block_bytes`` are merged in blocks of rows
    where the method allows it. Returns ``out``.
    """
    spec = merging.get_method(method)
    params = merging.resolve_hparams(spec, dict(parameters or {}))
    if base is None and spec.needs_base:
        raise ValueError(f"{method!r} works on task vectors (expert - base) and needs --base")
    if not experts:
        raise ValueError("need at least one expert model")
    out = Path(out)
    check_can_write(out, force=force)
    inputs = ([] if base is None else [Path(base)]) + [Path(p) for p in experts]
    if any(out.resolve() == p.resolve() for p in inputs):
        raise ValueError(f"--out {out} is one of the input models; write the merge somewhere else")

    base_ck = None if base is None else Checkpoint(base, label=f"base ({base})")
    expert_cks = [Checkpoint(p, label=f"expert {i} ({p})") for i, p in enumerate(experts)]
    ref = base_ck or expert_cks[0]
    keys = check_same_architecture(ref, [c for c in (base_ck, *expert_cks) if c is not None and c is not ref])
    meta = ref.meta()
    selected = merging.select_keys(meta, include, exclude)
    blocks = merge_blocks(spec, params, meta, selected, block_bytes)
    context = None
    if selected:  # an empty selection merges nothing: every tensor is copied
        prepass_blocks = {k: tensor_blocks(meta[k], block_bytes) for k in selected} if spec.prepass_elementwise else None
        items = _PrepassItems(base_ck, expert_cks, selected, prepass_blocks, device, progress)
        context = merging.run_prepass(method, items, **params)

    def read_and_merge(key: str, rows: slice | None) -> Tensor:
        # a function so that the inputs are freed before the next block is read
        # merge() checks NaN/Inf itself (naming the model and key), so read unchecked here
        base_part = None if base_ck is None else {key: base_ck.read(key, rows, finite=False)}
        expert_parts = [{key: e.read(key, rows, finite=False)} for e in expert_cks]
        return merging.merge(method, base_part, expert_parts, include=include, exclude=exclude, device=device,
                             context=context, **params)[key]

    layout = {k: (e.dtype, e.shape) for k, e in ref.entries.items()}
    with atomic_output_dir(out, force=force) as tmp:
        writer = ShardedWriter(tmp, layout, max_shard_bytes)
        for k in tqdm(keys, desc=f"merge {method}", unit="tensor", disable=not progress):
            for rows in blocks[k]:
                writer.write(k, read_and_merge(k, rows), row=0 if rows is None else rows.start)
        writer.close()
        copy_side_files(ref, tmp)
        record = {"merge_method": method, "base_model": None if base is None else str(Path(base).resolve()),
                  "models": [str(Path(p).resolve()) for p in experts], "parameters": params,
                  "include": include, "exclude": exclude}
        (tmp / MERGE_RECORD).write_text(yaml.safe_dump(record, sort_keys=False))
    return out


# ---------------------------------------------------------------- streaming scan


def depth_order(name: str) -> list:
    """Sort key that puts ``layer.2`` before ``layer.10`` (safetensors headers sort by string)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def scan_checkpoint(model: str | Path, *, include=None, exclude=None, snr_method: str = "mp", device=None,
                    progress: bool = True):
    """:func:`lib.spectral.scan` of every matrix of a checkpoint on disk, one matrix in memory at
    a time. Returns its DataFrame: one row per matrix, in depth order (:func:`depth_order`)."""
    # pandas and the spectral code add ~130 MB of resident memory that merge does not need
    import pandas as pd

    from . import spectral

    ckpt = Checkpoint(model)
    names = sorted((k for k, e in ckpt.entries.items() if e.dtype.is_floating_point and len(e.shape) >= 2
                    and matches(k, include, exclude)), key=depth_order)
    if not names:
        raise ValueError(f"{model}: no floating-point matrix passes the include/exclude filters")
    rows = [spectral.scan({k: ckpt.read(k)}, method=snr_method, device=device)
            for k in tqdm(names, desc="scan", unit="matrix", disable=not progress)]
    return pd.concat(rows, ignore_index=True)


def matrix_kind(name: str) -> str:
    """The role of a matrix, the same in every layer: ``encoder.layer.3.attention.self.query.weight``
    -> ``attention.self.query``; names without a layer number keep their module path."""
    return re.sub(r"^.*?\.\d+\.", "", module_of(name)) or name


def plot_scan(table, title: str = ""):
    """Bar chart of the SNR of every matrix in depth order (log scale above 1: SNRs span orders
    of magnitude), coloured by the role of the matrix (query, key, value, feed-forward, ...), one
    tick per layer: where along the depth the signal above the noise bulk sits, and which kinds
    of matrix carry it."""
    import matplotlib.pyplot as plt

    from . import plotting  # noqa: F401  (applies the project's figure style)

    names = list(table["name"])
    kinds = [matrix_kind(n) for n in names]
    palette = dict(zip(dict.fromkeys(kinds), plt.get_cmap("tab20").colors * 5))
    fig, ax = plt.subplots(figsize=(max(9.0, 0.08 * len(names) + 3.0), 4.6))
    for kind, c in palette.items():
        idx = [i for i, k in enumerate(kinds) if k == kind]
        ax.bar(idx, [table["snr"].iloc[i] for i in idx], color=c, label=kind, width=0.85)
    ticks = {}
    for i, n in enumerate(names):
        layer = re.search(r"\.(\d+)\.", n)
        ticks.setdefault(layer.group(1) if layer else module_of(n).split(".")[0], i)
    ax.set_xticks(list(ticks.values()), list(ticks.keys()), fontsize=7, rotation=45)
    ax.set_yscale("symlog", linthresh=1.0)  # linear below 1 (noise-like, and 0 stays drawable), log above
    ax.set_xlabel("matrix, in depth order (ticks: first matrix of each layer)")
    ax.set_ylabel("SNR (signal / Marchenko-Pastur bulk)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# ---------------------------------------------------------------- commands


def _scan(args: argparse.Namespace) -> int:
    out, plot = Path(args.out), Path(args.plot) if args.plot else None
    for path in (out, plot):
        if path is not None:
            check_can_write(path, force=args.force)
    table = scan_checkpoint(args.model, include=args.include, exclude=args.exclude, snr_method=args.snr_method,
                            device=args.device, progress=not args.quiet)
    atomic_write_bytes(out, table.to_csv(index=False).encode())
    print(f"scanned {len(table)} matrices of {args.model} -> {out}")
    if plot is not None:
        from .plotting import savefig

        savefig(plot_scan(table, title=f"SNR per matrix of {args.model}"), path=plot)
        print(f"plot -> {plot}")
    return 0


#: glibc's ``mallopt`` parameter number of M_MMAP_THRESHOLD
_M_MMAP_THRESHOLD = -3
#: allocations above this many bytes get pages of their own, returned to the system when freed
MMAP_THRESHOLD = 1 << 20


def return_freed_blocks_to_the_system() -> bool:
    """Make glibc serve every allocation above :data:`MMAP_THRESHOLD` (1 MiB) with its own pages,
    so a freed block of rows goes back to the system instead of staying in the heap.

    glibc starts at a 128 KiB threshold but raises it to the size of each large block freed, up
    to 32 MiB; after the first few blocks, the blocks and their temporaries then come from the
    heap, which fragments and keeps its pages. Measured with ``benchmarks/stream_merge.py``
    (BERT-base, 3 experts, 4 MiB blocks): resident memory above the import, average 45 -> 32 MB,
    TIES 142 -> 99 MB. A fixed threshold is what ``MALLOC_MMAP_THRESHOLD_`` sets; it has to be
    set before the allocations, hence at the start of a command. False where it cannot be set
    (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # no glibc (macOS, musl without mallopt): leave the allocator alone
        return False


def _merge(args: argparse.Namespace) -> int:
    return_freed_blocks_to_the_system()
    spec = merge_spec(args)
    with _sigterm_as_interrupt():
        out = merge_checkpoints(spec["method"], spec.get("base"), spec["experts"], args.out,
                                parameters=spec["parameters"], include=spec.get("include"),
                                exclude=spec.get("exclude"), device=args.device, force=args.force,
                                max_shard_bytes=parse_size(args.max_shard_size),
                                block_bytes=parse_size(args.block_size), progress=not args.quiet)
    print(f"merged {len(spec['experts'])} expert(s) with {spec['method']} -> {out}")
    return 0


@contextmanager
def _sigterm_as_interrupt():
    """A batch scheduler stops jobs with SIGTERM; turn it into KeyboardInterrupt so the
    temporary output folder is cleaned up as for Ctrl-C."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def run(command, args: argparse.Namespace) -> int:
    """Run a command; bad input becomes one line on stderr and a non-zero exit status. Other
    exceptions are bugs and keep their traceback."""
    try:
        return command(args)
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, yaml.YAMLError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def add_commands(sub) -> None:
    """Add ``scan`` and ``merge`` to the subparsers of ``python -m lib``."""
    p = sub.add_parser("scan", help="per-matrix Marchenko-Pastur spectra and SNR of a checkpoint -> CSV (+ plot)")
    p.add_argument("model", help="model folder (config.json + safetensors, sharded or not) or a .safetensors file")
    p.add_argument("--out", required=True, help="CSV to write: one row per matrix")
    p.add_argument("--plot", help="also draw the per-matrix SNR as an image (e.g. scan.png)")
    p.add_argument("--snr-method", default="mp", help="SNR variant of lib.spectral.scan (default: mp)")
    _add_common(p)
    p.set_defaults(func=lambda args: run(_scan, args))

    p = sub.add_parser("merge", help="merge checkpoints on disk, streaming, into a loadable model folder")
    p.add_argument("--method", help=f"merge method: {', '.join(sorted(merging.METHODS))}")
    p.add_argument("--base", help="the pre-trained model the experts were fine-tuned from")
    p.add_argument("--experts", nargs="+", metavar="MODEL", help="the fine-tuned models")
    p.add_argument("--out", required=True, help="output model folder (written atomically)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="method hyperparameter, repeatable (e.g. --set density=0.3 --set weights=[0.7,0.3])")
    p.add_argument("--config", help="mergekit-style YAML: merge_method, base_model, models, parameters")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--block-size", default=f"{DEFAULT_BLOCK_BYTES // 2**20}MiB",
                   help="tensors larger than this are merged in blocks of rows where the method allows it, "
                        f"which bounds the memory used (default {DEFAULT_BLOCK_BYTES // 2**20}MiB)")
    _add_common(p)
    p.set_defaults(func=lambda args: run(_merge, args))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include", action="append", metavar="REGEX",
                   help="only keys matching this regex (repeatable); merge copies the others from the base")
    p.add_argument("--exclude", action="append", metavar="REGEX",
                   help="skip keys matching this regex (repeatable); merge copies them from the base")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
