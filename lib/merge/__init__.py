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
one key (or one module) at a time. That gives the same result as a whole-model call only if
nothing in ``fn`` looks across keys. A method whose result does depend on the whole model (TIES'
model-wide magnitude threshold, the SNR strategies' ranking of layers) declares a ``prepass``:
``prepass(items, **hp) -> context`` receives an iterator of ``(key, base_tensor_or_None,
[expert_tensors])`` over every selected key, visited once, and returns a small object (thresholds,
per-module decisions) that is handed to every ``fn`` call as ``context``. Methods without a
prepass get ``context=None``. Randomness (DARE) is seeded per key, never by a stream shared
across keys, for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..device import get_device
from ..statedict import StateDict, check_compatible, matches, to_state_dict


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., StateDict]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    needs_base: bool = True
    prepass: Callable[..., Any] | None = None

    def __call__(self, base, experts, **hp):
        return merge(self.name, base, experts, **hp)


METHODS: dict[str, Method] = {}


def register(name: str, *, description: str, needs_base: bool = True, prepass=None, **defaults):
    """Decorator adding ``fn`` to :data:`METHODS` under ``name`` with its default hyperparameters."""

    def deco(fn):
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = Method(name, fn, dict(defaults), description, needs_base, prepass)
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
    return {**method.defaults, **hp}


def merge(
    method: str,
    base,
    experts: Sequence,
    *,
    include=None,
    exclude=None,
    excluded_from: str | int | None = None,
    device: str | torch.device | None = None,
    **hp,
) -> StateDict:
    """Merge ``experts`` (state dicts or modules fine-tuned from ``base``) with ``method``.

    Returns a new state dict on the CPU with the keys, shapes and dtypes of the base (of expert 0
    when ``base`` is None). See the module docstring for what happens around the method.
    """
    m = get_method(method)
    params = resolve_hparams(m, hp)
    if base is None and m.needs_base:
        raise ValueError(f"{method!r} works on task vectors (expert - base) and needs the base model; got base=None")
    if isinstance(experts, (dict, torch.nn.Module)):
        raise TypeError("experts must be a list of state dicts or modules, not a single one")
    base_sd = to_state_dict(base) if base is not None else None
    expert_sds = [to_state_dict(e) for e in experts]
    keys = check_compatible(base_sd, expert_sds)
    ref = base_sd if base_sd is not None else expert_sds[0]

    if excluded_from is None:
        excluded_from = "base" if base_sd is not None else 0
    if excluded_from == "base":
        if base_sd is None:
            raise ValueError("excluded_from='base' needs a base model")
        fallback = base_sd
    elif isinstance(excluded_from, int) and 0 <= excluded_from < len(expert_sds):
        fallback = expert_sds[excluded_from]
    else:
        raise ValueError(f"excluded_from must be 'base' or an expert index 0..{len(expert_sds) - 1}, got {excluded_from!r}")

    selected = [k for k in keys if torch.is_floating_point(ref[k]) and matches(k, include, exclude)]
    dev = get_device(device)

    def prepare(sd: StateDict) -> StateDict:
        out = {}
        for k in selected:
            t = sd[k]
            dtype = t.dtype if t.dtype == torch.float64 else torch.float32
            out[k] = t.detach().to(device=dev, dtype=dtype)
        return out

    base_sel = prepare(base_sd) if base_sd is not None else None
    experts_sel = [prepare(e) for e in expert_sds]
    context = None
    if m.prepass is not None:
        items = ((k, None if base_sel is None else base_sel[k], [e[k] for e in experts_sel]) for k in selected)
        context = m.prepass(items, **params)
    merged_sel = m.fn(base_sel, experts_sel, context=context, **params)

    missing = [k for k in selected if k not in merged_sel]
    if missing:
        raise RuntimeError(f"merge method {method!r} returned no tensor for {missing[0]!r}")
    out: StateDict = {}
    for k in keys:
        if k in merged_sel:
            t = merged_sel[k]
            if t.shape != ref[k].shape:
                raise RuntimeError(f"merge method {method!r} changed the shape of {k!r}: {tuple(t.shape)} != {tuple(ref[k].shape)}")
            out[k] = t.detach().to(device="cpu", dtype=ref[k].dtype)
        elif torch.is_floating_point(ref[k]):
            out[k] = fallback[k].detach().clone().cpu()
        else:  # integer buffers (num_batches_tracked, position ids): copied, never averaged
            out[k] = (base_sd if base_sd is not None else expert_sds[0])[k].detach().clone().cpu()
    return out


def task_vectors(base: StateDict, experts: Sequence[StateDict]) -> list[StateDict]:
    """``expert - base`` for every tensor, the object most methods operate on."""
    return [{k: e[k] - base[k] for k in base} for e in experts]


def stack(experts: Sequence[StateDict], key: str) -> Tensor:
    """The ``key`` tensor of every expert stacked along a new first dimension."""
    return torch.stack([e[key] for e in experts])


# One import per method module; each module registers its methods when imported.
from . import basic, dare, drm, snr, star, ties  # noqa: E402,F401
