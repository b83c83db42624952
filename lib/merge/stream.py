"""The out-of-core engine behind ``python -m lib merge`` and ``python -m lib scan``: merges and
spectra of checkpoints on disk, streamed tensor by tensor (:func:`merge_checkpoints`,
:func:`scan_checkpoint`). :mod:`lib.cli` parses the command line and the YAML config and calls
these; a script can call them directly with the same arguments.

Merging reads one tensor of each model at a time and writes the merged tensor straight into its
shard. Methods that look across the whole model first visit every selected key in a prepass,
whose small result (TIES' thresholds, the SNR strategies' per-layer decisions) then merges each
key on its own (see :mod:`lib.merge`). A tensor larger than ``--block-size`` (in compute
precision) is read, merged and written in blocks of rows when that gives the same result: for
the methods that act entry by entry (``elementwise`` in the registry) and for tensors copied
rather than merged; so the memory a merge needs is a few blocks per model, not a few copies of
the largest tensor (BERT's word embeddings: 94 MB each). The result equals
:func:`lib.merge.merge` on the same inputs.

Adapters. An expert may be a PEFT LoRA adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) of ``--base``: it is read against the base first (every adapted
module and saved tensor must exist there with the same shape; the error names the adapter and
the first mismatch) and streamed as the base plus its delta, computed for the block being merged
(:class:`lib.lora.AdapterCheckpoint`). When every expert is an adapter and the method keeps
low-rank task vectors low-rank (:data:`lib.lora.FACTORED`: star, drm_h, drm_v, task_arithmetic,
average), the adapted matrices are merged from the factors (:func:`lib.lora.merge_factored`,
no dense SVD), the tensors no adapter changes are the base's, and only the rest (a trained
classifier head) is merged densely; ``--out-format adapter`` then writes the result as a PEFT
adapter of the base instead of a model (same logits; ``merge_config.yaml`` and a model card
beside it). Any other merge of adapters densifies them block by block, as for full models.

Nothing is lost: ``--out`` may not be an input, hold one or lie inside one, ``--force`` replaces
only a previous merge output (a folder holding ``merge_config.yaml``) and ``--force-any``
anything else; the output appears only when complete. Bad input (missing or corrupt file,
architectures that differ, NaN/Inf, unknown method or hyperparameter, malformed weights or
regular expressions, an unusable device, filters that select nothing, an output that exists or
cannot be written) ends the command with one line on stderr and exit status 1, checked before
the first tensor is read wherever the headers suffice.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from tqdm.auto import tqdm

from .. import merge as merging
from ..checkpoint import (
    Checkpoint,
    ShardedWriter,
    SideFiles,
    atomic_output_dir,
    check_same_architecture,
    copy_side_files,
    integer_buffers_missing,
)
from ..device import get_device
from ..statedict import compile_patterns, compute_dtype, matches

#: the file written next to the shards that records how the model was made, in the same
#: format as ``--config`` so that the merge can be repeated
MERGE_RECORD = "merge_config.yaml"
#: what ``merge`` writes: a full model folder, or (merges of adapters that stay low-rank) a PEFT adapter
OUT_FORMATS = ("model", "adapter")
#: largest block of rows of one tensor of one model merged at a time (in compute precision): a
#: merge holds its inputs and temporaries, 5 to 25 such blocks, so this sets the memory it needs
#: beyond the fixed cost of torch. benchmarks/stream_merge.py, BERT-base + 3 experts, resident
#: memory above the import: average 41 MB, task arithmetic 46 MB, TIES 70 MB with 4 MiB blocks
#: (process peaks 579, 584, 608 MB against the 657 MB of 1.5 checkpoints); before the fixed mmap
#: threshold and the in-place TIES step 42/49/153 MB at 4 MiB and 138/109/442 MB at 16 MiB;
#: 2.2, 2.2 and 2.7 GB loading every model whole
DEFAULT_BLOCK_BYTES = 4 * 2**20


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


def merge_blocks(
    method: merging.Method, params: dict[str, Any], meta: dict[str, Tensor], selected: Sequence[str], block_bytes: int
) -> dict[str, list[slice | None]]:
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

    def __init__(
        self,
        base: Checkpoint | None,
        experts: Sequence[Checkpoint],
        keys: Sequence[str],
        blocks: dict[str, list[slice | None]] | None,
        device,
        progress: bool,
    ):
        self.base, self.experts, self.keys, self.blocks = base, experts, keys, blocks
        self.device, self.progress = device, progress
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        # a closed bar on any exit, so that an error is the last line on the terminal
        with tqdm(
            self.keys, desc=f"prepass {self.passes}", unit="tensor", leave=False, disable=not self.progress
        ) as bar:
            for k in bar:
                for rows in [None] if self.blocks is None else self.blocks[k]:
                    # no local names the tensors, so this generator holds none of them while the
                    # consumer asks for the next item: only one item is in memory at a time
                    yield self._item(k, rows)

    def _item(self, key: str, rows: slice | None):
        base = None if self.base is None else merging.to_compute(self.base.read(key, rows), self.device)
        return key, base, [merging.to_compute(e.read(key, rows), self.device) for e in self.experts]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out: Path, inputs: Sequence[Path], *, force: bool, force_any: bool, flag: str = "--out") -> None:
    """Refuse an output that would destroy an input or a folder that is not ours, before any work.

    ``out`` may not be an input, hold one (an expert file inside ``--out`` would be deleted with
    the folder it replaces) or lie inside an input model's folder. An existing ``out`` needs
    ``force``, and ``force`` replaces only a previous output of ``merge`` (a folder holding
    :data:`MERGE_RECORD`) or an empty folder; anything else also needs ``force_any``."""
    target = out.resolve()
    for given in inputs:
        p = given.resolve()
        if _inside(p, target):
            what = "is" if p == target else "contains"
            raise ValueError(f"{flag} {out} {what} the input {given}; write the merge somewhere else")
        if p.is_dir() and _inside(target, p):
            raise ValueError(f"{flag} {out} is inside the input model folder {given}; write the merge somewhere else")
    if not (out.exists() or out.is_symlink()):
        check_creatable(out, flag)
        return
    if not force:
        raise FileExistsError(
            f"{out} already exists; pass --force to replace a previous merge output, or choose another {flag}"
        )
    ours = out.is_dir() and not out.is_symlink() and ((out / MERGE_RECORD).is_file() or not any(out.iterdir()))
    if not (ours or force_any):
        raise FileExistsError(
            f"{out} exists and is not a merge output (it has no {MERGE_RECORD}); --force replaces only "
            "those: remove it yourself, choose another --out, or add --force-any to replace it anyway"
        )


def check_patterns(include, exclude) -> None:
    """Malformed ``--include``/``--exclude`` regular expressions, reported before any work."""
    compile_patterns(include, "--include")
    compile_patterns(exclude, "--exclude")


def model_card(
    record: dict[str, Any],
    *,
    merged: int,
    copied: int,
    reference: str,
    side: SideFiles,
    integer_buffers: dict[str, list[str]],
) -> str:
    """The ``README.md`` of a merged model: that it is a merge, of what, how, and what was copied
    rather than merged (the base's own card describes the base, not this model)."""
    front = {"base_model": record["base_model"], "tags": ["merge", "spectral-merge", record["merge_method"]]}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# A merge of {len(record['models'])} model(s) with `{record['merge_method']}`",
        "",
        "Made with `python -m lib merge` (spectral-merge). The exact configuration is in "
        f"`{MERGE_RECORD}`; `python -m lib merge --config {MERGE_RECORD} --out OTHER` repeats it.",
        "",
        f"- **base**: `{record['base_model']}`"
        if record["base_model"]
        else "- **base**: none (the experts were averaged)",
        "- **experts**:",
        *[f"  - `{m}`" for m in record["models"]],
        f"- **method**: `{record['merge_method']}` ({merging.get_method(record['merge_method']).description})",
        "- **hyperparameters**: " + (", ".join(f"`{k}={v!r}`" for k, v in record["parameters"].items()) or "none"),
        f"- **tensors**: {merged} merged; {copied} copied unchanged from {reference} "
        "(integer buffers, and tensors excluded by `include`/`exclude`)",
    ]
    if record.get("out_format") == "adapter":
        lines.append(
            "- **format**: a PEFT LoRA adapter of the base (`PeftModel.from_pretrained(base_model, folder)`): the "
            "merged adapted matrices as low-rank factors, other merged tensors (a classifier head) as "
            "`modules_to_save`"
        )
    if record.get("include") or record.get("exclude"):
        lines.append(f"- **selection**: include `{record.get('include')}`, exclude `{record.get('exclude')}`")
    for key, labels in integer_buffers.items():
        lines.append(
            f"- **integer buffer** `{key}`: missing from {', '.join(labels)} (a buffer the model rebuilds, "
            f"such as the position ids `transformers` 5 no longer saves); copied from {reference}"
        )
    if side.copied:
        lines.append(f"- **other files** copied from {reference}: {', '.join(f'`{n}`' for n in side.copied)}")
    if side.unmerged_weights:
        lines.append(
            f"- **not merged**: the module folders {', '.join(f'`{n}`' for n in side.unmerged_weights)} hold "
            f"weights of their own, copied unchanged from {reference}"
        )
    if side.skipped:
        lines.append(
            f"- **left out**: {', '.join(f'`{n}`' for n in side.skipped)} (weights of {reference} in another "
            "format, which would not be the merge)"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_checkpoints` wrote: the folder and how many tensors were merged or copied."""

    out: Path
    merged: int
    copied: int
    side: SideFiles


#: torch threads of a merge whose tensors are merged entry by entry (:func:`merge_threads`)
ELEMENTWISE_THREADS = 1


def merge_threads(method: merging.Method, params: dict[str, Any], threads: int | None) -> int:
    """The torch intra-op threads a streamed merge runs with: ``threads`` when given, else
    :data:`ELEMENTWISE_THREADS` (one) for a method that merges entry by entry, and torch's own
    count for the others (SVDs and eigendecompositions of whole matrices: STAR, DRM, the SNR
    strategies' prepass).

    Why one: an elementwise merge is a stream of small, memory-bound operations on blocks of at
    most ``--block-size`` (a few milliseconds each), and every one of them waits for its slowest
    thread. When another process holds one of the cores, that thread gets the core only for the
    scheduler's time slices, so each small operation waits a slice: the command-line task
    arithmetic of a 94M-parameter Llama-shaped model took 14.6 s with two threads against 5.3 s
    with one beside a busy core (issue 22). ``benchmarks/stream_merge.py --quick --busy --threads
    1 2`` (task arithmetic of a 45 MB BERT and 3 experts, a busy loop on one of the two cores, the
    machine otherwise shared, load average ~23): 48.6 s with one thread against 124.1 s with two,
    each including ~34 s of imports; without the busy loop, on that shared machine, 38.0 s
    against 96.4 s (~26 s of imports). No quiet machine was available to measure what the second
    thread gains when every core is free. The spectral methods keep torch's count: a factorisation of
    a whole matrix is one large operation, which a slow thread delays by its share of the work
    rather than by a time slice per operation (not measured beside a busy core yet)."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"--threads must be a whole number >= 1, got {threads!r}")
        return threads
    return ELEMENTWISE_THREADS if merging.is_elementwise(method, params) else torch.get_num_threads()


@contextmanager
def torch_threads(n: int):
    """Run with ``n`` torch intra-op threads, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def open_experts(base_ck: Checkpoint | None, experts: Sequence[str | Path]) -> list:
    """Each expert as a reader: a :class:`Checkpoint`, or for a PEFT adapter folder an
    :class:`lib.lora.AdapterCheckpoint` (base + adapter, read against the base: the error names
    the adapter and the first module whose name or shape the base does not have)."""
    from ..lora import AdapterCheckpoint, is_adapter, read_adapter

    readers = []
    for i, path in enumerate(experts):
        label = f"expert {i} ({path})"
        if not is_adapter(path):
            readers.append(Checkpoint(path, label=label))
            continue
        if base_ck is None:
            raise ValueError(f"{label} is a PEFT adapter, a change to a base model: give that model as --base")
        readers.append(AdapterCheckpoint(read_adapter(path, base_ck, label=label), base_ck, label))
    return readers


def check_out_format(out_format: str, method: str, experts: Sequence) -> None:
    """``--out-format adapter`` only where the merge is exactly low-rank: every expert an adapter
    and a method with a factored path (:data:`lib.lora.FACTORED`)."""
    from ..lora import FACTORED, AdapterCheckpoint

    if out_format != "adapter":
        return
    full = next((e for e in experts if not isinstance(e, AdapterCheckpoint)), None)
    if full is not None:
        raise ValueError(
            f"--out-format adapter needs every expert to be a PEFT adapter; {full.label} is a full model "
            "(use --out-format model)"
        )
    if method not in FACTORED:
        raise ValueError(
            f"--out-format adapter needs a merge whose result is exactly low-rank, by one of "
            f"{', '.join(sorted(FACTORED))}; {method!r} does not keep the merged task vectors low-rank "
            "(use --out-format model)"
        )


@dataclass
class LowRankPlan:
    """How a merge of PEFT adapters (every expert one, a method of :data:`lib.lora.FACTORED`) is
    done from the factors: ``keys`` the adapted matrices merged as low-rank task vectors (their
    merged deltas in ``deltas`` once :meth:`merge` ran), ``untouched`` the selected keys no
    adapter changes (the base's, as each factored method maps zero task vectors to zero). Empty
    for any other merge, which reads every expert through its reader."""

    method: str
    params: dict[str, Any]
    adapters: list
    keys: list[str]
    untouched: set[str]
    dtypes: dict[str, Any]
    device: Any = None
    deltas: dict[str, Any] = field(default_factory=dict)

    def merge(self) -> None:
        from ..lora import merge_factored

        if self.keys:
            self.deltas = merge_factored(
                self.method,
                {k: [ad.deltas.get(k) for ad in self.adapters] for k in self.keys},
                dtypes=self.dtypes,
                device=self.device,
                **self.params,
            )

    def applied(self, key: str, base_rows: Tensor, rows: slice | None) -> Tensor:
        """The merged weight ``key`` (rows ``rows`` of it, of which ``base_rows`` are the base's)."""
        from ..lora import apply_delta

        return apply_delta(base_rows, self.deltas[key], rows)

    def check_writable(self, full_keys: Sequence[str]) -> None:
        """An adapter output can hold the merge: some matrix is merged low-rank, and no module
        would be both LoRA-adapted and saved whole (``full_keys``: the keys merged densely)."""
        from ..lora import clashing_module

        if not self.keys:
            raise ValueError(
                "--out-format adapter: the adapters change no selected matrix, so the merge has no "
                "low-rank delta to write (check --include/--exclude, or use --out-format model)"
            )
        clash = clashing_module(self.keys, full_keys)
        if clash is not None:
            raise ValueError(
                f"--out-format adapter: module {clash!r} has a low-rank delta and also a full tensor "
                "merged densely (a trained bias?), which a PEFT adapter cannot hold; use --out-format model"
            )

    def write(self, folder: Path, full: dict[str, Tensor], *, base: str | None) -> None:
        from ..lora import save_adapter

        save_adapter(folder, self.deltas, like=self.adapters[0], tensors=full, base_model_name_or_path=base)


def lowrank_plan(
    method: str, params: dict[str, Any], meta: dict[str, Tensor], experts: Sequence, include, exclude, device
) -> LowRankPlan:
    """The :class:`LowRankPlan` of a merge (empty unless every expert is an adapter and the method
    has a factored path)."""
    from ..lora import FACTORED, AdapterCheckpoint, factored_keys

    if method not in FACTORED or not all(isinstance(e, AdapterCheckpoint) for e in experts):
        return LowRankPlan(method, params, [], [], set(), {})
    adapters = [e.adapter for e in experts]
    keys = factored_keys(method, meta, adapters, include, exclude)
    untouched = {
        k
        for k in merging.select_keys(meta, include, exclude)
        if not any(k in ad.deltas or k in ad.tensors for ad in adapters)
    }
    return LowRankPlan(method, params, adapters, keys, untouched, {k: meta[k].dtype for k in keys}, device)


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
    force_any: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = True,
    out_format: str = "model",
    threads: int | None = None,
) -> MergeResult:
    """Merge checkpoints on disk into the model folder ``out``, streaming (module docstring).

    ``out`` receives safetensors shards, ``model.safetensors.index.json``, the non-weight files
    and module subfolders of the reference model (the base, or expert 0 without a base: config,
    tokenizer, a sentence-transformers ``1_Pooling/``), a model card ``README.md`` saying what
    was merged, and ``merge_config.yaml``. Tensors larger than ``block_bytes`` are merged in
    blocks of rows where the method allows it. Every check (inputs, output, filters, device)
    runs before the first tensor is read; ``force``/``force_any``: :func:`check_output`.
    ``threads``: torch's intra-op threads during the merge (default: :func:`merge_threads`).

    An expert may be a PEFT LoRA adapter folder (module docstring, "Adapters"): it is the base
    plus its low-rank deltas. When every expert is one and the method has a factored path
    (:data:`lib.lora.FACTORED`), the adapted matrices are merged from the factors; with
    ``out_format="adapter"`` the result is written as a PEFT adapter instead of a model.
    """
    spec = merging.get_method(method)
    params = merging.resolve_hparams(spec, dict(parameters or {}))
    if base is None and spec.needs_base:
        raise ValueError(f"{method!r} works on task vectors (expert - base) and needs --base")
    if not experts:
        raise ValueError("need at least one expert model")
    n_threads = merge_threads(spec, params, threads)
    with torch_threads(n_threads):
        return _merge_checkpoints(
            spec,
            params,
            base,
            experts,
            Path(out),
            include=include,
            exclude=exclude,
            device=device,
            force=force,
            force_any=force_any,
            max_shard_bytes=max_shard_bytes,
            block_bytes=block_bytes,
            progress=progress,
            out_format=out_format,
        )


def _merge_checkpoints(
    spec: merging.Method,
    params: dict[str, Any],
    base,
    experts,
    out: Path,
    *,
    include,
    exclude,
    device,
    force,
    force_any,
    max_shard_bytes,
    block_bytes,
    progress,
    out_format,
) -> MergeResult:
    from ..lora import AdapterCheckpoint, is_adapter

    method = spec.name
    if out_format not in OUT_FORMATS:
        raise ValueError(f"unknown --out-format {out_format!r}; choose one of {', '.join(OUT_FORMATS)}")
    check_patterns(include, exclude)
    get_device(device)
    inputs = ([] if base is None else [Path(base)]) + [Path(p) for p in experts]
    check_output(out, inputs, force=force, force_any=force_any)

    if base is not None and is_adapter(base):
        raise ValueError(
            f"--base {base} is a PEFT adapter; give the model it adapts as --base and the adapters as --experts"
        )
    base_ck = None if base is None else Checkpoint(base, label=f"base ({base})")
    expert_cks = open_experts(base_ck, experts)
    check_out_format(out_format, method, expert_cks)
    ref = base_ck or expert_cks[0]
    full_models = [c for c in expert_cks if not isinstance(c, AdapterCheckpoint)]
    others = [c for c in (base_ck, *full_models) if c is not None and c is not ref]
    keys = check_same_architecture(ref, others)
    if "weights" in params and params["weights"] is not None and len(params["weights"]) != len(experts):
        raise ValueError(
            f"weights has {len(params['weights'])} entries for {len(experts)} expert(s); give one per expert"
        )
    meta = ref.meta()
    selected = merging.select_keys(meta, include, exclude)
    if not selected:
        raise ValueError(
            f"no floating-point tensor of {ref.label} passes the include/exclude filters "
            f"(include={include}, exclude={exclude}): nothing would be merged"
        )
    plan = lowrank_plan(method, params, meta, expert_cks, include, exclude, device)
    lowrank = set(plan.keys)
    dense_keys = [k for k in selected if k not in lowrank and k not in plan.untouched]
    if out_format == "adapter":
        plan.check_writable(dense_keys)
    blocks = merge_blocks(spec, params, meta, selected, block_bytes)
    # a merged low-rank delta, or the base's tensor where no adapter changes it, cuts into rows
    blocks.update({k: tensor_blocks(meta[k], block_bytes) for k in (*lowrank, *plan.untouched)})
    merged_keys = set(dense_keys)

    def read_and_merge(key: str, rows: slice | None, context) -> Tensor:
        # a function so that the inputs are freed before the next block is read; NaN/Inf are
        # reported by the reader, which names the model by its label and path
        base_part = None if base_ck is None else {key: base_ck.read(key, rows)}
        expert_parts = [{key: e.read(key, rows)} for e in expert_cks]
        return merging.merge(
            method, base_part, expert_parts, include=include, exclude=exclude, device=device, context=context, **params
        )[key]

    layout = {k: (e.dtype, e.shape) for k, e in ref.entries.items()}
    record = {
        "merge_method": method,
        "base_model": None if base is None else str(Path(base).resolve()),
        "models": [str(Path(p).resolve()) for p in experts],
        "parameters": params,
        "include": include,
        "exclude": exclude,
        **({"out_format": out_format} if out_format != "model" else {}),
    }
    reference = "the base" if base_ck is not None else "expert 0"
    # the temporary output folder exists before the prepass: an output that cannot be written
    # fails at once, not after a pass over every model
    with atomic_output_dir(out, force=True) as tmp:
        prepass_blocks = (
            {k: tensor_blocks(meta[k], block_bytes) for k in dense_keys} if spec.prepass_elementwise else None
        )
        items = _PrepassItems(base_ck, expert_cks, dense_keys, prepass_blocks, device, progress)
        context = merging.run_prepass(method, items, **params) if dense_keys else None
        plan.merge()
        if out_format == "adapter":
            with tqdm(dense_keys, desc=f"merge {method}", unit="tensor", disable=not progress) as bar:
                full = {k: read_and_merge(k, None, context) for k in bar}
            side = SideFiles([], [], [])
            plan.write(tmp, full, base=record["base_model"])
        else:
            writer = ShardedWriter(tmp, layout, max_shard_bytes)
            with tqdm(keys, desc=f"merge {method}", unit="tensor", disable=not progress) as bar:
                for k in bar:
                    for rows in blocks[k]:
                        # a key that is not merged (an integer buffer, an excluded tensor, one no
                        # adapter changes under a factored method) is the reference's, as in merge();
                        # the experts' copies are not read
                        if k in lowrank:
                            t = plan.applied(k, ref.read(k, rows), rows)
                        else:
                            t = read_and_merge(k, rows, context) if k in merged_keys else ref.read(k, rows)
                        writer.write(k, t, row=0 if rows is None else rows.start)
            writer.close()
            side = copy_side_files(ref, tmp, skip=("README.md", MERGE_RECORD))
        (tmp / "README.md").write_text(
            model_card(
                record,
                merged=len(selected),
                copied=len(keys) - len(selected),
                reference=reference,
                side=side,
                integer_buffers=integer_buffers_missing(ref, others),
            )
        )
        (tmp / MERGE_RECORD).write_text(yaml.safe_dump(record, sort_keys=False))
    return MergeResult(out, len(selected), len(keys) - len(selected), side)


# ---------------------------------------------------------------- streaming scan


#: module names that come before the numbered blocks of a network (stems, embeddings) and after
#: them (heads), whatever their alphabetical place: safetensors headers are sorted by name, so a
#: checkpoint file holds no module order of its own and ``fc`` would otherwise sort before
#: ``layer1`` (ResNet) and ``lm_head`` before ``model.layers`` (Llama)
STEM_MODULES = frozenset(
    {"embeddings", "embed_tokens", "wte", "wpe", "stem", "patch_embed", "conv1", "bn1", "conv_stem", "features_in"}
)
#: a residual block's projection shortcut, which the block's own layers precede in module order
SHORTCUT_MODULES = frozenset({"downsample", "shortcut"})
HEAD_MODULES = frozenset(
    {
        "fc",
        "classifier",
        "pre_classifier",
        "head",
        "heads",
        "lm_head",
        "score",
        "pooler",
        "qa_outputs",
        "norm",
        "ln_f",
        "final_layer_norm",
        "cls",
    }
)


def depth_order(name: str) -> list:
    """Sort key for a network's matrices from input to output: stem modules (:data:`STEM_MODULES`)
    first, heads (:data:`HEAD_MODULES`) last, and in between numbered blocks in numeric order
    (``layer.2`` before ``layer.10``, ``layer1`` before ``layer2``), a block's shortcut after its
    own layers, and names otherwise alphabetically."""
    parts = name.split(".")
    modules = set(parts[:-1])
    stage = (
        0
        if modules & STEM_MODULES and not any(p.isdigit() for p in parts)
        else (2 if modules & HEAD_MODULES and not any(p.isdigit() for p in parts) else 1)
    )
    key = [(stage, 0, "")]
    for part in parts:
        m = re.fullmatch(r"([^\d]*)(\d+)", part)
        key.append(
            (0, int(part), "")
            if part.isdigit()
            else (2, 0, part)
            if part in SHORTCUT_MODULES
            else (1, int(m.group(2)), m.group(1))
            if m
            else (1, -1, part)
        )
    return key


def scan_checkpoint(
    model: str | Path, *, include=None, exclude=None, snr_method: str = "mp", device=None, progress: bool = True
):
    """:func:`lib.spectral.scan` of every matrix of a checkpoint on disk, one matrix in memory at
    a time. Returns its DataFrame: one row per matrix, in depth order (:func:`depth_order`)."""
    # pandas and the spectral code add ~130 MB of resident memory that merge does not need
    import pandas as pd

    from .. import spectral

    check_patterns(include, exclude)
    get_device(device)
    spectral.check_snr_method(snr_method)
    ckpt = Checkpoint(model)
    names = sorted(
        (
            k
            for k, e in ckpt.entries.items()
            if e.dtype.is_floating_point and len(e.shape) >= 2 and matches(k, include, exclude)
        ),
        key=depth_order,
    )
    if not names:
        raise ValueError(f"{model}: no floating-point matrix passes the include/exclude filters")
    empty = [k for k in names if 0 in ckpt.entries[k].shape]
    if empty:
        raise ValueError(
            f"{model}: {empty[0]!r} has shape {list(ckpt.entries[empty[0]].shape)}: an empty matrix has "
            "no spectrum (exclude it with --exclude)"
        )
    with tqdm(names, desc="scan", unit="matrix", disable=not progress) as bar:
        rows = [spectral.scan({k: ckpt.read(k)}, method=snr_method, device=device) for k in bar]
    return pd.concat(rows, ignore_index=True)


# ---------------------------------------------------------------- output checks and the allocator


def check_creatable(path: Path, flag: str) -> None:
    """``path`` can be created: its nearest existing ancestor is a folder we may write in."""
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} cannot be written: {parent} is not a writable folder")


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
