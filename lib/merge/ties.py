"""TIES-Merging: trim, elect sign, disjoint mean (Yadav et al. 2023); the trim/elect/disjoint-mean steps are reused by DRM."""

from __future__ import annotations
