"""The functional core of GRU: pure, in-place operations over lists of tensors.

These are what :class:`gru_optim.GRUOptimizer` is made of; use them directly to build
other training schemes on the same rule.

Every function works on plain lists of tensors (local shards, when the caller holds
distributed tensors) and never synchronises with the host on an accelerator: decisions
stay on the device as 0-dim tensors. Dot products and norms accumulate in float32
(float64 when an input is float64), whatever the dtype of the gradients; the passes run
where :mod:`gru_optim.kernels` decides (``fused=True``: the compiled passes, which sum in
float64).

The mathematics of GRU lives in the coefficient functions (:func:`conflict_coefficients`,
the closed form of the constrained problem; :func:`cosclip_coefficients`, the authors'
partial projection; :func:`cone_coefficients`, several directions) and :func:`project_`
(applying them); :func:`segment_stats` and :func:`segment_gram` compute the sums they
need, once, for every rule and both spaces of the optimizer.

Dynamic range. Float32 sums of squares are exact to rounding while the elements that
dominate a tensor are between about ``1e-19`` and ``1e19`` in magnitude (their squares
stay normal float32 numbers). :func:`segment_stats` flags a segment outside that range
(``SegmentStats.in_range``): on the CPU it then recomputes the segment in float64, which
is exact for every finite float32 input; on an accelerator the flag stays on the device
for the caller to act on (:class:`~gru_optim.GRUOptimizer` skips such a step, with a
reason).

Modules: ``_tensors`` (per-tensor passes), ``_coefficients`` (the rule), ``_sums`` (the
per-segment reduction every statistic shares), ``_segments`` (one direction),
``_gram`` (several directions).
"""

from ._coefficients import conflict_coefficients, cosclip_coefficients
from ._cone import ConeSolution, cone_coefficients
from ._gram import segment_gram
from ._segments import RectifyResult, SegmentStats, rectify_, segment_dots, segment_stats
from ._sums import expand_segments, segment_sum
from ._tensors import (
    clip_coefficient,
    ema_update_,
    project_,
    sum_sq,
    tensor_dots,
    tensor_sq_norms,
    total_norm,
)

__all__ = [
    "ConeSolution",
    "RectifyResult",
    "SegmentStats",
    "clip_coefficient",
    "cone_coefficients",
    "conflict_coefficients",
    "cosclip_coefficients",
    "ema_update_",
    "expand_segments",
    "project_",
    "rectify_",
    "segment_dots",
    "segment_gram",
    "segment_stats",
    "segment_sum",
    "sum_sq",
    "tensor_dots",
    "tensor_sq_norms",
    "total_norm",
]
