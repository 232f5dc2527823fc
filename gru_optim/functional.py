"""The functional core of GRU: pure, in-place operations over lists of tensors.

These are what :class:`gru_optim.GRUOptimizer` is made of; use them directly to build
other training schemes on the same rule.
"""

from ._functional import (
    RectifyResult,
    conflict_coefficients,
    ema_update_,
    expand_segments,
    project_,
    rectify_,
    segment_dots,
    segment_sum,
    tensor_dots,
    tensor_sq_norms,
)

__all__ = [
    "RectifyResult",
    "conflict_coefficients",
    "ema_update_",
    "expand_segments",
    "project_",
    "rectify_",
    "segment_dots",
    "segment_sum",
    "tensor_dots",
    "tensor_sq_norms",
]
