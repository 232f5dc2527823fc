"""Per-segment statistics of one direction and the GRU rule over lists of tensors.

:func:`segment_stats` computes the sums every one-direction rule needs, once, for both
spaces of the optimizer (through :func:`~gru_optim.functional._sums.segment_sums`, the
recipe the Gram matrices of several directions share); :func:`rectify_` is the whole
rule in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import kernels as K
from ._coefficients import conflict_coefficients
from ._sums import MAX32_SQ, counts, expand_segments, in_range, segment_sum, segment_sums
from ._tensors import project_, tensor_dots, tensor_sq_norms

__all__ = ["RectifyResult", "SegmentStats", "rectify_", "segment_dots", "segment_stats"]


class SegmentStats(NamedTuple):
    """Per-segment sums of one rectification (1-D tensors, one entry per segment), summed
    across processes when the tensors are shards."""

    dot: Tensor
    """``<g, m>`` (less the caller's ``dot_offsets``)."""
    ema_sq_norm: Tensor
    """``||m||^2``."""
    grad_sq_norm: Tensor
    """``||g||^2``, over every tensor of the segment (those without a memory too)."""
    in_range: Tensor
    """``True`` where the sums are finite and inside float32's dynamic range (see the
    module's docstring); always ``True`` for float64 sums."""


def segment_stats(
    tensors: Sequence[Tensor],
    ema: Sequence[Tensor | None],
    segments: Sequence[int] | None,
    *,
    dot_offsets: Tensor | None = None,
    all_reduce: Callable[[Tensor], None] | None = None,
    foreach: bool | None = None,
    numels: Sequence[int] | None = None,
    fused: bool = False,
) -> SegmentStats:
    """The sums every rule needs, per segment (``segments`` as in :func:`segment_sum`).

    ``ema[i]`` may be ``None`` (a tensor without a memory: it adds to ``||g||^2`` only).
    ``dot_offsets`` (one entry per tensor) is subtracted from the dot products. With
    ``all_reduce`` the partial sums of every process are added with one collective on
    one packed tensor (``[dot, ||m||^2, ||g||^2]`` per segment; a second one on the CPU
    when a segment needs the float64 recomputation). ``numels`` gives each tensor's
    element count when the tensors are shards of larger ones (the range check uses it).
    The fused path sums in float64 (exact over float32 or narrower elements: only
    finiteness is checked).
    """
    if len(tensors) != len(ema):
        raise ValueError(f"segment_stats: {len(tensors)} tensors but {len(ema)} buffers")

    def columns(dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
        dots, m_sq, g_sq = K.stats(tensors, ema, fused=fused, foreach=foreach, dtype=dtype)
        if dot_offsets is not None:
            dots = dots - dot_offsets.to(dots)
        return dots, m_sq, g_sq

    def check(packed: Tensor, exact: bool) -> Tensor:
        if exact:
            # Exact now; the vectors themselves must still have a float32 norm.
            return torch.isfinite(packed).all(0) & (packed[1:] <= MAX32_SQ).all(0)
        if packed.dtype == torch.float64:
            return torch.isfinite(packed).all(0)
        sizes = tuple(numels) if numels is not None else tuple(t.numel() for t in tensors)
        dev, dtype = packed.device, packed.dtype
        n_m = counts(tuple(0 if m is None else n for m, n in zip(ema, sizes)), dtype, dev)
        n_g = counts(sizes, dtype, dev)
        dot, m_sq, g_sq = packed.unbind()
        return in_range(dot, m_sq, g_sq, segment_sum(n_m, segments), segment_sum(n_g, segments))

    packed, ok = segment_sums(columns, segments, all_reduce=all_reduce, in_range=check)
    return SegmentStats(packed[0], packed[1], packed[2], ok)


def segment_dots(
    tensors: Sequence[Tensor],
    ema: Sequence[Tensor],
    segments: Sequence[int] | None,
    *,
    dot_offsets: Tensor | None = None,
    extra: Tensor | None = None,
    all_reduce: Callable[[Tensor], None] | None = None,
    foreach: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per segment, ``<tensors, ema>`` (less the per-tensor ``dot_offsets``) and
    ``||ema||^2``, as two 1-D tensors (segments as in :func:`segment_sum`).

    With ``all_reduce`` the partial sums of every process are added with one collective
    on one packed tensor, which also carries ``extra`` (any 1-D tensor of values to sum
    across processes, returned as the third element; ``None`` when not given).
    """
    dots = tensor_dots(tensors, ema)
    if dot_offsets is not None:
        dots = dots - dot_offsets.to(dots)
    sq = tensor_sq_norms(ema, foreach=foreach).to(dots.dtype)
    seg_dot = segment_sum(dots, segments)
    seg_sq = segment_sum(sq, segments)
    if all_reduce is not None:
        k = seg_dot.shape[0]
        parts = [seg_dot, seg_sq] + ([extra.to(seg_dot)] if extra is not None else [])
        packed = torch.cat(parts)
        all_reduce(packed)
        seg_dot, seg_sq = packed[:k], packed[k : 2 * k]
        if extra is not None:
            extra = packed[2 * k :]
    return seg_dot, seg_sq, extra


class RectifyResult(NamedTuple):
    """Per-segment quantities of one rectification (1-D tensors, one entry per segment)."""

    dot: Tensor
    """``<g, m>`` before rectification."""
    ema_sq_norm: Tensor
    """``||m||^2``."""
    coef: Tensor
    """The multiple of ``m`` that was subtracted (``0`` where there was no conflict)."""


def rectify_(
    grads: Sequence[Tensor],
    ema: Sequence[Tensor],
    *,
    segments: Sequence[int] | None = None,
    dot_offsets: Tensor | None = None,
    all_reduce: Callable[[Tensor], None] | None = None,
    foreach: bool | None = None,
) -> RectifyResult:
    """Rectify ``grads`` against the retain memory ``ema`` in place (the GRU rule).

    Per segment (``segments`` as in :func:`segment_sum`; ``None`` is one global segment,
    the paper's rule), with ``d = <g, m>``: if ``d < 0`` and ``m != 0`` the gradient
    becomes ``g - d / ||m||^2 * m``, otherwise it is left exactly as it was. Afterwards
    ``<g, m> >= 0`` per segment up to rounding.

    ``dot_offsets`` (one entry per tensor) is subtracted from the per-tensor dot products
    before the decision: it lets a caller rectify the part ``g - r`` of a gradient while
    ``r`` (whose dots with ``m`` it already knows) stays in place. ``all_reduce``, when
    given, sums a packed 1-D tensor across processes in place (for sharded tensors whose
    dot products are partial sums).
    """
    n = len(grads)
    if n != len(ema):
        raise ValueError(f"rectify_: {n} gradients but {len(ema)} buffers")
    if n == 0:
        z = torch.zeros(0)
        return RectifyResult(z, z, z)
    stats = segment_stats(
        grads, ema, segments, dot_offsets=dot_offsets, all_reduce=all_reduce, foreach=foreach
    )
    coef = conflict_coefficients(stats.dot, stats.ema_sq_norm)
    project_(grads, ema, expand_segments(coef, segments, n), foreach=foreach)
    return RectifyResult(stats.dot, stats.ema_sq_norm, coef)
