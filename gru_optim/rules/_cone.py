"""GRU-k: the projection onto the cone of several retain directions."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from ..functional import (
    SegmentStats,
    cone_coefficients,
    expand_segments,
    project_,
    segment_gram,
)
from ._base import Reducer, Rule, Solution, dots_with

__all__ = ["Cone", "check_directions"]


class Cone(Rule):
    """GRU-k: rectify against the memory and the ``k - 1`` most recent raw retain
    gradients at once: the projection onto the cone ``{x : <x, d_i> >= 0}``
    (:func:`gru_optim.functional.cone_coefficients`). ``k = 1`` is the paper's rule.

    Per segment it needs the ``k (k + 1) / 2`` Gram entries and the ``k`` dot products of
    the vector with the directions, summed with one packed all-reduce."""

    name = "cone"

    def __init__(self, directions: int) -> None:
        directions = check_directions(directions)
        self.directions = directions

    def _columns(
        self,
        n: int,
        directions: Sequence[Tensor | None],
        history: Sequence[Sequence[Tensor] | None] | None,
    ) -> list[list[Tensor | None]]:
        cols: list[list[Tensor | None]] = [list(directions)]
        hist = history if history is not None else [None] * n
        for j in range(self.directions - 1):
            cols.append([None if h is None else h[j] for h in hist])
        return cols

    def offsets(
        self,
        vectors: Sequence[Tensor],
        directions: Sequence[Tensor | None],
        history: Sequence[Sequence[Tensor] | None] | None = None,
    ) -> Tensor:
        """Per vector, its dot products with every direction: ``(n, k)``."""
        cols = self._columns(len(vectors), directions, history)
        return torch.stack([dots_with(vectors, col) for col in cols], -1)

    def solve(
        self,
        vectors: Sequence[Tensor],
        directions: Sequence[Tensor | None],
        segments: list[int] | None,
        reducer: Reducer,
        *,
        hyper: list[dict[str, float]],
        offsets: Tensor | None = None,
        foreach: bool | None = None,
        numels: Sequence[int] | None = None,
        history: Sequence[Sequence[Tensor] | None] | None = None,
        fused: bool = False,
    ) -> Solution:
        cols = self._columns(len(vectors), directions, history)
        gram, dots, g_sq, in_range = segment_gram(
            list(vectors),
            cols,
            segments,
            dot_offsets=offsets,
            all_reduce=reducer.fn,
            foreach=foreach,
            numels=list(numels) if numels is not None else None,
        )
        cone = cone_coefficients(gram, dots, g_sq, precision=gram.dtype)
        lam = cone.coef.to(gram.dtype)
        stats = SegmentStats(dots[:, 0], gram[:, 0, 0], g_sq, in_range)
        wide = all(v.dtype == torch.float64 for v in vectors)
        ok = in_range.all() & torch.isfinite(lam if wide else lam.float()).all()
        finite = torch.isfinite(cone.slack)
        min_slack = torch.where(finite, cone.slack, float("inf")).min().to(gram.dtype)
        return Solution(stats, -lam[:, 0], ok, cone.active.sum(), min_slack, lam)

    def apply_(
        self,
        targets: Sequence[Tensor],
        directions: Sequence[Tensor | None],
        solution: Solution,
        segments: list[int] | None,
        *,
        sign: float = 1.0,
        foreach: bool | None = None,
        history: Sequence[Sequence[Tensor] | None] | None = None,
        fused: bool = False,
        skip: Tensor | None = None,
    ) -> None:
        """``targets[i] += sign * sum_j lambda_j d_j`` per segment (``skip``: read on the
        host; the cone has no fused path)."""
        if skip is not None and bool(skip):
            return
        assert solution.multipliers is not None
        cols = self._columns(len(targets), directions, history)
        for j, col in enumerate(cols):
            have = [i for i, d in enumerate(col) if d is not None]
            if not have:
                continue
            per = expand_segments(-sign * solution.multipliers[:, j], segments, len(targets))
            project_(
                [targets[i] for i in have],
                [col[i] for i in have],  # type: ignore[misc]
                torch.stack([per[i] for i in have]),
                foreach=foreach,
            )


def check_directions(value: object) -> int:
    """``directions`` validated: an integer of any integral type (numpy's too), 1 to 16."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"directions must be an integer from 1 to 16, got {value!r}")
    if not 1 <= int(value) <= 16:
        raise ValueError(f"directions must be an integer from 1 to 16, got {value!r}")
    return int(value)
