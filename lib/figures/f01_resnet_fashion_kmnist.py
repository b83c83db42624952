"""Figures of notebook 01: ResNet-18 experts on FashionMNIST and KMNIST merged by SNR routing
(the analogue of the report's Figure 3), with the report's absolute thresholds beside the top
sweep."""

from __future__ import annotations

from pathlib import Path

from .snr_sweep import draw_common, draw_threshold_sweep

NOTEBOOK = "01_resnet_fashion_kmnist"


def draw(results: dict, *, smoke: bool = False) -> list[Path]:
    return draw_common(results, smoke=smoke, extra=(draw_threshold_sweep,))
