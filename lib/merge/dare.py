"""DARE: drop and rescale task-vector entries (Yu et al. 2024), optionally followed by TIES."""

from __future__ import annotations
