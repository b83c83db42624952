"""State-dict checks shared by every routine: keys, shapes, dtypes, NaN/Inf, which tensors are
matrices, and name filters.

A *matrix* is a floating-point parameter with two or more dimensions. Convolution kernels
``(out, in, kh, kw)`` are read as ``(out, in*kh*kw)`` matrices, the usual convention for their
spectra (each output channel is one row). One-dimensional tensors (biases, norm scales, running
statistics) are not matrices.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def is_float(t: Tensor) -> bool:
    return torch.is_floating_point(t)


def is_matrix(t: Tensor) -> bool:
    """A floating-point tensor with at least two dimensions."""
    return is_float(t) and t.ndim >= 2


def as_matrix(t: Tensor, name: str = "tensor") -> Tensor:
    """The 2-D view of a weight: conv kernels become ``(out, in*kh*kw)``."""
    if t.ndim < 2:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}: a 1-D tensor is not a matrix (biases and norm scales have no spectrum)"
        )
    if t.numel() == 0:
        raise ValueError(f"{name} has shape {tuple(t.shape)}: an empty matrix has no spectrum")
    return t.reshape(t.shape[0], -1)


def compute_dtype(t: Tensor) -> torch.dtype:
    """float16/bfloat16 are computed in float32; float32/float64 keep their precision."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def check_finite(t: Tensor, name: str) -> None:
    """``ValueError`` if ``t`` holds a NaN or an Inf. A finite sum proves there is none (one read,
    no temporary tensor); a non-finite sum (a NaN/Inf, or overflow) falls back to the full check."""
    if is_float(t) and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); clean the checkpoint before merging or scanning")


def compile_patterns(patterns: Iterable[str] | str | None, what: str = "pattern") -> list[re.Pattern]:
    """``patterns`` (one regular expression or several) compiled; a malformed one is a
    ``ValueError`` naming it, ``what`` it is (e.g. ``"--include"``) and where it breaks."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{what} {p!r} is not a regular expression (a string)")
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"{what} {p!r} is not a valid regular expression: {err}") from None
    return compiled


def matches(name: str, include: Iterable[str] | str | None = None, exclude: Iterable[str] | str | None = None) -> bool:
    """Whether ``name`` passes the filters. Patterns are regular expressions searched anywhere
    in the name (so a plain substring such as ``"classifier"`` works); a malformed one is a
    ``ValueError`` (:func:`compile_patterns`)."""
    inc, exc = compile_patterns(include, "include"), compile_patterns(exclude, "exclude")
    if inc and not any(p.search(name) for p in inc):
        return False
    if exc and any(p.search(name) for p in exc):
        return False
    return True


def module_of(name: str) -> str:
    """``encoder.layer.0.attention.self.query.weight`` -> ``encoder.layer.0.attention.self.query``."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def to_state_dict(obj) -> StateDict:
    """Accept an ``nn.Module`` or a mapping of tensors."""
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
        if bad:
            raise TypeError(f"state dict entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor")
        return dict(obj)
    raise TypeError(f"expected an nn.Module or a dict of tensors, got {type(obj).__name__}")


def check_compatible(base: Mapping[str, Tensor] | None, experts: Sequence[Mapping[str, Tensor]]) -> list[str]:
    """Check that every expert has the keys and shapes of the reference (the base, or expert 0
    when there is no base) and that no floating-point tensor holds NaN/Inf. Returns the keys in
    the reference's order.

    Integer buffers are never merged but copied from the reference (:func:`lib.merge.merge`), so
    an expert may lack one (``transformers`` 5 no longer saves the non-persistent
    ``embeddings.position_ids``) or hold one the reference lacks; every floating-point key must
    match."""
    if len(experts) == 0:
        raise ValueError("need at least one expert state dict")
    ref_name, ref = ("base", base) if base is not None else ("expert 0", experts[0])
    keys = list(ref.keys())
    key_set = set(keys)
    models = ([("base", base)] if base is not None else []) + [(f"expert {i}", e) for i, e in enumerate(experts)]
    for label, sd in models:
        missing = [k for k in keys if k not in sd and is_float(ref[k])]
        if missing:
            raise ValueError(f"{label} is missing {missing[0]!r} present in {ref_name} ({len(missing)} key(s) missing)")
        extra = [k for k in sd if k not in key_set and is_float(sd[k])]
        if extra:
            raise ValueError(f"{label} has {extra[0]!r}, absent from {ref_name} ({len(extra)} extra key(s))")
        for k in keys:
            if k not in sd:  # an integer buffer the reference supplies
                continue
            if sd[k].shape != ref[k].shape:
                raise ValueError(
                    f"{label} has {k!r} with shape {tuple(sd[k].shape)}, {ref_name} has {tuple(ref[k].shape)}"
                )
            check_finite(sd[k], f"{label}: {k!r}")
    return keys
