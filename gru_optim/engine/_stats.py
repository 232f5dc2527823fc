"""``GRUOptimizer.last_stats``: what the last step did, as 0-dim tensors on the device.

Every step, plain or rectified, rewrites the whole dictionary with the same keys, so a
logger never reads a stale value. Reading any entry is a host synchronisation on an
accelerator; read them every N steps (e.g. from a Trainer callback), not every step.
"""

from __future__ import annotations

import enum
import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = ["STAT_KEYS", "SkipReason", "plain_stats", "reason_of", "step_stats"]


class SkipReason(enum.IntEnum):
    """Why a step was skipped: ``last_stats["skip_reason"]`` holds one of these codes.

    A skipped step leaves the weights and the inner optimizer's state as they were.
    """

    NONE = 0
    """The step was not skipped."""
    RETAIN_NONFINITE = 1
    """The retain gradient has a NaN or infinity (the memory is left as it was)."""
    MEMORY_OVERFLOW = 2
    """Folding the retain gradient would overflow the memory's dtype (float16); the memory
    is left as it was."""
    FORGET_NONFINITE = 3
    """The forget gradient (or a part kept in ``.grad`` from the retain side) has a NaN or
    infinity, or its squared norm overflows float32 (elements of about ``1e19``)."""
    OUT_OF_RANGE = 4
    """A dot product, norm or coefficient is not finite or outside float32's range
    (elements below about ``1e-19`` dominate), on a device where GRU does not recompute
    in float64 (the CPU does)."""
    SCALER_OVERFLOW = 5
    """The gradient scaler found an overflow (fp16 training); the scaler backs off."""


STAT_KEYS = (
    "rectified",
    "skipped",
    "skip_reason",
    "forget_loss",
    "retain_loss",
    "dot",
    "cosine",
    "conflict",
    "conflict_fraction",
    "coef",
    "forget_grad_norm",
    "retain_grad_norm",
    "ema_norm",
    "active_directions",
    "min_slack",
)
"""The keys of every step's statistics. With ``max_grad_norm`` there are also
``grad_norm`` (the final gradient's norm before clipping) and ``clip_coef`` (the factor
applied); after a post-rectification pass, ``post_loss``."""


def reason_of(*pairs: tuple[Tensor, SkipReason], device: torch.device) -> Tensor:
    """The first reason whose condition holds, as a 0-dim int tensor on ``device`` (0:
    none). Stays on the device."""
    out = torch.zeros((), dtype=torch.long, device=device)
    for cond, code in reversed(pairs):
        out = torch.where(cond.to(device), torch.full_like(out, int(code)), out)
    return out


def _nan(device: torch.device) -> Tensor:
    return torch.full((), float("nan"), device=device)


def _loss(loss: Any, device: torch.device) -> Tensor:
    """The loss as a 0-dim tensor; NaN for what is not a scalar (a plain pass-through step
    returns whatever the inner optimizer's closure returned, and is not refused for it)."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            return _nan(device)
        return loss.detach().reshape(()).to(device)
    if not isinstance(loss, bool) and isinstance(loss, numbers.Real):
        return torch.full((), float(loss), device=device)
    return _nan(device)


def plain_stats(
    device: torch.device, loss: Any, skip_reason: Tensor | None = None, *, clipping: bool = False
) -> dict[str, Tensor]:
    """The statistics of a plain step (no retain side): nothing rectified."""
    nan = _nan(device)
    reason = (
        skip_reason if skip_reason is not None else torch.zeros((), dtype=torch.long, device=device)
    )
    out = {k: nan for k in STAT_KEYS}
    out.update(
        rectified=torch.zeros((), dtype=torch.bool, device=device),
        skipped=reason != 0,
        skip_reason=reason,
        forget_loss=_loss(loss, device),
        conflict=torch.zeros((), dtype=torch.bool, device=device),
    )
    if clipping:
        out.update(grad_norm=nan, clip_coef=nan)
    return out


def step_stats(
    *,
    loss: Any,
    retain_loss: Tensor | float | None,
    retain_grad_norm: Tensor,
    dot: Tensor,
    ema_sq_norm: Tensor,
    grad_sq_norm: Tensor,
    coef: Tensor,
    reason: Tensor,
    grad_norm: Tensor | None,
    clip_coef: Tensor | None,
    active: Tensor,
    min_slack: Tensor,
    clipping: bool = False,
) -> dict[str, Tensor]:
    """The statistics of a rectified step, from the per-segment sums."""
    total_dot = dot.sum()
    device = total_dot.device
    ema_norm = ema_sq_norm.sum().sqrt()
    g_norm = grad_sq_norm.sum().sqrt().to(total_dot)
    denom = g_norm * ema_norm
    # Means over the segments that have a memory (the others cannot conflict).
    has = ema_sq_norm > 0
    count = has.sum().clamp(min=1).to(total_dot.dtype)
    conflicts = (dot < 0) & has
    out = {
        "rectified": torch.ones((), dtype=torch.bool, device=device),
        "skipped": reason != 0,
        "skip_reason": reason,
        "forget_loss": _loss(loss, device),
        "retain_loss": _loss(retain_loss, device),
        "dot": total_dot,
        "cosine": torch.where(denom > 0, total_dot / torch.where(denom > 0, denom, 1.0), 0.0),
        "conflict": conflicts.any(),
        "conflict_fraction": conflicts.to(total_dot.dtype).sum() / count,
        "coef": torch.where(has, coef.to(total_dot.dtype), 0.0).sum() / count,
        "forget_grad_norm": g_norm,
        "retain_grad_norm": retain_grad_norm.to(device),
        "ema_norm": ema_norm,
        "active_directions": active.to(device),
        "min_slack": min_slack.to(device),
    }
    if clipping:
        # NaN when the step was skipped before the final gradient existed.
        out["grad_norm"] = grad_norm.to(device) if grad_norm is not None else _nan(device)
        out["clip_coef"] = clip_coef.to(device) if clip_coef is not None else _nan(device)
    return out
