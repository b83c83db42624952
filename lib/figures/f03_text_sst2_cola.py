"""Figures of notebook 03: MiniLM experts on SST-2 and CoLA, heads merged too since both tasks
are binary (the analogue of the report's Figure 2)."""

from __future__ import annotations

from pathlib import Path

from .snr_sweep import draw_common

NOTEBOOK = "03_text_sst2_cola"


def draw(results: dict, *, smoke: bool = False) -> list[Path]:
    return draw_common(results, smoke=smoke)
