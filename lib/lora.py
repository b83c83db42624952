"""Low-rank task vectors: LoRA adapters read as factored deltas, merged without densifying where
the method allows it, and written back as PEFT adapters.

A LoRA adapter changes a weight ``W`` (``out x in``) of its base model by ``ΔW = s B A`` with
``B: out x r``, ``A: r x in`` and the scale ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``). :class:`LowRank` holds such a task vector as its factors.

Merging (:func:`merge_lowrank`). Methods whose result on low-rank task vectors is again exactly
low-rank and computable from the factors take a factored path (:data:`FACTORED`):

* ``star``: the SVD of each ``s_t B_t A_t`` from QRs of its factors, then STAR's rank rule, nuclear
  norm and rescale (:func:`lib.merge.star.star_lowrank`), ``O((out + in) r²)`` per matrix;
* ``drm_h``, ``drm_v``: the concatenation of the N deltas has rank at most ``N r`` and is
  decomposed the same way (:func:`lib.merge.drm.drm_h_lowrank`);
* ``task_arithmetic`` and ``average``: ``sum_t w_t s_t B_t A_t`` is the concatenation
  ``[w_1 s_1 B_1 ... w_N s_N B_N] [A_1; ...; A_N]`` (PEFT's ``cat``), rank ``sum_t r_t``.

Every other method acts entry by entry (TIES, DARE, the SNR strategies) or needs each dense task
vector, so the deltas are densified for it, one matrix at a time where the caller streams
(:func:`expert_tensor`). Each factored path equals the same method on the densified task vectors
(``tests/test_lora.py``), so which path ran is invisible in the result, up to round-off.

Adapters on disk (:func:`read_adapter`, :func:`write_adapter`) are PEFT's folders:
``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A`` /
``lora_embedding_B``, no ``.weight``, for embeddings, whose delta is ``(B A)ᵀ``; likewise Conv1D
layers with ``fan_in_fan_out``). Other saved tensors (``modules_to_save`` copies, trained biases)
are full weights of the expert, keyed by the base's names.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .checkpoint import Checkpoint, atomic_output_dir
from .statedict import check_finite

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: the prefix PEFT puts before the base model's module names in an adapter's keys
PEFT_PREFIX = "base_model.model."
#: adapter suffix -> (factor, whether the module's delta is (B A)ᵀ)
_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("a", False),
    ".lora_B.weight": ("b", False),
    ".lora_embedding_A": ("a", True),
    ".lora_embedding_B": ("b", True),
}


@dataclass(frozen=True)
class LowRank:
    """A task vector ``scale * b @ a`` held as its factors, ``b (out, r)`` and ``a (r, in)``; the
    dense delta has ``shape`` (the base weight's, e.g. ``(out, in, kh, kw)`` for a conv kernel,
    whose matrix is ``(out, in*kh*kw)`` as :func:`lib.statedict.as_matrix` reads it)."""

    b: Tensor
    a: Tensor
    scale: float = 1.0
    shape: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.b.ndim != 2 or self.a.ndim != 2 or self.b.shape[1] != self.a.shape[0]:
            raise ValueError(
                f"a low-rank task vector needs b (out, r) and a (r, in), got {tuple(self.b.shape)} "
                f"and {tuple(self.a.shape)}"
            )
        matrix = (self.b.shape[0], self.a.shape[1])
        shape = matrix if self.shape is None else tuple(self.shape)
        if shape[0] != matrix[0] or math.prod(shape[1:]) != matrix[1]:
            raise ValueError(
                f"factors {tuple(self.b.shape)} x {tuple(self.a.shape)} do not make a delta of shape {shape}"
            )
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return self.b.shape[1]

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The delta ``scale * b @ a`` in ``shape``, computed in ``dtype`` (default: the factors')."""
        b, a = (self.b, self.a) if dtype is None else (self.b.to(dtype), self.a.to(dtype))
        return (self.scale * b @ a).reshape(self.shape)

    def to(self, *args, **kwargs) -> LowRank:
        return LowRank(self.b.to(*args, **kwargs), self.a.to(*args, **kwargs), self.scale, self.shape)


@dataclass(frozen=True)
class Adapter:
    """An expert given as changes to a base model: ``deltas`` (base key -> :class:`LowRank`) and
    ``tensors`` (base key -> full weight replacing the base's: ``modules_to_save``, biases);
    ``transposed`` the keys whose PEFT factors hold ``(B A)ᵀ`` (embeddings, ``fan_in_fan_out``),
    ``embeddings`` those stored as ``lora_embedding_A/B``;
    ``config`` PEFT's ``adapter_config.json``, when read from one."""

    deltas: dict[str, LowRank]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    transposed: frozenset[str] = frozenset()
    embeddings: frozenset[str] = frozenset()
    config: dict = field(default_factory=dict)
    label: str = "adapter"


def lora_scale(config: Mapping, rank: int) -> float:
    """PEFT's scaling of ``B A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``."""
    alpha = float(config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _unsupported(config: Mapping) -> str | None:
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {config.get('peft_type')!r} (only LORA adapters are low-rank task vectors)"
    if config.get("use_dora"):
        return "use_dora=true (DoRA rescales each column of W + BA by a learned magnitude: not a low-rank delta)"
    for name in ("rank_pattern", "alpha_pattern"):
        if config.get(name):
            return f"a non-empty {name} (per-module ranks or alphas are not read yet)"
    return None


def read_adapter(
    folder: str | os.PathLike, base: Checkpoint | Mapping[str, Tensor], *, label: str | None = None
) -> Adapter:
    """The PEFT LoRA adapter in ``folder`` as an :class:`Adapter` keyed by the base's weight names,
    checked against ``base`` (a :class:`lib.checkpoint.Checkpoint` or a state dict): every adapted
    module and saved tensor must exist in the base with the same shape. Errors name the adapter and
    the first mismatch."""
    folder = Path(folder)
    label = label or str(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.exists():
            hint = (
                " (a .bin adapter: re-save it with save_pretrained, safetensors is the default)"
                if (folder / "adapter_model.bin").exists()
                else ""
            )
            raise ValueError(
                f"{label}: no {path.name} in {folder}; a PEFT adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}{hint}"
            )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{label}: {config_path} is not valid JSON ({err})") from None
    problem = _unsupported(config)
    if problem:
        raise ValueError(f"{label}: unsupported adapter: {problem}")
    shapes = (
        {k: tuple(e.shape) for k, e in base.entries.items()}
        if isinstance(base, Checkpoint)
        else {k: tuple(t.shape) for k, t in base.items()}
    )

    factors: dict[str, dict[str, Tensor]] = {}
    transposed, embeddings, tensors = set(), set(), {}
    for key, t in load_file(weights_path).items():
        check_finite(t, f"{label}: {key!r}")
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in _FACTOR_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            if "lora_" in name:
                raise ValueError(
                    f"{label}: {key!r} is a LoRA tensor this reader does not know (DoRA magnitude, LoRA bias?)"
                )
            if name not in shapes:
                raise ValueError(f"{label}: {key!r} is saved as {name!r}, which the base does not have")
            if tuple(t.shape) != shapes[name]:
                raise ValueError(
                    f"{label}: {name!r} has shape {tuple(t.shape)} in the adapter, {shapes[name]} in the base"
                )
            tensors[name] = t
            continue
        weight = f"{name[: -len(suffix)]}.weight"
        which, embedding = _FACTOR_SUFFIXES[suffix]
        factors.setdefault(weight, {})[which] = t
        if embedding:
            embeddings.add(weight)
        if embedding or config.get("fan_in_fan_out"):
            transposed.add(weight)

    deltas = {}
    for weight, pair in factors.items():
        if set(pair) != {"a", "b"}:
            raise ValueError(
                f"{label}: module {weight!r} has lora_{'AB'[pair.keys() == {'a'}]} without lora_{'BA'[pair.keys() == {'a'}]}"
            )
        b, a = pair["b"].flatten(1), pair["a"].flatten(1)
        if weight in transposed:
            b, a = a.mT, b.mT
        rank = min(pair["a"].shape[0], pair["b"].shape[1])
        if rank != config.get("r", rank):
            raise ValueError(f"{label}: module {weight!r} has rank {rank}, the config says r={config['r']}")
        if weight not in shapes:
            raise ValueError(
                f"{label}: the adapter changes {weight!r}, which the base does not have "
                f"(adapted from a model with other module names?)"
            )
        expected = shapes[weight]
        if (b.shape[0], a.shape[1]) != (expected[0], math.prod(expected[1:])):
            raise ValueError(
                f"{label}: {weight!r} gets a delta of shape {(b.shape[0], a.shape[1])} "
                f"(lora_B {tuple(pair['b'].shape)}, lora_A {tuple(pair['a'].shape)}), the base has {expected}"
            )
        deltas[weight] = LowRank(b, a, lora_scale(config, rank), expected)
    if not deltas:
        raise ValueError(f"{label}: no LoRA factors in {weights_path}")
    return Adapter(deltas, tensors, frozenset(transposed), frozenset(embeddings), config, label)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def apply_delta(base_tensor: Tensor, delta: LowRank, rows: slice | None = None) -> Tensor:
    """``base + delta`` (its block ``rows`` of the first dimension, when given, of which
    ``base_tensor`` is the base's), added in the precision of the factors, in the base's dtype:
    a merged task vector applied to the base."""
    b = delta.b if rows is None else delta.b[rows]
    dense = (delta.scale * b @ delta.a).reshape(base_tensor.shape)
    return (base_tensor.to(dense.dtype) + dense).to(base_tensor.dtype)


def _delta_rows(delta: LowRank, rows: slice | None, like: Tensor) -> Tensor:
    """The rows ``rows`` (all for ``None``) of ``delta``'s dense tensor, computed in float32
    (float64 for a float64 ``like``) and returned in ``like``'s dtype and shape."""
    dtype = _compute_dtype(like)
    b = delta.b if rows is None else delta.b[rows]
    return (delta.scale * b.to(dtype) @ delta.a.to(dtype)).reshape(like.shape).to(like.dtype)


def expert_tensor(base_tensor: Tensor, adapter: Adapter, key: str, rows: slice | None = None) -> Tensor:
    """The expert's weight ``key`` (its block ``rows`` of the first dimension, when given, of which
    ``base_tensor`` is the base's): the base's plus the adapter's delta (in the base's dtype), the
    adapter's own copy for ``tensors``, the base's where the adapter leaves it alone."""
    if key in adapter.tensors:
        return adapter.tensors[key] if rows is None else adapter.tensors[key][rows]
    if key in adapter.deltas:
        return base_tensor + _delta_rows(adapter.deltas[key], rows, base_tensor)
    return base_tensor


class AdapterCheckpoint:
    """The expert ``base + adapter`` read like a :class:`lib.checkpoint.Checkpoint`, one tensor
    (or block of rows) at a time: the base's tensor plus the adapter's delta, computed for just
    the rows asked for, so a streamed merge never densifies more than a block of one matrix."""

    def __init__(self, adapter: Adapter, base: Checkpoint, label: str | None = None):
        self.adapter, self.base, self.label = adapter, base, label or adapter.label
        self.entries = base.entries

    def keys(self) -> list[str]:
        return self.base.keys()

    def meta(self) -> dict[str, Tensor]:
        return self.base.meta()

    def read(self, key: str, rows: slice | None = None, *, finite: bool = True) -> Tensor:
        if key in self.adapter.tensors:  # the adapter's own copy: the base's is not read
            return expert_tensor(None, self.adapter, key, rows)
        return expert_tensor(self.base.read(key, rows, finite=finite), self.adapter, key, rows)


def is_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds :data:`CONFIG_NAME`)."""
    return (Path(path) / CONFIG_NAME).is_file()


def densify(base: Mapping[str, Tensor], adapter: Adapter) -> dict[str, Tensor]:
    """The expert as a full state dict (:func:`expert_tensor` for every key of ``base``)."""
    return {k: expert_tensor(t, adapter, k) for k, t in base.items()}


# ------------------------------------------------------------------------------ merging


def _weighted_sum(b: Tensor, a: Tensor, weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """``sum_t w_t b_t a_t`` as the concatenation of the factors (``b (K, N, m, r)``)."""
    w = torch.tensor(list(weights), dtype=b.dtype, device=b.device)
    return (b * w[:, None, None]).transpose(1, 2).flatten(2), a.flatten(1, 2)


def _task_arithmetic(b, a, *, lam=1.0, weights=None):
    n = b.shape[1]
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    return _weighted_sum(b, a, [lam * x for x in w])


def _average(b, a, *, weights=None):
    n = b.shape[1]
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    return _weighted_sum(b, a, [x / sum(w) for x in w])


def _star(b, a, *, eta=40, rescale=True, lam=1.0):
    from .merge.star import star_lowrank

    merged_b, merged_a = star_lowrank(b, a, eta=eta, rescale=rescale)
    return merged_b * lam, merged_a


def _drm(variant: str):
    def fn(b, a, *, density=0.2, lam=1.0, renorm=True, rtol=1e-2, prune="joint"):
        from .merge.drm import drm_h_lowrank, drm_v_lowrank

        basis, merged = (drm_h_lowrank if variant == "h" else drm_v_lowrank)(
            b, a, density=density, renorm=renorm, rtol=rtol, prune=prune
        )
        return basis * lam, merged

    return fn


#: methods with a factored path: name -> ``fn(b (K, N, m, r), a (K, N, r, n), **hp) -> (b', a')``
#: giving the merged task vectors ``b'_k @ a'_k`` of K same-shape keys (scales folded into ``b``)
FACTORED: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "star": _star,
    "drm_h": _drm("h"),
    "drm_v": _drm("v"),
    "task_arithmetic": _task_arithmetic,
    "average": _average,
}


def stack_factors(deltas: Sequence[LowRank | None], *, dtype: torch.dtype, device=None) -> tuple[Tensor, Tensor]:
    """The deltas of one key (``None``: an expert that leaves it alone) as ``b (N, m, r)``,
    ``a (N, r, n)`` with scales folded into ``b`` and ranks padded with zeros to the largest."""
    ref = next(d for d in deltas if d is not None)
    m, n = ref.b.shape[0], ref.a.shape[1]
    rank = max(1, max(d.rank for d in deltas if d is not None))
    b = torch.zeros(len(deltas), m, rank, dtype=dtype, device=device)
    a = torch.zeros(len(deltas), rank, n, dtype=dtype, device=device)
    for i, d in enumerate(deltas):
        if d is not None:
            b[i, :, : d.rank] = d.scale * d.b.to(device=device, dtype=dtype)
            a[i, : d.rank] = d.a.to(device=device, dtype=dtype)
    return b, a


@dataclass(frozen=True)
class LowRankMerge:
    """The result of :func:`merge_lowrank`: ``deltas`` the merged task vectors of the keys merged on
    the factored path, ``weights`` the merged weights of every other key of the base."""

    deltas: dict[str, LowRank]
    weights: dict[str, Tensor]

    def state_dict(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The merged model in the base's key order and dtypes."""
        return {k: apply_delta(t, self.deltas[k]) if k in self.deltas else self.weights[k] for k, t in base.items()}


def factored_keys(
    method: str, base: Mapping[str, Tensor], adapters: Sequence[Adapter], include=None, exclude=None
) -> list[str]:
    """The keys :func:`merge_lowrank` merges on the factored path: selected floating-point
    matrices that some adapter changes by a low-rank delta and none replaces outright, for a
    method in :data:`FACTORED`."""
    from .merge import select_keys

    if method not in FACTORED:
        return []
    return [
        k
        for k in select_keys(base, include, exclude)
        if base[k].ndim >= 2 and any(k in ad.deltas for ad in adapters) and not any(k in ad.tensors for ad in adapters)
    ]


def merge_factored(
    method: str,
    deltas: Mapping[str, Sequence[LowRank | None]],
    *,
    dtypes: Mapping[str, torch.dtype] | None = None,
    device=None,
    max_elements: int = 1 << 25,
    **params,
) -> dict[str, LowRank]:
    """The merged task vector of every key of ``deltas`` (key -> each expert's :class:`LowRank`,
    ``None`` where an expert leaves the key alone) by the factored path of ``method``
    (:data:`FACTORED`, hyperparameters ``params`` already resolved), as a :class:`LowRank` of scale
    1 on the CPU, computed in the compute precision (:func:`lib.merge.to_compute`) of ``dtypes[key]``
    (the base weight's dtype; default: the factors'). Keys are batched by shape, at most about
    ``max_elements`` factor entries at a time."""
    from .linalg import shape_batches
    from .merge import to_compute

    fn = FACTORED[method]
    shapes = {k: next(d for d in ds if d is not None).shape for k, ds in deltas.items()}
    n_experts = max((len(ds) for ds in deltas.values()), default=1)
    out: dict[str, LowRank] = {}
    for batch in shape_batches(shapes, max(1, max_elements // n_experts)):
        given = next(d for d in deltas[batch[0]] if d is not None).b.dtype if dtypes is None else dtypes[batch[0]]
        like = to_compute(torch.zeros(1, dtype=given), device)
        dtype, dev = like.dtype, like.device
        stacks = [stack_factors(deltas[k], dtype=dtype, device=dev) for k in batch]
        rank = max(s[0].shape[-1] for s in stacks)
        b = torch.stack([torch.nn.functional.pad(s[0], (0, rank - s[0].shape[-1])) for s in stacks])
        a = torch.stack([torch.nn.functional.pad(s[1], (0, 0, 0, rank - s[1].shape[-2])) for s in stacks])
        merged_b, merged_a = fn(b, a, **params)
        for k, mb, ma in zip(batch, merged_b, merged_a):
            # the padding of ranks (and STAR's and DRM's unkept components) are exact zeros: drop them
            used = mb.any(0) & ma.any(1)
            out[k] = LowRank(mb[:, used].to(dtype).cpu(), ma[used].to(dtype).cpu(), 1.0, shapes[k])
    return out


def merge_lowrank(
    method: str,
    base: Mapping[str, Tensor],
    adapters: Sequence[Adapter],
    *,
    include=None,
    exclude=None,
    excluded_from=None,
    device=None,
    max_elements: int = 1 << 25,
    **hp,
) -> LowRankMerge:
    """:func:`lib.merge.merge` of the experts ``base + adapter`` without densifying where the
    method has a factored path (module docstring); the other keys go through ``merge`` on the
    densified experts (in memory: the command line streams them with :class:`AdapterCheckpoint`).
    Factored keys are batched by shape, at most about ``max_elements`` factor entries at a time."""
    from .merge import get_method, merge, resolve_hparams

    if not adapters:
        raise ValueError("merge_lowrank needs at least one adapter")
    params = resolve_hparams(get_method(method), hp)
    keys = factored_keys(method, base, adapters, include, exclude)
    fn = FACTORED.get(method)
    deltas = (
        merge_factored(
            method,
            {k: [ad.deltas.get(k) for ad in adapters] for k in keys},
            dtypes={k: base[k].dtype for k in keys},
            device=device,
            max_elements=max_elements,
            **params,
        )
        if keys
        else {}
    )

    if fn is None:  # the whole model densified: a prepass (TIES, SNR) may look across keys
        dense = merge(
            method,
            base,
            [densify(base, ad) for ad in adapters],
            include=include,
            exclude=exclude,
            excluded_from=excluded_from,
            device=device,
            **params,
        )
        return LowRankMerge({}, dense)
    # The factored methods merge key by key without a prepass, so the dense merge needs only the
    # keys left: not the factored ones, nor those no adapter changes (each of these methods maps
    # all-zero task vectors to a zero merged one, and every expert holds the base's tensor there).
    untouched = {k for k in base if not any(k in ad.deltas or k in ad.tensors for ad in adapters)}
    rest = [k for k in base if k not in deltas and k not in untouched]
    weights = {k: base[k].clone() for k in base if k in untouched}
    if rest:
        sub = {k: base[k] for k in rest}
        dense = merge(
            method,
            sub,
            [{k: expert_tensor(base[k], ad, k) for k in rest} for ad in adapters],
            include=include,
            exclude=exclude,
            excluded_from=excluded_from,
            device=device,
            **params,
        )
        weights.update(dense)
    return LowRankMerge(deltas, {k: weights[k] for k in base if k not in deltas})


# ------------------------------------------------------------------------------ writing


def write_adapter(
    out: str | os.PathLike,
    deltas: Mapping[str, LowRank],
    *,
    like: Adapter | None = None,
    tensors: Mapping[str, Tensor] | None = None,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> Path:
    """Write ``deltas`` (base key -> :class:`LowRank`) as a PEFT LoRA adapter folder, atomically
    (:func:`lib.checkpoint.atomic_output_dir`). Every module gets rank ``r``, the largest rank of
    the deltas (smaller ones padded with zero columns, which change nothing), and
    ``lora_alpha = r`` so that PEFT's scale is 1 and the scales live in ``B``, as PEFT's own
    ``add_weighted_adapter`` writes its merges. ``like`` (an expert's :class:`Adapter`) gives the
    rest of the config (task type, base model) and which modules' factors PEFT holds transposed
    (embeddings, ``fan_in_fan_out``). ``tensors`` (base key -> full weight, e.g. a merged
    classifier head) are saved as PEFT saves ``modules_to_save``: under the base's names, their
    modules listed in ``modules_to_save`` (a module with a LoRA delta cannot be one of them)."""
    with atomic_output_dir(out, force=force) as tmp:
        save_adapter(
            tmp, deltas, like=like, tensors=tensors, base_model_name_or_path=base_model_name_or_path, dtype=dtype
        )
    return Path(out)


def clashing_module(lowrank_keys, full_keys) -> str | None:
    """The first module that would be both LoRA-adapted (a key of ``lowrank_keys``) and saved whole
    (a key of ``full_keys``), which a PEFT adapter cannot hold."""
    lora_modules = {k.removesuffix(".weight") for k in lowrank_keys}
    return next((m for m in sorted({k.rpartition(".")[0] for k in full_keys}) if m in lora_modules), None)


def save_adapter(
    folder: Path,
    deltas: Mapping[str, LowRank],
    *,
    like: Adapter | None = None,
    tensors: Mapping[str, Tensor] | None = None,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """:func:`write_adapter`'s files, written into the existing ``folder`` (not atomically)."""
    if not deltas:
        raise ValueError("no low-rank deltas to write: the merge changed no adapted matrix")
    like = like or Adapter({})
    tensors = dict(tensors or {})
    saved_modules = sorted({k.rpartition(".")[0] for k in tensors})
    clash = clashing_module(deltas, tensors)
    if clash is not None:
        raise ValueError(
            f"cannot write {clash!r} as an adapter module: it has a low-rank delta and full tensors "
            f"({', '.join(sorted(k for k in tensors if k.rpartition('.')[0] == clash))}); "
            "PEFT keeps a module either adapted or saved whole"
        )
    rank = max(1, max(d.rank for d in deltas.values()))  # PEFT needs r >= 1; a rank-0 delta is zero columns
    full = {f"{PEFT_PREFIX}{k}" for k in tensors}  # saved in their own dtype, the factors in ``dtype``
    tensors = {f"{PEFT_PREFIX}{k}": t for k, t in tensors.items()}
    for key, d in deltas.items():
        b = torch.nn.functional.pad(d.scale * d.b.to(torch.float64), (0, rank - d.rank))
        a = torch.nn.functional.pad(d.a.to(torch.float64), (0, 0, 0, rank - d.rank))
        if not key.endswith(".weight"):
            raise ValueError(f"cannot write {key!r} as a LoRA module: PEFT adapts a module's 'weight'")
        module = key.removesuffix(".weight")
        if key in like.embeddings:
            tensors[f"{PEFT_PREFIX}{module}.lora_embedding_A"] = b.mT
            tensors[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = a.mT
            continue
        if key in like.transposed:
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = b.mT
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = a.mT
            continue
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.reshape(d.shape[0], rank, *[1] * (len(d.shape) - 2))
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.reshape(rank, *d.shape[1:])
    config = {
        **like.config,
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": saved_modules or None,
        "bias": "none",
        "target_modules": sorted(k.removesuffix(".weight") for k in deltas),
        "inference_mode": True,
    }
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path
    save_file({k: (v if k in full else v.to(dtype)).contiguous() for k, v in tensors.items()}, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
