"""The SNR-routed strategies of the Sapienza report (seed 000): layers ranked by Marchenko-Pastur SNR decide how each is merged."""

from __future__ import annotations
