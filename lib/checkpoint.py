"""Checkpoints on disk, one tensor at a time: lazy reading and atomic, sharded writing of
safetensors, so that the command line can merge models larger than the memory it has.

A *model* is either a Hugging Face model folder (``config.json`` plus ``model.safetensors``, or
shards ``model-XXXXX-of-YYYYY.safetensors`` listed by ``model.safetensors.index.json``) or a
single ``.safetensors`` file.

Reading parses the safetensors header ourselves (8-byte little-endian length, then JSON) and
reads each tensor with a plain positioned read into a fresh buffer. We deliberately do not
memory-map: pages of a mapped file count in the process's resident memory for as long as the
mapping lives, so mapping N checkpoints would make peak RSS grow to N models even though only
one tensor of each is in use at a time.

Both directions also work on a block of rows of a tensor (a slice of its first dimension, which
is a contiguous byte range in safetensors' row-major layout): a tensor larger than the memory
the merge should use is read, merged and written one block at a time.

Writing lays out every shard's header up front (the merged model has the keys, shapes and
dtypes of its reference model, known before any tensor is merged) and writes each tensor (or
block of rows) at its offset as soon as it is computed, so no shard is ever held in memory.
Everything is written into a temporary folder beside the output, renamed into place only once complete
(:func:`atomic_output_dir`): an interrupted or failed run leaves no half-written model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .paths import current_umask
from .statedict import check_finite

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: files of a model folder that hold weights; everything else at the top level (config,
#: tokenizer, generation config, README) is copied from the reference model into the output
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
#: a header larger than this is not a real safetensors header but garbage read as a length
MAX_HEADER_BYTES = 100 * 2**20

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A model path that cannot be read: missing, not safetensors, corrupt or truncated."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape and byte range in that file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one index of the first dimension); the whole tensor for a scalar."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes

    def block(self, rows: slice | None) -> tuple[int, int, tuple[int, ...]]:
        """Byte range and shape of the block ``rows`` (a slice of the first dimension with step
        1; None: the whole tensor)."""
        if rows is None:
            return self.start, self.end, self.shape
        if not self.shape:
            raise ValueError("a scalar tensor has no rows to slice")
        first, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError(f"a block of rows is a contiguous slice, got step {step}")
        stop = max(first, stop)
        return (
            self.start + first * self.row_bytes,
            self.start + stop * self.row_bytes,
            (stop - first, *self.shape[1:]),
        )


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one ``.safetensors`` file, in header order, checked against the file size
    so that a truncated or corrupt file is reported before any tensor is used."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: it holds only {size} byte(s)")
        header_len = int.from_bytes(head, "little")
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path} is corrupt or truncated: its header claims {header_len} bytes but the file holds {size}; "
                "re-download or re-save it"
            )
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} is not a valid safetensors file: unreadable header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a valid safetensors file: its header is not a JSON object")
    data_start = 8 + header_len
    entries = {}
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        entries[key] = _entry(path, key, spec, data_start)
    data_end = max((e.end for e in entries.values()), default=data_start)
    if data_end > size:
        worst = max(entries, key=lambda k: entries[k].end)
        raise CheckpointError(
            f"{path} is truncated: tensor {worst!r} ends at byte {data_end} but the file has {size} bytes; "
            "re-download or re-save it"
        )
    return entries


def _whole_numbers(value, length: int | None = None) -> tuple[int, ...] | None:
    """``value`` as a tuple of non-negative integers (JSON ints, not floats or booleans), or None."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        return None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value):
        return None
    return tuple(value)


def _entry(path: Path, key: str, spec, data_start: int) -> TensorEntry:
    dtype = DTYPES.get(spec.get("dtype")) if isinstance(spec, dict) and isinstance(spec.get("dtype"), str) else None
    shape = _whole_numbers(spec.get("shape")) if isinstance(spec, dict) else None
    offsets = _whole_numbers(spec.get("data_offsets"), 2) if isinstance(spec, dict) else None
    if dtype is None or shape is None or offsets is None:
        raise CheckpointError(
            f"{path} is corrupt: header entry {key!r} is {spec!r}, expected dtype (one of {', '.join(DTYPES)}), "
            "shape (whole numbers) and data_offsets (two whole numbers)"
        )
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"{path} is corrupt: {key!r} ({spec['dtype']}, shape {list(shape)}) needs {expected} bytes, "
            f"its data_offsets {[begin, end]} give {end - begin}"
        )
    return TensorEntry(path, dtype, shape, data_start + begin, data_start + end)


class Checkpoint:
    """A model on disk whose tensors are read one at a time.

    >>> ckpt = Checkpoint("path/to/bert")            # folder or .safetensors file
    >>> ckpt.keys()[:2], ckpt.entries["pooler.dense.weight"].shape
    >>> w = ckpt.read("pooler.dense.weight")         # only this tensor is read
    """

    def __init__(self, path: str | os.PathLike, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(self.path)
        if sys.byteorder != "little":
            raise RuntimeError(
                "safetensors stores little-endian data; this reader supports little-endian machines only"
            )
        if not self.path.exists():
            raise CheckpointError(f"{self.label}: {self.path} does not exist")
        self.folder = self.path if self.path.is_dir() else None
        self.entries: dict[str, TensorEntry] = self._index() if self.folder else read_header(self.path)

    def _index(self) -> dict[str, TensorEntry]:
        index = self.path / INDEX_NAME
        if index.exists():
            return self._sharded(index)
        if (self.path / SINGLE_NAME).exists():
            return read_header(self.path / SINGLE_NAME)
        others = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = (
            f"; it has {others[0]}: re-save it with model.save_pretrained(folder) (safetensors is the default)"
            if others
            else ""
        )
        raise CheckpointError(f"{self.label}: no {SINGLE_NAME} or {INDEX_NAME} in {self.path}{hint}")

    def _sharded(self, index: Path) -> dict[str, TensorEntry]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{index} is not a valid safetensors index (no readable 'weight_map': {err})"
            ) from None
        shards: dict[str, dict[str, TensorEntry]] = {}
        for name in dict.fromkeys(weight_map.values()):
            shard = self.path / name
            if not shard.exists():
                raise CheckpointError(f"{index} lists shard {name}, which is missing from {self.path}")
            shards[name] = read_header(shard)
        entries = {}
        for key, name in weight_map.items():
            if key not in shards[name]:
                raise CheckpointError(f"{index} maps {key!r} to {name}, which does not contain it")
            entries[key] = shards[name][key]
        return entries

    def keys(self) -> list[str]:
        return list(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def meta(self) -> dict[str, Tensor]:
        """Key -> ``device="meta"`` tensor: shapes and dtypes without data, for key selection."""
        return {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in self.entries.items()}

    def read(self, key: str, rows: slice | None = None, *, finite: bool = True) -> Tensor:
        """The tensor ``key`` (only its block ``rows`` of the first dimension, when given) read
        from disk into a new CPU tensor; with ``finite`` (default) a floating-point tensor holding
        NaN/Inf is an error naming the model and key."""
        e = self.entries[key]
        start, end, shape = e.block(rows)
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(e.file, "rb") as fh:
            fh.seek(start)
            got = fh.readinto(buf.numpy()) if end > start else 0
        if got != end - start:
            raise CheckpointError(f"{e.file} is truncated: {key!r} needs bytes {start}..{end}, read {got} of them")
        t = buf.view(e.dtype).reshape(shape)
        if finite:
            check_finite(t, f"{self.label}: {key!r}")
        return t


def check_same_architecture(reference: Checkpoint, others: Sequence[Checkpoint]) -> list[str]:
    """Keys of ``reference`` after checking, from the headers alone, that every other model has
    exactly the same floating-point keys and shapes. The error names the first differing key.

    Integer buffers are copied from the reference, never merged, so another model may lack one
    or hold one the reference lacks (``transformers`` 5 no longer saves the non-persistent
    ``embeddings.position_ids``); :func:`integer_buffers_missing` lists them for the record."""
    keys = reference.keys()
    for other in others:
        extra = [k for k, e in other.entries.items() if k not in reference.entries and e.dtype.is_floating_point]
        for k in keys:
            a = reference.entries[k]
            if k not in other.entries:
                if not a.dtype.is_floating_point:
                    continue
                raise CheckpointError(f"architectures differ: {other.label} has no {k!r}, present in {reference.label}")
            b = other.entries[k]
            if a.shape != b.shape:
                raise CheckpointError(
                    f"architectures differ at {k!r}: shape {list(b.shape)} in {other.label}, "
                    f"{list(a.shape)} in {reference.label}"
                )
        if extra:
            raise CheckpointError(
                f"architectures differ: {other.label} has {extra[0]!r}, absent from {reference.label}"
            )
    return keys


def integer_buffers_missing(reference: Checkpoint, others: Sequence[Checkpoint]) -> dict[str, list[str]]:
    """Integer buffer -> labels of the models that lack it (its value comes from ``reference``)."""
    out: dict[str, list[str]] = {}
    for other in others:
        for k, e in reference.entries.items():
            if k not in other.entries and not e.dtype.is_floating_point:
                out.setdefault(k, []).append(other.label)
    return out


def _tensor_bytes(t: Tensor):
    """The raw little-endian bytes of ``t`` as a buffer, without a copy when ``t`` is contiguous."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


class ShardedWriter:
    """Writes a model as safetensors shards plus ``model.safetensors.index.json``.

    The layout (which key goes to which shard, at which offset) is fixed from the keys, shapes
    and dtypes given up front; :meth:`write` then puts each tensor straight at its place in its
    file, in any order, and :meth:`close` checks that every tensor was written and writes the
    index. Shards are filled in key order up to ``max_shard_bytes`` (a tensor larger than that
    gets a shard of its own). A tensor may also be written as blocks of rows, in order
    (``write(key, block, row=first_row)``).
    """

    def __init__(self, folder: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_shard_bytes: int):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.layout = layout
        groups = _fill_shards(layout, max_shard_bytes)
        self.where: dict[str, tuple[Path, int]] = {}
        self.weight_map: dict[str, str] = {}
        for i, keys in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            self._create_shard(self.folder / name, keys)
            self.weight_map.update({k: name for k in keys})
        self.rows_done = dict.fromkeys(layout, 0)

    def _create_shard(self, path: Path, keys: list[str]) -> None:
        # larger items first keeps every tensor aligned to its item size without padding
        # (safetensors requires the data to be contiguous, so padding is not an option)
        ordered = sorted(keys, key=lambda k: -self.layout[k][0].itemsize)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for k in ordered:
            dtype, shape = self.layout[k]
            size = math.prod(shape) * dtype.itemsize
            header[k] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        data_start = 8 + len(text)
        with open(path, "wb") as fh:
            fh.write(len(text).to_bytes(8, "little") + text)
            fh.truncate(data_start + offset)
        for k in ordered:
            self.where[k] = (path, data_start + header[k]["data_offsets"][0])

    def write(self, key: str, t: Tensor, *, row: int = 0) -> None:
        """Write ``t``: the whole tensor ``key``, or its rows ``row, row + 1, ...`` (a block of the
        first dimension). The blocks of a tensor come in order, each starting where the last ended."""
        dtype, shape = self.layout[key]
        if row != self.rows_done[key]:
            raise ValueError(
                f"{key!r}: blocks of rows are written in order; the next starts at row {self.rows_done[key]}, got {row}"
            )
        if t.dtype != dtype or t.ndim != len(shape) or t.shape[1:] != shape[1:] or row + _rows(t.shape) > _rows(shape):
            raise ValueError(
                f"{key!r}: expected {dtype} {list(shape)} or a block of its rows, got {t.dtype} "
                f"{list(t.shape)} from row {row}"
            )
        path, offset = self.where[key]
        with open(path, "r+b") as fh:
            fh.seek(offset + row * math.prod(shape[1:]) * dtype.itemsize)
            fh.write(_tensor_bytes(t))
        self.rows_done[key] += _rows(t.shape)

    def close(self) -> Path:
        """Check completeness, flush the shards to disk and write the index; returns its path."""
        pending = sorted(k for k, done in self.rows_done.items() if done < _rows(self.layout[k][1]))
        if pending:
            raise RuntimeError(f"{len(pending)} tensor(s) never written (or written in part), e.g. {pending[0]!r}")
        for name in dict.fromkeys(self.weight_map.values()):
            with open(self.folder / name, "rb+") as fh:
                os.fsync(fh.fileno())
        total = sum(math.prod(shape) * dtype.itemsize for dtype, shape in self.layout.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
        path = self.folder / INDEX_NAME
        path.write_text(json.dumps(index, indent=2) + "\n")
        return path


def _rows(shape) -> int:
    """Rows of a tensor of ``shape``: its first dimension; a scalar is one row."""
    return shape[0] if shape else 1


def _fill_shards(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    used = 0
    for k, (dtype, shape) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        if groups[-1] and used + size > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(k)
        used += size
    return groups


@dataclass(frozen=True)
class SideFiles:
    """What :func:`copy_side_files` did with a model folder's non-weight content."""

    copied: list[str]
    #: subfolders copied from the reference model although they hold weights of their own
    #: (a sentence-transformers ``2_Dense`` module): those weights are the reference's, unmerged
    unmerged_weights: list[str]
    #: subfolders left out: they hold weights (an ``onnx/`` or ``openvino/`` export) and no module
    #: of the model uses them, so copying them would ship the reference's weights as the merge's
    skipped: list[str]


def _module_folders(folder: Path) -> set[str]:
    """Subfolders that ``modules.json`` (sentence-transformers) names as modules of the model."""
    path = folder / "modules.json"
    try:
        modules = json.loads(path.read_text())
        return {str(m["path"]).strip("/") for m in modules if isinstance(m, dict) and str(m.get("path", "")).strip("/")}
    except (OSError, ValueError, TypeError, KeyError):
        return set()


def _holds_weights(folder: Path) -> bool:
    return any(p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) for p in folder.rglob("*"))


def copy_side_files(model: Checkpoint, dest: Path, *, skip: Sequence[str] = ()) -> SideFiles:
    """Copy the non-weight content of a model folder into ``dest``: its top-level files (config,
    tokenizer, generation config, ...) and its subfolders (a sentence-transformers model's
    ``1_Pooling/``, ``2_Normalize/``). A subfolder with weight files is copied only when
    ``modules.json`` names it as a module (and reported in ``unmerged_weights``); otherwise it is
    skipped. Top-level names in ``skip`` are not copied. Nothing for a single ``.safetensors``
    file."""
    if model.folder is None:
        return SideFiles([], [], [])
    copied, unmerged, skipped = [], [], []
    modules = _module_folders(model.folder)
    for p in sorted(model.folder.iterdir()):
        if p.name in skip or p.name.startswith("."):
            continue
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != INDEX_NAME:
            shutil.copy2(p, dest / p.name)
            copied.append(p.name)
        elif p.is_dir():
            weights = _holds_weights(p)
            if weights and p.name not in modules:
                skipped.append(f"{p.name}/")
                continue
            shutil.copytree(p, dest / p.name, symlinks=True)
            copied.append(f"{p.name}/")
            if weights:
                unmerged.append(f"{p.name}/")
    return SideFiles(copied, unmerged, skipped)


@contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """A fresh temporary folder beside ``out`` that becomes ``out`` when the block succeeds.

    If the block raises (or is interrupted), the temporary folder is deleted and ``out`` is
    untouched. An existing ``out`` is an error unless ``force``; with ``force`` it is replaced
    only after the new folder is complete.
    """
    out = Path(out)
    check_can_write(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; an output follows the umask
        yield tmp
        check_can_write(out, force=force)  # something may have appeared at ``out`` meanwhile
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_can_write(out: Path, *, force: bool) -> None:
    if out.exists() and not force:
        raise FileExistsError(
            f"{out} already exists; pass --force (force=True) to replace it, or choose another output"
        )


def _replace(new: Path, out: Path) -> None:
    if not out.exists():
        os.replace(new, out)
        return
    # move the old output aside first: a rename is atomic, deleting a folder is not
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.replace(out, old / out.name)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
