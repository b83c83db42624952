"""DRM: Decom-Renorm-Merge (seed 004), horizontal and vertical variants."""

from __future__ import annotations
