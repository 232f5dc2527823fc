"""The mathematics of GRU's rule: the multiple of the retain memory to subtract, per
segment, from the sums of :func:`~gru_optim.functional.segment_stats`."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["conflict_coefficients", "cosclip_coefficients"]


def conflict_coefficients(dot: Tensor, ema_sq_norm: Tensor) -> Tensor:
    """The multiple of the retain memory to subtract, elementwise over segments.

    For a gradient ``g`` and memory ``m`` with ``dot = <g, m>`` and
    ``ema_sq_norm = ||m||^2``, returns ``c = min(dot, 0) / ||m||^2`` (``0`` where
    ``||m|| = 0``), so that ``g - c * m`` is the closest vector to ``g`` with
    ``<g - c * m, m> >= 0``. Never divides by zero; the result is on the device.
    """
    positive = ema_sq_norm > 0
    safe = torch.where(positive, ema_sq_norm, torch.ones_like(ema_sq_norm))
    return torch.where(positive & (dot < 0), dot / safe, torch.zeros_like(dot))


def cosclip_coefficients(
    dot: Tensor, ema_sq_norm: Tensor, grad_sq_norm: Tensor, threshold: float | Tensor
) -> Tensor:
    """The authors' partial projection ("cos clip"), elementwise over segments.

    With ``cos = dot / (||g|| ||m||)``: where ``cos >= threshold`` (and ``dot < 0``) this
    is the full projection of :func:`conflict_coefficients`; where ``cos < threshold``
    only the part of the conflict beyond the threshold is removed,
    ``c = threshold * ||g|| / ||m||``, which leaves ``<g - c m, m> = ||g|| ||m||
    (cos - threshold) < 0``. In one expression:
    ``c = min(0, max(dot, threshold * ||g|| * ||m||)) / ||m||^2``. ``threshold = -1``
    is the paper's rule, ``threshold = 0`` never projects; the authors use ``-0.5``.
    """
    positive = ema_sq_norm > 0
    safe = torch.where(positive, ema_sq_norm, torch.ones_like(ema_sq_norm))
    floor = (
        torch.as_tensor(threshold, dtype=dot.dtype, device=dot.device)
        * (grad_sq_norm.to(dot.dtype) * ema_sq_norm).sqrt()
    )
    clipped = torch.minimum(torch.maximum(dot, floor), torch.zeros_like(dot))
    return torch.where(positive, clipped / safe, torch.zeros_like(dot))
