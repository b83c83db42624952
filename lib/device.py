"""The one place that chooses where tensors are computed: cuda, then mps, then cpu.

Set ``SPECTRAL_MERGE_DEVICE`` (e.g. ``cpu`` or ``cuda:1``) to force a device. A device that is
named but cannot be used here (``cuda`` without a GPU, ``cuda:3`` on a one-GPU machine, ``mps``
off a Mac, a misspelling) is a ``ValueError`` that says what is available, before any tensor
moves.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch


def _available() -> str:
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names)


@lru_cache(maxsize=None)
def _checked(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {name!r}; available here: {_available()}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but no CUDA GPU is usable here; available: {_available()}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                f"available: {_available()}"
            )
    elif device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ValueError(
                f"device {name!r} asked for, but MPS (Apple GPU) is not available here; available: {_available()}"
            )
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported (cpu, cuda, cuda:N or mps); available here: {_available()}")
    return device


@lru_cache(maxsize=None)
def _auto() -> torch.device:
    forced = os.environ.get("SPECTRAL_MERGE_DEVICE")
    if forced:
        return _checked(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def get_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (checked: it must be usable on this machine), otherwise the best
    available one (cached)."""
    if device is None:
        return _auto()
    return _checked(str(device))


def supports_float64(device: torch.device) -> bool:
    """MPS has no float64; every other backend does."""
    return device.type != "mps"
