"""Merge methods behind one entry point.

>>> from lib.merge import merge, METHODS
>>> merged = merge("ties", base_sd, [sd_a, sd_b], density=0.2)

``METHODS`` is the registry (name -> :class:`Method`): the single list that notebooks, tests,
the command line and the benchmarks iterate over. A new method is one file with a function
decorated by :func:`register` plus one import line at the bottom of this file.

What :func:`merge` does around every method, so that the methods themselves stay short pure
tensor functions:

* checks the inputs: known method and hyperparameters, same keys and shapes in base and every
  expert, no NaN/Inf, a base where the method needs one;
* selects the tensors to merge: floating-point tensors whose names pass ``include``/``exclude``
  (regular expressions, see :func:`lib.statedict.matches`). Integer buffers such as BatchNorm's
  ``num_batches_tracked`` are never averaged: they are copied from the base (expert 0 without a
  base). Excluded floating-point tensors (for example classifier heads) are taken from
  ``excluded_from``: ``"base"`` (default when a base is given) or an expert index;
* moves tensors to the selected device and computes in float32 (float64 stays float64), so
  float16/bfloat16 checkpoints are merged in full precision, then casts back to each tensor's
  original dtype on the CPU, in the base's key order.

A method function has the signature ``fn(base, experts, *, context, **hp) -> dict`` where
``base`` (or ``None``) and each expert are dicts holding only the selected float tensors,
already on the compute device; it returns a dict with the same keys.

Streaming. The command line merges checkpoints that do not fit in memory by calling ``fn`` on
one key (or one block of a key's rows, below) at a time. That gives the same result as a whole-model call only if
nothing in ``fn`` looks across keys. A method whose result does depend on the whole model (TIES'
model-wide magnitude threshold, the SNR strategies' ranking of layers) declares a ``prepass``:
``prepass(items, **hp) -> context`` receives ``items``, an iterable of ``(key, base_tensor_or_None,
[expert_tensors])`` over every selected key (tensors already converted by :func:`to_compute`), and
returns a small object (thresholds, per-module decisions) that is handed to every ``fn`` call as
``context``. ``items`` must be re-iterable -- a list, or an object whose ``__iter__`` starts over
(for a lazy reader: reopen the files) -- because an exact model-wide threshold reads the tensors
twice (TIES, see :func:`lib.merge.ties.kth_largest_magnitude`); the SNR strategies read them once.
Methods without a prepass get ``context=None``; called directly with ``context=None``, a method
that has a prepass runs it on the tensors it was given. Randomness (DARE) is seeded per key,
never by a stream shared across keys, for the same reason.

Row blocks. A single tensor can be larger than the memory a streamed merge should use (BERT's
word embeddings are 94 MB per model, and a method's temporaries multiply that). Two flags of
:func:`register` let the command line cut such a tensor into blocks of rows:

* ``elementwise``: given its context, each entry of the result depends only on the same entry
  of the base and of the experts (and on the key). ``fn`` may then be called with row blocks of
  a tensor under the tensor's own key, and the blocks of the result, put together, are the
  result. True for average, task arithmetic, TIES with ``scope="model"`` (the thresholds come
  from the prepass) and the SNR strategies (the decisions come from the prepass); false for
  TIES with ``scope="tensor"`` (a top-k per tensor), DARE (its seeded mask is drawn for the
  whole tensor), STAR and DRM (spectra). A callable of the hyperparameters when it depends on
  them; see :func:`is_elementwise`.
* ``prepass_elementwise``: the prepass's result is the same when a tensor arrives as several
  items, each a block of its rows under the same key -- it depends on the entries, not on whole
  tensors (TIES' magnitude histograms; not the SNR of a matrix).

The command line therefore does::

    keys = select_keys(meta, include, exclude)                       # meta: key -> tensor or meta tensor
    ctx = run_prepass(name, LazyItems(keys), **hp)                  # None for methods without prepass
    for key in keys:                                                # row blocks of it if elementwise
        out = METHODS[name].fn(base_part, expert_parts, context=ctx, **resolve_hparams(METHODS[name], hp))

where the parts hold tensors passed through :func:`to_compute`, and writes each result with
:func:`restore` (through ``merge(..., context=ctx)``, which does the same on in-memory dicts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..device import get_device, supports_float64
from ..statedict import StateDict, check_compatible, compute_dtype, matches, to_state_dict


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., StateDict]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    needs_base: bool = True
    prepass: Callable[..., Any] | None = None
    check: Callable[..., None] | None = None
    elementwise: bool | Callable[..., bool] = False
    prepass_elementwise: bool = False

    def __call__(self, base, experts, **hp):
        return merge(self.name, base, experts, **hp)


METHODS: dict[str, Method] = {}


def register(name: str, *, description: str, needs_base: bool = True, prepass=None, check=None,
             elementwise: bool | Callable[..., bool] = False, prepass_elementwise: bool = False, **defaults):
    """Decorator adding ``fn`` to :data:`METHODS` under ``name`` with its default hyperparameters.

    ``check(**hp)``, if given, raises ``ValueError`` for a hyperparameter out of range; it runs in
    :func:`resolve_hparams`, before any tensor is touched. ``elementwise`` (a bool, or a function
    of the hyperparameters returning one) and ``prepass_elementwise`` say whether ``fn`` and the
    prepass accept row blocks of a tensor (module docstring, "Row blocks").
    """

    def deco(fn):
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = Method(name, fn, dict(defaults), description, needs_base, prepass, check,
                               elementwise, prepass_elementwise)
        return fn

    return deco


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


def resolve_hparams(method: Method, hp: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(hp) - set(method.defaults))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in method.defaults.items()) or "none"
        raise ValueError(f"unknown hyperparameter(s) {unknown} for {method.name!r}; valid: {valid}")
    params = {**method.defaults, **hp}
    if method.check is not None:
        method.check(**params)
    return params


def is_elementwise(method: Method, params: dict[str, Any]) -> bool:
    """Whether ``method.fn`` with the resolved hyperparameters ``params`` (and its context) may be
    called on row blocks of a tensor (module docstring, "Row blocks")."""
    return bool(method.elementwise(**params) if callable(method.elementwise) else method.elementwise)


def check_range(name: str, value, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` and the valid interval unless ``low <= value <= high``
    (strict at an open end)."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}") from None
    below = x <= low if low_open else x < low
    above = x >= high if high_open else x > high
    if math.isnan(x) or below or above:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_finite_number(name: str, value) -> None:
    check_range(name, value, -math.inf, math.inf, low_open=True, high_open=True)


def select_keys(ref: Mapping[str, Any], include=None, exclude=None) -> list[str]:
    """The keys a method merges: floating-point tensors whose names pass ``include``/``exclude``.

    ``ref`` maps key -> anything with a torch ``dtype`` (tensors, or ``device="meta"`` tensors
    built from a checkpoint header), in the order the keys should be visited.
    """
    return [k for k, t in ref.items() if t.dtype.is_floating_point and matches(k, include, exclude)]


def to_compute(t: Tensor, device: str | torch.device | None = None) -> Tensor:
    """``t`` on the compute device in its compute dtype: float32, or float64 where the tensor is
    float64 and the device supports it (float16/bfloat16 are merged in float32)."""
    dev = get_device(device)
    dtype = compute_dtype(t)
    if dtype == torch.float64 and not supports_float64(dev):
        dtype = torch.float32
    return t.detach().to(device=dev, dtype=dtype)


def restore(t: Tensor, like: Tensor) -> Tensor:
    """A merged tensor back on the CPU in the dtype of the original ``like``."""
    if t.shape != like.shape:
        raise RuntimeError(f"merged tensor has shape {tuple(t.shape)}, the original {tuple(like.shape)}")
    return t.detach().to(device="cpu", dtype=like.dtype)


def run_items(base: StateDict | None, experts: Sequence[StateDict], keys: Sequence[str] | None = None) -> list:
    """Prepass items ``(key, base_tensor_or_None, [expert_tensors])`` over in-memory dicts (a
    list, so a prepass may read it more than once)."""
    keys = list(experts[0]) if keys is None else keys
    return [(k, None if base is None else base[k], [e[k] for e in experts]) for k in keys]


def run_prepass(method: str, items, **hp):
    """The ``context`` of ``method`` for the selected tensors in ``items`` (see the module
    docstring), or None for a method without a prepass."""
    m = get_method(method)
    params = resolve_hparams(m, hp)
    return None if m.prepass is None else m.prepass(items, **params)


def merge(
    method: str,
    base,
    experts: Sequence,
    *,
    include=None,
    exclude=None,
    excluded_from: str | int | None = None,
    device: str | torch.device | None = None,
    context=None,
    **hp,
) -> StateDict:
    """Merge ``experts`` (state dicts or modules fine-tuned from ``base``) with ``method``.

    Returns a new state dict on the CPU with the keys, shapes and dtypes of the base (of expert 0
    when ``base`` is None). Tensors not selected by ``include``/``exclude`` come from
    ``excluded_from`` (``"base"`` by default when there is a base, else expert 0). ``context``, when
    given, replaces the method's prepass (computed once elsewhere, e.g. by :func:`run_prepass`).
    See the module docstring for what happens around the method.
    """
    m = get_method(method)
    params = resolve_hparams(m, hp)
    if base is None and m.needs_base:
        raise ValueError(f"{method!r} works on task vectors (expert - base) and needs the base model; got base=None")
    if isinstance(experts, (Mapping, torch.nn.Module)):
        raise TypeError("experts must be a list of state dicts or modules, not a single one")
    base_sd = to_state_dict(base) if base is not None else None
    expert_sds = [to_state_dict(e) for e in experts]
    keys = check_compatible(base_sd, expert_sds)
    ref = base_sd if base_sd is not None else expert_sds[0]
    fallback = _excluded_source(excluded_from, base_sd, expert_sds)

    selected = select_keys(ref, include, exclude)
    merged_sel = {}
    if selected:
        base_sel = None if base_sd is None else {k: to_compute(base_sd[k], device) for k in selected}
        experts_sel = [{k: to_compute(e[k], device) for k in selected} for e in expert_sds]
        if context is None and m.prepass is not None:
            context = m.prepass(run_items(base_sel, experts_sel, selected), **params)
        merged_sel = m.fn(base_sel, experts_sel, context=context, **params)
        missing = [k for k in selected if k not in merged_sel]
        if missing:
            raise RuntimeError(f"merge method {method!r} returned no tensor for {missing[0]!r}")

    out: StateDict = {}
    for k in keys:
        if k in merged_sel:
            try:
                out[k] = restore(merged_sel[k], ref[k])
            except RuntimeError as err:
                raise RuntimeError(f"merge method {method!r} changed the shape of {k!r}: {err}") from None
        elif torch.is_floating_point(ref[k]):
            out[k] = fallback[k].detach().clone().cpu()
        else:  # integer buffers (num_batches_tracked, position ids): copied, never averaged
            out[k] = ref[k].detach().clone().cpu()
    return out


def _excluded_source(excluded_from, base_sd, expert_sds) -> StateDict:
    """The state dict that unselected floating-point tensors are copied from."""
    if excluded_from is None:
        excluded_from = "base" if base_sd is not None else 0
    if excluded_from == "base":
        if base_sd is None:
            raise ValueError("excluded_from='base' needs a base model; pass an expert index instead")
        return base_sd
    if isinstance(excluded_from, int) and not isinstance(excluded_from, bool) and 0 <= excluded_from < len(expert_sds):
        return expert_sds[excluded_from]
    raise ValueError(f"excluded_from must be 'base' or an expert index 0..{len(expert_sds) - 1}, got {excluded_from!r}")


def task_vectors(base: StateDict, experts: Sequence[StateDict]) -> list[StateDict]:
    """``expert - base`` for every tensor, the object most methods operate on."""
    return [{k: e[k] - base[k] for k in base} for e in experts]


def stack(experts: Sequence[StateDict], key: str) -> Tensor:
    """The ``key`` tensor of every expert stacked along a new first dimension."""
    return torch.stack([e[key] for e in experts])


# One import per method module; each module registers its methods when imported.
from . import basic, dare, drm, snr, star, ties  # noqa: E402,F401
