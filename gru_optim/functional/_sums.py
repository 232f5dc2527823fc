"""Per-segment sums and the one reduction recipe every statistic follows.

:func:`segment_sums` is the recipe shared by the statistics of one direction
(:func:`~gru_optim.functional.segment_stats`) and the Gram matrices of several
(:func:`~gru_optim.functional.segment_gram`): per-tensor sums -> per-segment sums -> one
packed all-reduce -> range check -> on the CPU, an exact float64 recomputation of what
float32 cannot hold. (The retain norm, :func:`~gru_optim.functional.sum_sq`, one sum
without flags on every step's retain side, keeps a lean copy of the same steps.)

Dynamic range. Float32 sums of squares are exact to rounding while the elements that
dominate a tensor are between about ``1e-19`` and ``1e19`` in magnitude (their squares
stay normal float32 numbers). :func:`in_range` flags a segment outside that range: on the
CPU :func:`segment_sums` then recomputes it in float64, which is exact for every finite
float32 input; on an accelerator the flag stays on the device for the caller to act on
(:class:`~gru_optim.GRUOptimizer` skips such a step, with a reason).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["MAX32_SQ", "counts", "expand_segments", "in_range", "segment_sum", "segment_sums"]

# Below this mean square a float32 sum of squares may be made of subnormal products.
_TINY32 = 2.0**-126
MAX32_SQ = torch.finfo(torch.float32).max ** 2


def segment_sum(values: Tensor, segments: Sequence[int] | None) -> Tensor:
    """Sum consecutive runs of ``values``.

    ``segments`` gives the length of each run (they must add up to ``len(values)``);
    ``None`` means one run over everything. Returns a 1-D tensor with one entry per run.
    """
    if segments is None:
        return values.sum(0, keepdim=True)
    if sum(segments) != values.shape[0]:
        raise ValueError(f"segments add up to {sum(segments)}, expected {values.shape[0]}")
    if len(segments) == values.shape[0]:
        return values
    return torch.stack([v.sum(0) for v in torch.split(values, list(segments))])


def expand_segments(per_segment: Tensor, segments: Sequence[int] | None, n: int) -> Tensor:
    """Inverse of :func:`segment_sum`'s grouping: one entry per tensor, copied from its run."""
    if segments is None:
        return per_segment.expand(n)
    if len(segments) == n:
        return per_segment
    return torch.cat([c.expand(s) for c, s in zip(per_segment.unbind(), segments)])


_COUNTS: dict[tuple[torch.device, torch.dtype, tuple[int, ...]], Tensor] = {}


def counts(numels: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Element counts as a tensor on ``device``, made once per layout (no host-to-device
    copy on later steps)."""
    key = (device, dtype, numels)
    t = _COUNTS.get(key)
    if t is None:
        if len(_COUNTS) > 256:
            _COUNTS.clear()
        t = _COUNTS[key] = torch.tensor([float(n) for n in numels], dtype=dtype, device=device)
    return t


def in_range(dot: Tensor, m_sq: Tensor, g_sq: Tensor, n_m: Tensor, n_g: Tensor) -> Tensor:
    """Where float32 sums ``<g, m>``, ``|m|^2``, ``|g|^2`` over ``n_m``/``n_g`` elements can
    be trusted: finite, and no sum made of subnormal squares (float64 sums: finite)."""
    finite = torch.isfinite(dot) & torch.isfinite(m_sq) & torch.isfinite(g_sq)
    if dot.dtype == torch.float64:
        return finite
    # A non-zero sum below n * FLT_MIN may be made of subnormal products; a zero sum with
    # a non-zero dot product means every square underflowed.
    m_ok = torch.where(m_sq == 0, dot == 0, m_sq >= n_m * _TINY32)
    g_ok = torch.where(g_sq == 0, dot == 0, g_sq >= n_g * _TINY32)
    return finite & m_ok & g_ok


def segment_sums(
    columns: Callable[[torch.dtype | None], Sequence[Tensor]],
    segments: Sequence[int] | None,
    *,
    all_reduce: Callable[[Tensor], None] | None,
    in_range: Callable[[Tensor, bool], Tensor],
) -> tuple[Tensor, Tensor]:
    """Per-segment sums of per-tensor columns, reduced across processes, range-checked.

    ``columns(dtype)`` returns the per-tensor sums (1-D tensors of one dtype, one entry
    per tensor) accumulated in ``dtype`` (``None``: the default, float32 for float32
    inputs). They are summed per segment (as :func:`segment_sum`) into one packed
    ``(columns, segments)`` tensor, added across processes with one ``all_reduce``, and
    checked by ``in_range(packed, exact)`` (one flag per segment; ``exact``: the sums are
    the float64 recomputation). On the CPU, where reading the flags costs nothing, float32
    sums with a flag down are recomputed once with ``columns(torch.float64)`` (a second
    collective: every process sees the same reduced flags, so all take this branch
    together). Returns ``(packed, flags)``.
    """

    def reduced(dtype: torch.dtype | None) -> Tensor:
        packed = torch.stack([segment_sum(c, segments) for c in columns(dtype)])
        if all_reduce is not None:
            all_reduce(packed)
        return packed

    packed = reduced(None)
    ok = in_range(packed, False)
    if packed.dtype == torch.float32 and packed.device.type == "cpu" and not bool(ok.all()):
        # Reading a flag costs nothing on the CPU: recompute exactly instead of skipping.
        packed = reduced(torch.float64)
        ok = in_range(packed, True)
    return packed, ok
