"""lib.stats: the one summary over seeds (mean, sample std, count) and the Student-t interval."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from lib import stats


def test_over_seeds_averages_within_a_seed_first_then_takes_the_sample_std_over_seeds():
    frame = pd.DataFrame(
        {
            "run": ["a"] * 5 + ["b"] * 2,
            "seed": [0, 0, 1, 2, 2, 0, 1],
            "normalized": [0.2, 0.4, 0.5, 0.6, 1.0, 0.1, np.nan],
        }
    )
    s = stats.over_seeds(frame, ["run"]).set_index("run")
    per_seed = [0.3, 0.5, 0.8]
    assert s.loc["a", "mean"] == pytest.approx(np.mean(per_seed))
    assert s.loc["a", "std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert s.loc["a", "n"] == 3
    # a seed without a value is not counted, and one seed has no std
    assert s.loc["b", "n"] == 1 and s.loc["b", "mean"] == pytest.approx(0.1) and math.isnan(s.loc["b", "std"])


def test_over_seeds_keeps_nan_keys_and_first_seen_order_unless_sorted():
    frame = pd.DataFrame(
        {"run": ["z", "a", "z"], "top": [np.nan, 0.5, np.nan], "seed": [0, 0, 1], "value": [1.0, 2.0, 3.0]}
    )
    s = stats.over_seeds(frame, ["run", "top"], "value")
    assert list(s.run) == ["z", "a"] and math.isnan(s.top.iloc[0]) and s["mean"].iloc[0] == 2.0
    assert list(stats.over_seeds(frame, ["run", "top"], "value", sort=True).run) == ["a", "z"]


def test_t_interval_is_wider_than_two_standard_errors_with_three_seeds():
    values = [1.0, 2.0, 4.0]
    low, high = stats.t_interval(values, 0.95)
    se = np.std(values, ddof=1) / math.sqrt(3)
    assert (high - low) / 2 == pytest.approx(scipy_stats.t.ppf(0.975, 2) * se) and (high - low) / 2 > 4 * se
    assert all(math.isnan(v) for v in stats.t_interval([1.0]))
