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

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ._functional import (
    SegmentStats,
    conflict_coefficients,
    cosclip_coefficients,
    expand_segments,
    project_,
    segment_stats,
)
from ._groups import real
from ._reduce import Reducer

__all__ = ["CosClip", "OneDirection", "Projection", "Rule", "Solution"]


class Solution(NamedTuple):
    """What :meth:`Rule.solve` found, per segment (1-D tensors)."""

    stats: SegmentStats
    coef: Tensor
    """The multiple of the memory subtracted from each segment's vector (``<= 0``; ``0``
    where nothing conflicts)."""
    ok: Tensor
    """0-dim: every sum finite and in range, every coefficient finite."""


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
    ) -> Solution:
        raise NotImplementedError

    def apply_(
        self,
        targets: Sequence[Tensor],
        directions: Sequence[Tensor | None],
        solution: Solution,
        segments: list[int] | None,
        *,
        sign: float = 1.0,
        foreach: bool | None = None,
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
    ) -> Solution:
        stats = segment_stats(
            vectors,
            directions,
            segments,
            dot_offsets=offsets,
            all_reduce=reducer.fn,
            foreach=foreach,
            numels=numels,
        )
        coef = self.coefficients(stats, hyper)
        # The coefficient multiplies the memory in the vectors' arithmetic (float32 unless
        # they are float64): it must be finite there too.
        wide = all(v.dtype == torch.float64 for v in vectors)
        ok = stats.in_range.all() & torch.isfinite(coef if wide else coef.float()).all()
        return Solution(stats, coef, ok)


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


RULES: dict[str, Callable[..., Rule]] = {"projection": Projection, "cos_clip": CosClip}
