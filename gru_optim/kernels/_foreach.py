"""The four passes with torch's own operations: the multi-tensor ``torch._foreach_*``
kernels (or one op per tensor for tensor subclasses they reject).

Any device, any layout, any rule; sums accumulate in float32 (float64 when an input is
float64, or in ``dtype`` when given), whatever the dtype of the gradients. Decisions
(``gate``, ``skip``) are read on the host: one synchronisation each on an accelerator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._lists import compute_dtype, default_foreach, group, stack_scalars

__all__ = ["fold_", "project_", "stats", "sum_squares", "tensor_dots"]

_SUBNORMAL32 = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23


def sum_squares(
    tensors: Sequence[Tensor], *, foreach: bool | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """``|t|^2`` of every tensor as one 1-D tensor on the device of the first, accumulated
    in float32 (float64 for float64 inputs, or in ``dtype`` when given)."""
    if len(tensors) == 0:
        return torch.zeros(0)
    out: list[Tensor | None] = [None] * len(tensors)
    use_foreach = default_foreach(tensors) if foreach is None else foreach
    for (_, tdtype, _), idx in group(tensors).items():
        ts = [tensors[i] for i in idx]
        cdtype = dtype or compute_dtype(tdtype)
        if dtype is not None and dtype != tdtype:
            # The careful path: exact float64 squares (a transient copy per tensor).
            norms = [torch.linalg.vector_norm(t.to(dtype)) for t in ts]
        elif use_foreach:
            norms = list(torch._foreach_norm(ts, 2, dtype=cdtype))
        else:
            norms = [torch.linalg.vector_norm(t, dtype=cdtype) for t in ts]
        for i, n in zip(idx, norms):
            out[i] = n
    sq = stack_scalars(out, tensors[0].device).square()
    if sq.dtype == torch.float32 and sq.device.type == "cpu":
        # A non-zero tensor whose squares all underflow (elements below ~1e-23) must not
        # read as zero ("no memory"): the smallest subnormal marks it, and the range check
        # then recomputes in float64. Reading the flag is free on the CPU; on accelerators
        # the fused path sums in float64 and the foreach path documents the limit.
        zero = (sq == 0).tolist()
        if any(zero):
            marks = [
                bool(z and tensors[i].numel() > 0 and bool(tensors[i].ne(0).any()))
                for i, z in enumerate(zero)
            ]
            if any(marks):
                sq = torch.where(torch.tensor(marks), torch.full_like(sq, _SUBNORMAL32), sq)
    return sq


def tensor_dots(
    a: Sequence[Tensor], b: Sequence[Tensor], *, dtype: torch.dtype | None = None
) -> Tensor:
    """``<a[i], b[i]>`` for every ``i`` (one ``torch.dot`` per pair), as one 1-D tensor,
    accumulated in float32 or wider (``dtype`` when given); the narrower tensor of a pair
    is widened for that pair only (a transient the size of one tensor)."""
    out: list[Tensor | None] = []
    for x, y in zip(a, b):
        cdtype = dtype or compute_dtype(x.dtype, y.dtype)
        xf = x.reshape(-1)
        yf = y.reshape(-1)
        if xf.dtype != cdtype:
            xf = xf.to(cdtype)
        if yf.dtype != cdtype:
            yf = yf.to(cdtype)
        out.append(torch.dot(xf, yf))
    return stack_scalars(out, a[0].device)


def stats(
    tensors: Sequence[Tensor],
    ema: Sequence[Tensor | None],
    *,
    foreach: bool | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per tensor ``<g, m>``, ``|m|^2`` and ``|g|^2`` (zeros where ``ema[i]`` is ``None``),
    three 1-D tensors of one dtype."""
    have = [i for i, m in enumerate(ema) if m is not None]
    g_sq = sum_squares(tensors, foreach=foreach, dtype=dtype)
    if not have:
        zeros = torch.zeros_like(g_sq)
        return zeros, zeros, g_sq
    pm: list[Tensor] = [ema[i] for i in have]  # type: ignore[misc]
    d = tensor_dots([tensors[i] for i in have], pm, dtype=dtype)
    s = sum_squares(pm, foreach=foreach, dtype=dtype)
    cdtype = compute_dtype(g_sq.dtype, d.dtype, s.dtype)
    g_sq, d, s = g_sq.to(cdtype), d.to(cdtype), s.to(cdtype)
    if len(have) == len(tensors):
        return d, s, g_sq
    zero = g_sq.new_zeros(())
    dl: list[Tensor] = [zero] * len(tensors)
    sl: list[Tensor] = [zero] * len(tensors)
    for j, i in enumerate(have):
        dl[i], sl[i] = d[j], s[j]
    return torch.stack(dl), torch.stack(sl), g_sq


def fold_(
    ema: Sequence[Tensor],
    grads: Sequence[Tensor],
    gamma: float,
    *,
    foreach: bool | None = None,
    gate: Tensor | None = None,
    sq_norms: bool = False,
) -> Tensor | None:
    """``ema[i] <- lerp(ema[i], grads[i], gamma)`` (a copy for ``gamma = 1``) unless the
    0-dim ``gate`` is false (read on the host); with ``sq_norms`` also returns
    :func:`sum_squares` of the gradients, whatever the gate says."""
    norms = sum_squares(grads, foreach=foreach) if sq_norms else None
    if gate is not None and not bool(gate):
        return norms
    use_foreach = default_foreach(ema) if foreach is None else foreach
    for (_, m_dtype, g_dtype), idx in group(ema, grads).items():
        ms = [ema[i] for i in idx]
        gs = [grads[i] for i in idx]
        same = m_dtype == g_dtype
        if gamma == 1.0:
            if use_foreach:
                torch._foreach_copy_(ms, gs)
            else:
                for m, g in zip(ms, gs):
                    m.copy_(g)
        elif use_foreach:
            if same:
                torch._foreach_lerp_(ms, gs, gamma)
            else:
                torch._foreach_mul_(ms, 1.0 - gamma)
                torch._foreach_add_(ms, gs, alpha=gamma)
        else:
            for m, g in zip(ms, gs):
                if same:
                    m.lerp_(g, gamma)
                else:
                    m.mul_(1.0 - gamma).add_(g, alpha=gamma)
    return norms


def project_(
    tensors: Sequence[Tensor],
    ema: Sequence[Tensor],
    coefs: Tensor,
    *,
    foreach: bool | None = None,
    skip: Tensor | None = None,
) -> None:
    """``tensors[i] <- tensors[i] - coefs[i] * ema[i]`` unless the 0-dim ``skip`` is true
    (read on the host). On the CPU, where reading a scalar costs nothing, tensors whose
    coefficient is zero are left untouched; elsewhere the coefficients stay on the device."""
    if skip is not None and bool(skip):
        return
    if coefs.device.type == "cpu":
        host = coefs.tolist()
        use_foreach = default_foreach(tensors) if foreach is None else foreach
        if use_foreach and all(c == host[0] for c in host):
            if host[0] != 0.0:
                for _, idx in group(tensors, ema).items():
                    torch._foreach_add_(
                        [tensors[i] for i in idx], [ema[i] for i in idx], alpha=-host[0]
                    )
            return
        for t, m, c in zip(tensors, ema, host):
            if c != 0.0:
                t.add_(m, alpha=-c)
        return
    by_device: dict[torch.device, Tensor] = {}
    for t, m, i in zip(tensors, ema, range(len(tensors))):
        c = by_device.get(t.device)
        if c is None:
            c = by_device[t.device] = coefs.to(t.device, non_blocking=True)
        t.addcmul_(m, c[i], value=-1)
