"""Rules: how a vector is rectified against the retain directions.

Every rule has one contract. :meth:`Rule.solve` takes the vectors to rectify (local
shards of the forget gradients, or of the inner optimizer's update in update space), the
retain directions (the memory, as local shards; ``None`` for a parameter without one),
the segments of the partition and the :class:`~gru_optim._reduce.Reducer`, and returns a
:class:`Solution`: the per-segment sums, the coefficients and whether they can be
trusted. It changes nothing. :meth:`Rule.apply_` then adds the correction to any targets
(the vectors themselves in gradient space; the parameters, with the opposite sign, in
update space). The optimizer decides between the two whether to skip the step.

A new rule is one subclass here: its hyperparameters (param-group keys and defaults) in
:attr:`Rule.hyperparameters`, its validation in :meth:`Rule.check`, and
:meth:`Rule.solve` (rules of one direction only write :meth:`OneDirection.coefficients`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ._cone import cone_coefficients
from ._groups import real
from ._reduce import Reducer
from .functional import (
    SegmentStats,
    conflict_coefficients,
    cosclip_coefficients,
    expand_segments,
    project_,
    segment_gram,
    segment_stats,
    tensor_dots,
)

__all__ = ["Cone", "CosClip", "OneDirection", "Projection", "Rule", "Solution", "make_rule"]


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


def _dots_with(vectors: Sequence[Tensor], directions: Sequence[Tensor | None]) -> Tensor:
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
        return _dots_with(vectors, directions)

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


class Projection(OneDirection):
    """The paper's rule: ``g - min(<g, m>, 0) / ||m||^2 * m``, the closest vector to ``g``
    that does not conflict with ``m``."""

    name = "projection"

    def coefficients(self, stats: SegmentStats, hyper: list[dict[str, float]]) -> Tensor:
        return conflict_coefficients(stats.dot, stats.ema_sq_norm)


COS_CLIP_KEY = "gru_cos_clip"
"""Param-group key of the cos-clip threshold."""


class CosClip(OneDirection):
    """The authors' partial projection: removes only the part of the conflict beyond a
    cosine ``threshold`` (:func:`gru_optim.functional.cosclip_coefficients`)."""

    name = "cos_clip"
    hyperparameters: ClassVar[dict[str, float]] = {COS_CLIP_KEY: -0.5}

    def __init__(self, threshold: float = -0.5) -> None:
        self.threshold = self.check(COS_CLIP_KEY, threshold, "")

    def check(self, key: str, value: Any, where: str) -> float:
        return real(
            "cos_clip",
            value,
            low=-1.0,
            high=0.0,
            what=f" (a cosine threshold; the authors use -0.5){where}",
        )

    def defaults(self) -> dict[str, float]:
        return {COS_CLIP_KEY: self.threshold}

    def coefficients(self, stats: SegmentStats, hyper: list[dict[str, float]]) -> Tensor:
        values = [h[COS_CLIP_KEY] for h in hyper]
        if all(v == values[0] for v in values):
            threshold: float | Tensor = values[0]
        else:
            threshold = torch.tensor(values, dtype=stats.dot.dtype).to(stats.dot.device)
        return cosclip_coefficients(stats.dot, stats.ema_sq_norm, stats.grad_sq_norm, threshold)


class Cone(Rule):
    """GRU-k: rectify against the memory and the ``k - 1`` most recent raw retain
    gradients at once: the projection onto the cone ``{x : <x, d_i> >= 0}``
    (:func:`gru_optim.functional.cone_coefficients`). ``k = 1`` is the paper's rule.

    Per segment it needs the ``k (k + 1) / 2`` Gram entries and the ``k`` dot products of
    the vector with the directions, summed with one packed all-reduce."""

    name = "cone"

    def __init__(self, directions: int) -> None:
        directions = _directions(directions)
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
        return torch.stack([_dots_with(vectors, col) for col in cols], -1)

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


def _directions(value: object) -> int:
    """``directions`` validated: an integer of any integral type (numpy's too), 1 to 16."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"directions must be an integer from 1 to 16, got {value!r}")
    if not 1 <= int(value) <= 16:
        raise ValueError(f"directions must be an integer from 1 to 16, got {value!r}")
    return int(value)


def make_rule(
    *, directions: int = 1, cos_clip: float | None = None, rule: Rule | None = None
) -> Rule:
    """The rule the optimizers' keyword arguments select (validated): ``rule`` itself, the
    cone for ``directions > 1``, cos clip for a ``cos_clip`` threshold, else the paper's
    projection."""
    directions = _directions(directions)
    if directions > 1 and (rule is not None or cos_clip is not None):
        raise ValueError("directions > 1 is the cone rule: give directions, cos_clip or rule")
    if rule is not None and cos_clip is not None:
        raise ValueError("give cos_clip or rule, not both")
    if rule is not None:
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a gru_optim.rules.Rule, got {type(rule).__name__}")
        return rule
    if directions > 1:
        return Cone(directions)
    return CosClip(cos_clip) if cos_clip is not None else Projection()


RULES: dict[str, Callable[..., Rule]] = {
    "projection": Projection,
    "cos_clip": CosClip,
    "cone": Cone,
}
