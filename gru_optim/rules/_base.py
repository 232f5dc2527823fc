"""The contract of a rectification rule, and the rules' shared pieces.

Every rule has one contract. :meth:`Rule.solve` takes the vectors to rectify (local
shards of the forget gradients, or of the inner optimizer's update in update space), the
retain directions (the memory, as local shards; ``None`` for a parameter without one),
the segments of the partition and the reducer (:class:`Reducer`), and
returns a :class:`Solution`: the per-segment sums, the coefficients and whether they can
be trusted. It changes nothing. :meth:`Rule.apply_` then adds the correction to any
targets (the vectors themselves in gradient space; the parameters, with the opposite
sign, in update space). The engine decides between the two whether to skip the step.

A new rule is one file in this package: a subclass of :class:`Rule` (or of
:class:`OneDirection` for a rule against the memory alone, which only writes
:meth:`OneDirection.coefficients`), exported from ``gru_optim/rules/__init__.py``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor

from ..functional import SegmentStats, expand_segments, project_, segment_stats, tensor_dots

__all__ = ["OneDirection", "Reducer", "Rule", "Solution", "dots_with", "real"]


class Reducer(Protocol):
    """What a rule needs of the reduction across processes (the engine's
    ``Reducer`` is one): ``fn`` adds packed partial sums across them in place, or is
    ``None`` when nothing is sharded."""

    @property
    def fn(self) -> Callable[[Tensor], None] | None: ...


def real(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    what: str = "",
) -> float:
    """``value`` as a finite Python float inside the given interval, or a clear error.

    Accepts every real number type (int, float, NumPy scalars, ``fractions``, 0-dim real
    tensors and arrays); refuses ``bool``, strings, complex numbers, NaN and infinities.
    """
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a real number{what}, got {value!r}")
    if isinstance(value, torch.Tensor) or hasattr(value, "__array__"):
        shape = tuple(getattr(value, "shape", ()))
        dtype = getattr(value, "dtype", None)
        is_bool = dtype == torch.bool or str(dtype) == "bool"
        is_complex = (isinstance(dtype, torch.dtype) and dtype.is_complex) or "complex" in str(
            dtype
        )
        if shape != () or is_bool or is_complex:
            raise TypeError(f"{name} must be a real number{what}, got {value!r}")
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number{what}, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite{what}, got {value!r}")
    too_low = x <= low if low_open else x < low
    too_high = x >= high if high_open else x > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low:g}, {high:g}{hi}{what}, got {value!r}")
    return x


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
