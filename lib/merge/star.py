"""STAR: Spectral Truncation And Rescale of task vectors (seed 002)."""

from __future__ import annotations
