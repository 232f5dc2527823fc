"""The contract of a rectification rule, and the rules' shared pieces.

Every rule has one contract. :meth:`Rule.solve` takes the vectors to rectify (local
shards of the forget gradients, or of the inner optimizer's update in update space), the
retain directions (the memory, as local shards; ``None`` for a parameter without one),
the segments of the partition and the :class:`~gru_optim.engine._reduce.Reducer`, and
returns a :class:`Solution`: the per-segment sums, the coefficients and whether they can
be trusted. It changes nothing. :meth:`Rule.apply_` then adds the correction to any
targets (the vectors themselves in gradient space; the parameters, with the opposite
sign, in update space). The engine decides between the two whether to skip the step.

A new rule is one file in this package: a subclass of :class:`Rule` (or of
:class:`OneDirection` for a rule against the memory alone, which only writes
:meth:`OneDirection.coefficients`), exported from ``gru_optim/rules/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .._functional import SegmentStats, expand_segments, project_, segment_stats, tensor_dots
from ..engine._reduce import Reducer

__all__ = ["OneDirection", "Rule", "Solution", "dots_with"]


class Solution(NamedTuple):
    """What :meth:`Rule.solve` found, per segment (1-D tensors)."""

    stats: SegmentStats
    coef: Tensor
    """The multiple of the memory subtracted from each segment's vector (``<= 0``; ``0``
    where nothing conflicts)."""
    ok: Tensor
    """0-dim: every sum finite and in range, every coefficient finite."""
    active: Tensor
    """0-dim: how many constraints bind, over all segments."""
    min_slack: Tensor
    """0-dim: the smallest ``<x, d_i> / |d_i|`` after rectification, over segments and
    directions (``+inf`` without any direction)."""
    multipliers: Tensor | None = None
    """``(S, k)`` multipliers of rules with several directions: ``x = g + sum_i l_i d_i``."""


def dots_with(vectors: Sequence[Tensor], directions: Sequence[Tensor | None]) -> Tensor:
    """``<vectors[i], directions[i]>`` per vector (zero where there is no direction),
    accumulated in float32 or wider."""
    have = [i for i, d in enumerate(directions) if d is not None]
    if not have:
        return torch.zeros(len(vectors), device=vectors[0].device)
    d = tensor_dots([vectors[i] for i in have], [directions[i] for i in have])  # type: ignore[misc]
    vals = [d.new_zeros(())] * len(vectors)
    for pos, i in enumerate(have):
        vals[i] = d[pos]
    return torch.stack(vals)


class Rule:
    """The contract of a rectification rule (see the module's docstring)."""

    hyperparameters: ClassVar[dict[str, float]] = {}
    """Param-group keys this rule reads, with their defaults."""

    name: ClassVar[str] = "rule"

    def check(self, key: str, value: Any, where: str) -> float:
        """Validate one of :attr:`hyperparameters` (raises with a clear message)."""
        raise NotImplementedError

    def defaults(self) -> dict[str, float]:
        """The values of :attr:`hyperparameters` this instance writes into new groups."""
        return dict(self.hyperparameters)

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
        """Compute the rectification (change nothing): see the module's docstring."""
        raise NotImplementedError

    def offsets(
        self,
        vectors: Sequence[Tensor],
        directions: Sequence[Tensor | None],
        history: Sequence[Sequence[Tensor] | None] | None = None,
    ) -> Tensor:
        """Per vector, the dot products :meth:`solve` subtracts (``offsets``) when these
        vectors stay in ``.grad`` under the forget gradient: here, with the memory."""
        return dots_with(vectors, directions)

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
        """``targets[i] -= sign * coef[segment of i] * directions[i]`` (members without a
        direction are left alone)."""
        have = [i for i, d in enumerate(directions) if d is not None]
        if not have:
            return
        per = expand_segments(solution.coef, segments, len(targets))
        if sign != 1.0:
            per = per * sign
        if len(have) != len(targets):
            per = torch.stack([per[i] for i in have])
        project_(
            [targets[i] for i in have],
            [directions[i] for i in have],  # type: ignore[misc]
            per,
            foreach=foreach,
            fused=fused,
            skip=skip,
        )


class OneDirection(Rule):
    """Rules against the memory alone: a coefficient per segment from the sums."""

    def coefficients(self, stats: SegmentStats, hyper: list[dict[str, float]]) -> Tensor:
        raise NotImplementedError

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
        stats = segment_stats(
            vectors,
            directions,
            segments,
            dot_offsets=offsets,
            all_reduce=reducer.fn,
            foreach=foreach,
            numels=numels,
            fused=fused,
        )
        coef = self.coefficients(stats, hyper)
        # The coefficient multiplies the memory in the vectors' arithmetic (float32 unless
        # they are float64): it must be finite there too.
        wide = all(v.dtype == torch.float64 for v in vectors)
        ok = stats.in_range.all() & torch.isfinite(coef if wide else coef.float()).all()
        has = stats.ema_sq_norm > 0
        norm = torch.where(has, stats.ema_sq_norm, torch.ones_like(stats.ema_sq_norm)).sqrt()
        slack = torch.where(has, (stats.dot - coef * stats.ema_sq_norm) / norm, float("inf"))
        active = ((coef != 0) & has).sum()
        return Solution(stats, coef, ok, active, slack.min())
