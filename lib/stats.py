"""One summary over seeds, the project's one convention for every mean ± std and interval.

A number the notebooks report is the mean over seeds (experts retrained per seed); its spread is
the *sample* standard deviation (``ddof=1``; NaN for one seed) and its interval a Student-t
interval at :data:`LEVEL`. :func:`over_seeds` first averages whatever a seed holds several of
(the subsets of a pool, notebooks 04-06) and then summarises the seeds; :func:`t_interval` is
the interval of a mean (or of a paired difference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

#: the confidence level of every interval the notebooks and README state
LEVEL = 0.95


def over_seeds(
    frame: pd.DataFrame, by: Sequence[str], value: str = "normalized", *, seed: str = "seed", sort: bool = False
) -> pd.DataFrame:
    """Per group of ``by``: the mean of ``value`` within each seed, then ``mean``, ``std``
    (sample, ``ddof=1``; NaN for one seed) and ``n`` (seeds with a value) over the seeds. Groups
    keep the order they first appear in (``sort``: ordered by ``by``); NaN keys are groups of
    their own."""
    by = list(by)
    seeds = frame.groupby([*by, seed], sort=False, dropna=False)[value].mean().reset_index()
    out = seeds.groupby(by, sort=False, dropna=False)[value].agg(mean="mean", std="std", n="count").reset_index()
    return out.sort_values(by, kind="stable") if sort else out


def t_interval(values, level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval for the mean of ``values`` at ``level`` (NaN for fewer than two). With
    three seeds the 95 % interval is the mean ± 4.30 standard errors: two standard errors would
    be about an 80 % interval."""
    from scipy.stats import t

    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return math.nan, math.nan
    half = float(t.ppf((1 + level) / 2, values.size - 1)) * float(values.std(ddof=1)) / math.sqrt(values.size)
    return float(values.mean()) - half, float(values.mean()) + half
