"""The one place that chooses where tensors are computed: cuda, then mps, then cpu.

Set ``SPECTRAL_MERGE_DEVICE`` (e.g. ``cpu`` or ``cuda:1``) to force a device.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _auto() -> torch.device:
    forced = os.environ.get("SPECTRAL_MERGE_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def get_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, otherwise the best available one (cached)."""
    if device is None:
        return _auto()
    return torch.device(device)


def supports_float64(device: torch.device) -> bool:
    """MPS has no float64; every other backend does."""
    return device.type != "mps"
