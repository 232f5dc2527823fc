"""The functional core of GRU: pure, in-place operations over lists of tensors.

These are what :class:`gru_optim.GRUOptimizer` is made of; use them directly to build
other training schemes on the same rule.
"""

from ._cone import ConeSolution, cone_coefficients, segment_gram
from ._functional import (
    RectifyResult,
    SegmentStats,
    clip_coefficient,
    conflict_coefficients,
    cosclip_coefficients,
    ema_update_,
    expand_segments,
    project_,
    rectify_,
    segment_dots,
    segment_stats,
    segment_sum,
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
    "tensor_dots",
    "tensor_sq_norms",
    "total_norm",
]
