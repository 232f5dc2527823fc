"""One run's trajectory between its evaluations: the forgetting scores, the area its
interpolated front dominates, and the step where it first reaches a level of forgetting.

A run is evaluated every few steps; between two evaluations it is taken to move in a
straight line (in the step for :func:`crossing` and :func:`at_step`, in the plane for
:func:`front_area`). Scoring only the evaluated points would draw step-shaped fronts that
favour whichever run forgets more slowly; interpolating does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["at_step", "crossing", "fp_score", "fq_score", "front_area"]


def fq_score(p: float, p_target: float) -> float:
    """``log10`` forget quality mapped to ``[0, 1]``: 0 at the target's, 1 at ``p = 1``."""
    lt = math.log10(max(p_target, 1e-300))
    if lt >= 0:
        return 1.0
    return float(np.clip((math.log10(max(p, 1e-300)) - lt) / -lt, 0.0, 1.0))


def fp_score(fp: float, fp_target: float, fp_oracle: float) -> float:
    """Forget probability mapped to ``[0, 1]``: 0 at the target's, 1 at the oracle's (and
    below it: forgetting more than the oracle earns nothing)."""
    span = fp_target - fp_oracle
    if span <= 0:
        return 0.0
    return float(np.clip((fp_target - fp) / span, 0.0, 1.0))


def front_area(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Area dominated by the polyline through ``(xs[i], ys[i])`` (both coordinates
    maximised, the origin the reference point, negative values counted as 0): the
    integral over ``x >= 0`` of the largest ``y`` the polyline reaches at or right of
    ``x``. Exact: between the breakpoints (the vertices and every crossing of two linear
    pieces) that envelope is linear, and is integrated by trapezoids."""
    x = np.maximum(np.asarray(xs, dtype=float), 0.0)
    y = np.maximum(np.asarray(ys, dtype=float), 0.0)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError("front_area needs as many x as y values, at least one")
    # Each segment (or the lone point) contributes, for every x, the largest y it reaches
    # at or right of x: linear pieces y = a + b x on [lo, hi].
    pieces: list[tuple[float, float, float, float]] = []
    ends = list(zip(x[:-1], y[:-1], x[1:], y[1:])) if len(x) > 1 else [(x[0], y[0], x[0], y[0])]
    for x0, y0, x1, y1 in ends:
        (xa, ya), (xb, yb) = sorted(((x0, y0), (x1, y1)))
        pieces.append((0.0, xa, max(ya, yb), 0.0))
        if xb > xa:
            if yb >= ya:
                pieces.append((xa, xb, yb, 0.0))
            else:
                b = (yb - ya) / (xb - xa)
                pieces.append((xa, xb, ya - b * xa, b))
    cuts = {0.0} | {p[0] for p in pieces} | {p[1] for p in pieces}
    for i, (lo1, hi1, a1, b1) in enumerate(pieces):
        for lo2, hi2, a2, b2 in pieces[i + 1 :]:
            if b1 != b2:
                xc = (a2 - a1) / (b1 - b2)
                if max(lo1, lo2) < xc < min(hi1, hi2):
                    cuts.add(xc)
    grid = sorted(cuts)
    area = 0.0
    for lo, hi in zip(grid[:-1], grid[1:]):
        live = [(a, b) for plo, phi, a, b in pieces if plo <= lo and phi >= hi]
        if live:
            f_lo = max(a + b * lo for a, b in live)
            f_hi = max(a + b * hi for a, b in live)
            area += (hi - lo) * (f_lo + f_hi) / 2
    return float(area)


def crossing(
    steps: Sequence[float], values: Sequence[float], level: float, below: bool = True
) -> float | None:
    """The first (fractional) step at which ``values``, linearly interpolated between
    ``steps``, reaches ``level`` (``<= level`` when ``below``, else ``>= level``);
    ``None`` when it never does."""
    sign = 1.0 if below else -1.0
    v = [sign * (float(val) - level) for val in values]  # reached where <= 0
    if v and v[0] <= 0:
        return float(steps[0])
    for i in range(1, len(v)):
        if v[i] <= 0:
            s0, s1 = float(steps[i - 1]), float(steps[i])
            return s0 + (s1 - s0) * v[i - 1] / (v[i - 1] - v[i])
    return None


def at_step(steps: Sequence[float], values: Sequence[float], step: float) -> float:
    """``values`` linearly interpolated between ``steps`` at ``step``."""
    return float(np.interp(step, np.asarray(steps, dtype=float), np.asarray(values, dtype=float)))
