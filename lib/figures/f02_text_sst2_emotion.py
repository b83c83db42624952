"""Figures of notebook 02: MiniLM experts on SST-2 and Emotion merged by SNR routing (the
analogue of the report's Figure 1), with the comparison of own heads against the report's
re-initialised head."""

from __future__ import annotations

from pathlib import Path

from .snr_sweep import draw_common, draw_head_variants

NOTEBOOK = "02_text_sst2_emotion"


def draw(results: dict, *, smoke: bool = False) -> list[Path]:
    return draw_common(results, smoke=smoke, extra=(draw_head_variants,))
