"""Paired statistics over seeds: the mean paired difference with its 95% t interval and
p-value, and Holm's correction over a family of comparisons."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedTest", "holm", "paired_test"]


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison: ``n`` differences, their mean, the 95% interval of the mean
    (Student's t with ``n - 1`` degrees of freedom) and the two-sided p-value of a zero
    mean (NaN with fewer than two differences: nothing to test)."""

    n: int
    mean: float
    low: float
    high: float
    p: float


def paired_test(diffs: Sequence[float], level: float = 0.95) -> PairedTest:
    """The paired t test of ``diffs`` (one difference per seed, arm minus baseline): the
    same numbers as ``scipy.stats.ttest_rel`` and its confidence interval. Differences
    that are all equal give a zero-width interval and p = 1 when they are all 0, p = 0
    otherwise (an infinite t)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return PairedTest(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n < 2:
        return PairedTest(1, mean, math.nan, math.nan, math.nan)
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return PairedTest(n, mean, mean, mean, 1.0 if mean == 0.0 else 0.0)
    se = sd / math.sqrt(n)
    t = mean / se
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(t), n - 1))
    return PairedTest(n, mean, mean - half, mean + half, p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: sorted ascending, the
    ``i``-th (from 0) of ``m`` is multiplied by ``m - i``, capped at 1 and made
    non-decreasing. NaN p-values (untested comparisons) stay NaN and are not counted in
    ``m``."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out
