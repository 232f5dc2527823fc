"""GRU's four passes as one set of operations over lists of tensors, each routed to its
backend: retain norm (:func:`sum_squares`), fold (:func:`fold_`), forget statistics
(:func:`stats`) and projection (:func:`project_`).

``fused=False`` (or a tensor that is not contiguous) runs the foreach implementation;
``fused=True`` groups the tensors by (device, dtype) and runs each group, in one call
per pass, on the compiled backend :func:`~gru_optim.kernels.fused_backend` picks for its
device (C++ on the CPU, Triton on CUDA or under the interpreter). The compiled passes sum
in float64 (exact for every finite float32 input) and read their decisions (``gate``,
``skip``) on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from . import _foreach, _native, _triton
from ._dispatch import Backend, fused_backend
from ._lists import group, one_group, stack_scalars
from ._plan import device_floats

__all__ = ["fold_", "project_", "stats", "sum_squares"]

_COMPILED: dict[Backend, ModuleType] = {Backend.CPU: _native, Backend.TRITON: _triton}


def _compiled(fused: bool, *lists: Sequence[Tensor | None]) -> bool:
    """Whether the compiled passes take these lists (they need contiguous tensors)."""
    return (
        fused
        and len(lists[0]) > 0
        and all(t is None or t.is_contiguous() for ts in lists for t in ts)
    )


def _impl(device: torch.device) -> ModuleType:
    return _COMPILED[fused_backend(device)]


def sum_squares(
    tensors: Sequence[Tensor],
    *,
    fused: bool = False,
    foreach: bool | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``|t|^2`` of every tensor, one 1-D tensor (see :mod:`._foreach` for the foreach
    path's accumulation dtype and ``dtype``; the compiled path sums in float64)."""
    if not _compiled(fused, tensors):
        return _foreach.sum_squares(tensors, foreach=foreach, dtype=dtype)
    vals: list[Tensor | None] = [None] * len(tensors)
    groups = group(tensors)
    for (dev, _, _), idx in groups.items():
        sq = _impl(dev).sum_squares([tensors[i] for i in idx])
        if one_group(groups, len(tensors)):
            return sq  # type: ignore[no-any-return]
        for i, v in zip(idx, sq.unbind()):
            vals[i] = v
    return stack_scalars(vals, tensors[0].device)


def fold_(
    ema: Sequence[Tensor],
    grads: Sequence[Tensor],
    gamma: float,
    *,
    fused: bool = False,
    foreach: bool | None = None,
    gate: Tensor | None = None,
    sq_norms: bool = False,
) -> Tensor | None:
    """``ema[i] <- lerp(ema[i], grads[i], gamma)`` where the 0-dim ``gate`` is true (all
    when ``None``); with ``sq_norms`` also ``|grads[i]|^2`` as :func:`sum_squares` with the
    same flags computes them (the compiled path from the fold's own read)."""
    if not _compiled(fused, ema, grads):
        return _foreach.fold_(ema, grads, gamma, foreach=foreach, gate=gate, sq_norms=sq_norms)
    vals: list[Tensor | None] = [None] * len(grads)
    groups = group(ema, grads)
    for (dev, _, _), idx in groups.items():
        ms = [ema[i] for i in idx]
        gs = [grads[i] for i in idx]
        g = gate if gate is not None else torch.ones((), dtype=torch.bool, device=dev)
        sq = _impl(dev).fold_(
            ms, gs, device_floats([gamma] * len(ms), dev), g.to(dev), sq_norms=sq_norms
        )
        if sq is not None:
            if one_group(groups, len(grads)):
                return sq  # type: ignore[no-any-return]
            for i, v in zip(idx, sq.unbind()):
                vals[i] = v
    return stack_scalars(vals, grads[0].device) if sq_norms else None


def stats(
    tensors: Sequence[Tensor],
    ema: Sequence[Tensor | None],
    *,
    fused: bool = False,
    foreach: bool | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per tensor ``<g, m>``, ``|m|^2`` and ``|g|^2`` (zeros where ``ema[i]`` is ``None``):
    three 1-D tensors of one dtype (float64 on the compiled path, one pass per pair)."""
    if not _compiled(fused, tensors, ema):
        return _foreach.stats(tensors, ema, foreach=foreach, dtype=dtype)
    n = len(tensors)
    out: list[Tensor | None] = [None] * n
    paired = [i for i in range(n) if ema[i] is not None]
    alone = [i for i in range(n) if ema[i] is None]
    groups = group([tensors[i] for i in paired], [ema[i] for i in paired])  # type: ignore[misc]
    for (dev, _, _), idx in groups.items():
        rows = _impl(dev).stats([tensors[paired[j]] for j in idx], [ema[paired[j]] for j in idx])
        if not alone and one_group(groups, n):
            return rows[:, 0], rows[:, 2], rows[:, 1]
        for j, row in zip(idx, rows.unbind()):
            out[paired[j]] = row
    for (dev, _, _), idx in group([tensors[i] for i in alone]).items():
        sq = _impl(dev).sum_squares([tensors[alone[j]] for j in idx])
        for j, v in zip(idx, sq.unbind()):
            out[alone[j]] = torch.stack([v.new_zeros(()), v, v.new_zeros(())])
    rows = torch.stack(out)  # type: ignore[arg-type]
    return rows[:, 0], rows[:, 2], rows[:, 1]


def project_(
    tensors: Sequence[Tensor],
    ema: Sequence[Tensor],
    coefs: Tensor,
    *,
    fused: bool = False,
    foreach: bool | None = None,
    skip: Tensor | None = None,
) -> None:
    """``tensors[i] <- tensors[i] - coefs[i] * ema[i]`` unless the 0-dim ``skip`` is true
    (read on the device by the compiled path, on the host by foreach)."""
    if not _compiled(fused, tensors, ema):
        _foreach.project_(tensors, ema, coefs, foreach=foreach, skip=skip)
        return
    for (dev, _, _), idx in group(tensors, ema).items():
        sk = skip if skip is not None else torch.zeros((), dtype=torch.bool, device=dev)
        _impl(dev).project_(
            [tensors[i] for i in idx],
            [ema[i] for i in idx],
            coefs.to(dev)
            if len(idx) == len(tensors)
            else torch.stack([coefs[i] for i in idx]).to(dev),
            sk.to(dev),
        )
