"""Merge methods behind one entry point, :func:`merge`, and one registry, :data:`METHODS`.

>>> from lib.merge import merge, METHODS
>>> merged = merge("ties", base_sd, [sd_a, sd_b], density=0.2)

:func:`merge` owns everything around a method: it checks the inputs (known method and
hyperparameters, same keys and shapes, no NaN/Inf, a base where one is needed), selects the
floating-point tensors that pass ``include``/``exclude`` (integer buffers such as
``num_batches_tracked`` are copied from the base, excluded tensors from ``excluded_from``), moves
them to the device in float32 (float64 stays float64), loops over the keys, and casts the result
back to each tensor's dtype on the CPU in the base's key order.

Adding a method: one function in one module of this package, registered by name, plus an import
line at the bottom of this file (and its entry in ``tests/test_merge_contract.py``'s
``AVERAGING_HP``). Write the smallest function that says what the method does:

* per tensor (``per="tensor"``, the default): ``fn(base, experts, **hp) -> Tensor`` gets one key's
  base tensor (None without a base) and the list of the experts' tensors; it may also declare
  ``key`` (the tensor's name, e.g. to seed a random mask) and ``context`` (what its ``prepass``
  computed over the whole model, e.g. TIES' model-wide thresholds);
* per stack of same-shape matrices (``per="stack"``, spectral methods):
  ``fn(taus, **hp) -> Tensor`` maps the task vectors ``(B, N, m, n)`` of ``B`` same-shape
  matrices of ``N`` experts to ``B`` merged task vectors ``(B, m, n)``, in batches of at most
  :data:`BATCH_ELEMENTS` entries per expert; tensors that are not matrices get the mean task
  vector, and the result is ``base + lam * merged``;
* a member of the task-arithmetic family (sparsify x consensus x ``lam``): one line in
  :mod:`lib.merge.core`.

and register it with ``@register(name, family=..., description=..., reference=..., **defaults)``
(:func:`register`: the defaults live there and only there, the flags for the streamed merge
too). Hyperparameters share one vocabulary (:data:`VOCABULARY`); :func:`canonical_params` resolves
old names (DARE's ``p``) and fills the defaults. The methods live in :mod:`.basic` (average),
:mod:`.core` (task arithmetic, TIES, DARE), :mod:`.star`, :mod:`.drm` and :mod:`.snr`; the
out-of-core engine the command line drives calls the same functions one key at a time.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..device import get_device, supports_float64
from ..linalg import map_matrix_stacks
from ..statedict import StateDict, check_compatible, compute_dtype, is_matrix, matches, to_state_dict

#: precision of the spectral methods' Gram eigendecompositions (STAR, DRM; measurements in their modules)
PRECISION = torch.float64
#: entries of task vectors per expert in one batch of same-shape matrices (256 MiB in float64)
BATCH_ELEMENTS = 1 << 25

#: what each hyperparameter name means, whichever method takes it
VOCABULARY = {
    "lam": "scale of the merged task vector: base + lam * merged",
    "density": "fraction of the entries kept by a magnitude trim (the largest |tau|)",
    "keep": "probability that an entry survives a random drop (DARE), survivors rescaled by 1/keep",
    "seed": "seed of the random drop, mixed with each tensor's name and expert index",
    "scope": "where a magnitude trim ranks: 'model' (all tensors of an expert) or 'tensor'",
    "weights": "one factor per expert",
}


@dataclass(frozen=True)
class Method:
    """A registry entry. ``fn(base, experts, *, context=None, **hp)`` merges dicts of selected
    tensors (already on the compute device) and returns a dict with the same keys; it is built
    by :func:`register` around the method's per-tensor or per-stack function (``impl``)."""

    name: str
    fn: Callable[..., StateDict]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    needs_base: bool = True
    prepass: Callable[..., Any] | None = None
    check: Callable[..., None] | None = None
    elementwise: bool | Callable[..., bool] = False
    prepass_elementwise: bool = False
    family: str = ""
    reference: str = ""
    version: int = 1
    aliases: dict[str, tuple[str, Callable[[Any], Any]]] = field(default_factory=dict)
    impl: Callable[..., Any] | None = None
    per: str = "tensor"

    def __call__(self, base, experts, **hp):
        return merge(self.name, base, experts, **hp)


METHODS: dict[str, Method] = {}


def register(
    name: str,
    *,
    family: str,
    description: str,
    reference: str,
    per: str = "tensor",
    version: int = 1,
    needs_base: bool = True,
    prepass=None,
    check=None,
    elementwise: bool | Callable[..., bool] = False,
    prepass_elementwise: bool = False,
    aliases: Mapping[str, tuple[str, Callable]] | None = None,
    **defaults,
):
    """Decorator adding a method to :data:`METHODS` (module docstring).

    ``family``: ``"average"``, ``"task_arithmetic"``, ``"spectral"`` or ``"snr"``.
    ``reference``: the paper and the official code. ``version``: bump it when the method's
    numbers change, so stored results made by the old code are recomputed. ``defaults``: every
    hyperparameter with its default, the only place they are declared.
    ``check(**hp)`` raises ``ValueError`` for a value out of range, before any tensor is touched.
    ``aliases``: old name -> (name, conversion), e.g. ``{"p": ("keep", lambda p: 1 - p)}``.

    For the streamed merge (one key, or one block of a key's rows, at a time):
    ``prepass(items, **hp) -> context`` looks across the whole model first (``items``: a
    re-iterable of ``(key, base_tensor_or_None, [expert_tensors])``); ``elementwise`` (a bool, or
    a function of the hyperparameters) says that each entry of the result depends only on the same
    entry of the inputs given the context, so a tensor may be merged in blocks of rows;
    ``prepass_elementwise`` that the prepass gives the same context when a tensor arrives as
    several blocks of rows under its key.
    """
    if per not in ("tensor", "stack"):
        raise ValueError(
            f"per must be 'tensor' (fn of one key's tensors) or 'stack' (fn of same-shape matrix stacks), got {per!r}"
        )

    def deco(impl):
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        fn = (_per_stack if per == "stack" else _per_tensor)(impl, prepass)
        METHODS[name] = Method(
            name,
            fn,
            dict(defaults),
            description,
            needs_base,
            prepass,
            check,
            elementwise,
            prepass_elementwise,
            family,
            reference,
            version,
            dict(aliases or {}),
            impl,
            per,
        )
        return impl

    return deco


def _per_tensor(impl, prepass):
    """The dict-level ``fn`` of a per-tensor method: the key loop, the prepass when no context
    is given, and ``key``/``context`` passed where ``impl`` declares them."""
    takes = inspect.signature(impl).parameters
    takes_key, takes_context = "key" in takes, "context" in takes

    @functools.wraps(impl)
    def fn(base, experts, *, context=None, **hp):
        if context is None and prepass is not None:
            context = prepass(run_items(base, experts), **hp)

        def one(k):
            extra = ({"key": k} if takes_key else {}) | ({"context": context} if takes_context else {})
            return impl(None if base is None else base[k], [e[k] for e in experts], **extra, **hp)

        keys = list(experts[0])
        workers = min(_KEY_WORKERS.get(), len(keys))
        if workers < 2:
            return {k: one(k) for k in keys}
        with ThreadPoolExecutor(workers) as pool:
            return dict(zip(keys, pool.map(one, keys)))

    return fn


#: worker threads over which a per-tensor method's key loop is spread (set by :func:`merge`)
_KEY_WORKERS = contextvars.ContextVar("key_workers", default=1)


@contextmanager
def _keys_in_parallel(threads: int):
    """Single-threaded torch ops on ``threads`` Python threads, each merging whole keys, instead
    of every op spread over ``threads`` cores. The same result (each key's ops are the same), and
    a busy core costs only its share: a worker on it merges fewer keys, where a parallel op waits
    for its slowest thread (issue 22: two threads were several times slower than one on a 2-core
    machine with one core taken). Restores the thread count afterwards."""
    token = _KEY_WORKERS.set(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _KEY_WORKERS.reset(token)


def _per_stack(impl, prepass):
    """The dict-level ``fn`` of a spectral method: its task vectors of same-shape matrices in
    batched stacks, the mean task vector elsewhere, ``base + lam * merged``."""

    @functools.wraps(impl)
    def fn(base, experts, *, context=None, lam=1.0, **hp):
        def taus(key):
            return stack(experts, key) - base[key]

        matrices = {k: t.shape for k, t in base.items() if is_matrix(t)}
        merged = map_matrix_stacks(
            matrices, taus, lambda deltas: impl(deltas, **hp), max_elements=BATCH_ELEMENTS // len(experts)
        )
        return {k: base[k] + lam * (merged[k] if k in merged else taus(k).mean(0)) for k in base}

    return fn


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


def canonical_params(method: str, **hp) -> dict[str, Any]:
    """Every hyperparameter of ``method`` under its current name, defaults filled in and checked:
    one dict per configuration, e.g. ``canonical_params("dare", p=0.9)`` and
    ``canonical_params("dare", keep=0.1)`` are equal (old names are aliases, :func:`register`)."""
    return resolve_hparams(get_method(method), hp)


def resolve_hparams(method: Method, hp: dict[str, Any]) -> dict[str, Any]:
    """:func:`canonical_params` of a registry entry."""
    hp = dict(hp)
    for old, (new, convert) in method.aliases.items():
        if old in hp:
            if new in hp:
                raise ValueError(
                    f"{method.name!r} got both {old!r} and {new!r}; {old!r} is the old name of {new!r} "
                    f"({VOCABULARY.get(new, new)}): pass one"
                )
            hp[new] = convert(hp.pop(old))
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
    """Merge ``experts`` (state dicts or modules fine-tuned from ``base``) with ``method`` and its
    hyperparameters ``hp`` (:func:`canonical_params`).

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
        threads = torch.get_num_threads()
        on_cpu = next(iter(experts_sel[0].values())).device.type == "cpu"
        parallel = m.per == "tensor" and on_cpu and threads > 1 and len(selected) > 1
        # the task-arithmetic family's prepass is a few passes over memory, run single-threaded
        # like its merge; the SNR strategies' (eigensolvers) keeps torch's threads
        light_prepass = m.family == "task_arithmetic"
        with _keys_in_parallel(threads) if parallel and light_prepass else nullcontext():
            if context is None and m.prepass is not None:
                context = m.prepass(run_items(base_sel, experts_sel, selected), **params)
        with _keys_in_parallel(threads) if parallel else nullcontext():
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


def stack(experts: Sequence[StateDict], key: str) -> Tensor:
    """The ``key`` tensor of every expert stacked along a new first dimension."""
    return torch.stack([e[key] for e in experts])


# One import per method module; each module registers its methods when imported.
from . import basic, core, dare, drm, snr, star, ties  # noqa: E402,F401
