"""Per-tensor operations: squared norms, dot products, the fold, the projection, clipping.

Each validates its arguments and hands the lists to :mod:`gru_optim.kernels`, which runs
the pass on the backend chosen there (``fused=True``: the compiled passes where the
tensors allow; otherwise torch's foreach operations).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import kernels as K

__all__ = [
    "clip_coefficient",
    "ema_update_",
    "project_",
    "sum_sq",
    "tensor_dots",
    "tensor_sq_norms",
    "total_norm",
]


def ema_update_(
    ema: Sequence[Tensor],
    grads: Sequence[Tensor],
    gamma: float,
    *,
    foreach: bool | None = None,
    fused: bool = False,
    gate: Tensor | None = None,
    sq_norms: bool = False,
) -> Tensor | None:
    """Fold ``grads`` into the retain memory in place.

    Promises ``ema[i] <- gamma * grads[i] + (1 - gamma) * ema[i]`` for every ``i``, in the
    dtype of ``ema[i]`` (the gradients may have another dtype). ``gamma`` weighs the new
    gradient, as in the authors' code; ``gamma = 1`` copies the gradient exactly.

    ``gate`` (a 0-dim tensor): fold only if it is true. The fused path (``fused=True``,
    Triton) reads it on the device; the others read it on the host (one synchronisation).

    ``sq_norms``: also return ``|grads[i]|^2`` for every ``i`` (whatever the gate says), as
    :func:`tensor_sq_norms` with the same ``foreach``/``fused`` computes them; the fused
    path takes them from the fold's own read of the gradients (no second pass). Returns
    ``None`` otherwise.
    """
    if len(ema) != len(grads):
        raise ValueError(f"ema_update_: {len(ema)} buffers but {len(grads)} gradients")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if not grads:
        return torch.zeros(0) if sq_norms else None
    return K.fold_(ema, grads, gamma, fused=fused, foreach=foreach, gate=gate, sq_norms=sq_norms)


def tensor_sq_norms(
    tensors: Sequence[Tensor],
    *,
    foreach: bool | None = None,
    dtype: torch.dtype | None = None,
    fused: bool = False,
) -> Tensor:
    """Squared L2 norm of every tensor, as one 1-D tensor of length ``len(tensors)``.

    Accumulated in float32 (float64 for float64 inputs, or in ``dtype`` when given) on the
    device of the first tensor; the fused path accumulates in float64.
    """
    if len(tensors) == 0:
        return torch.zeros(0)
    return K.sum_squares(tensors, fused=fused, foreach=foreach, dtype=dtype)


def tensor_dots(
    a: Sequence[Tensor], b: Sequence[Tensor], *, dtype: torch.dtype | None = None
) -> Tensor:
    """``<a[i], b[i]>`` for every ``i``, as one 1-D tensor, accumulated in float32 or wider
    (``dtype`` when given).

    Tensors of one pair may differ in dtype; the narrower one is widened for that pair
    only (a transient the size of one tensor).
    """
    if len(a) != len(b):
        raise ValueError(f"tensor_dots: {len(a)} tensors against {len(b)}")
    if len(a) == 0:
        return torch.zeros(0)
    return K.tensor_dots(a, b, dtype=dtype)


def sum_sq(
    tensors: Sequence[Tensor],
    *,
    all_reduce: Callable[[Tensor], None] | None = None,
    foreach: bool | None = None,
    fused: bool = False,
) -> Tensor:
    """``sum ||t||^2`` over ``tensors`` as a 0-dim tensor (summed across processes with
    ``all_reduce``). Infinite only if an element is not finite, or, off the CPU, if the
    float32 sum overflows: on the CPU an overflowing float32 sum is recomputed in
    float64 (the fused path always accumulates in float64)."""
    if len(tensors) == 0:
        return torch.zeros(())
    # The retain norm's own lean form of the recipe of :func:`._sums.segment_sums` (one
    # segment, no range flags to return): it runs on every step's retain side.

    def total(dtype: torch.dtype | None) -> Tensor:
        t = tensor_sq_norms(tensors, foreach=foreach, dtype=dtype, fused=fused).sum().reshape(1)
        if all_reduce is not None:
            all_reduce(t)
        return t[0]

    out = total(None)
    if out.dtype == torch.float32 and out.device.type == "cpu" and not bool(torch.isfinite(out)):
        out = total(torch.float64)
    return out


def clip_coefficient(norm: Tensor, max_norm: float) -> Tensor:
    """The factor that clips a gradient of norm ``norm`` to ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` computes it: ``min(1, max_norm / (norm + 1e-6))``."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def total_norm(
    tensors: Sequence[Tensor],
    *,
    all_reduce: Callable[[Tensor], None] | None = None,
    foreach: bool | None = None,
) -> Tensor:
    """The L2 norm of all ``tensors`` together, as a 0-dim tensor (float32 or wider).

    Without ``all_reduce`` it is computed as ``torch.nn.utils.clip_grad_norm_`` does (the
    norm of the per-tensor norms); with it the squared norms of the local shards are
    summed across processes first.
    """
    if len(tensors) == 0:
        return torch.zeros(())
    sq = tensor_sq_norms(tensors, foreach=foreach)
    if all_reduce is not None:
        total = sq.sum().reshape(1)
        all_reduce(total)
        return total[0].sqrt()
    out: Tensor = torch.linalg.vector_norm(sq.sqrt())
    return out


def project_(
    tensors: Sequence[Tensor],
    ema: Sequence[Tensor],
    coefs: Tensor,
    *,
    foreach: bool | None = None,
    fused: bool = False,
    skip: Tensor | None = None,
) -> None:
    """In place: ``tensors[i] <- tensors[i] - coefs[i] * ema[i]``.

    ``coefs`` is a 1-D tensor with one coefficient per tensor. On accelerators the
    coefficients stay on the device (no host synchronisation); on the CPU, where reading
    a scalar costs nothing, tensors whose coefficient is zero are left untouched.
    ``skip`` (a 0-dim tensor): change nothing if it is true (read on the device by the
    fused path, on the host by the others).
    """
    if len(tensors) != len(ema) or coefs.shape[0] != len(tensors):
        raise ValueError("project_: tensors, ema and coefs must have the same length")
    if len(tensors) == 0:
        return
    K.project_(tensors, ema, coefs, fused=fused, foreach=foreach, skip=skip)
