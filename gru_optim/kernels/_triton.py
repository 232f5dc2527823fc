"""Fused multi-tensor Triton kernels: GRU's passes at the memory-traffic floor.

Each pass runs over every tensor of one (device, dtype) group in one launch: the kernel
reads a table of data pointers and sizes, and a table that maps each program (a block of
``BLOCK`` elements) to its tensor and offset, so the number of launches per pass does not
grow with the number of tensors. The passes and the bytes they move per element
(``G``/``M``: bytes of a gradient / memory element, 4 for float32, 2 for bfloat16):

==========================  ===============================  ==================  =========
pass                        computes                         moves               fp32/fp32
==========================  ===============================  ==================  =========
retain norm                 ``sum g_r^2``                    ``G``                      4
fold                        ``m <- gamma g_r + (1-gamma) m`` ``G + 2M``                12
forget stats                ``<g, m>``, ``|g|^2``, ``|m|^2`` ``G + M``                  8
projection                  ``g <- g - c m``                 ``2G + M``                12
==========================  ===============================  ==================  =========

36 B per float32 parameter in all, 28 B with bfloat16 gradients and a float32 memory (the
retain norm is what lets the fold be skipped on the device: without it the fold could
not be undone). Sums accumulate in float64 inside each block and across blocks, in a
fixed order: the result is exact for every finite float32 input and deterministic.

On CPU tensors the same four passes run as C++ (:mod:`gru_optim.kernels._native`) unless
Triton's interpreter is asked for: :mod:`gru_optim.kernels._dispatch` chooses.

Decisions never leave the device: the fold reads a 0-dim ``gate`` (fold only when it is
true) and the projection a 0-dim ``skip`` flag, both written by earlier kernels or torch
ops. Triton is imported only when a fused pass runs. With ``TRITON_INTERPRET=1`` (set
before Triton is imported) CPU tensors run the Triton kernels under Triton's interpreter:
that is how they are tested without a GPU. The tables the kernels read come from
:func:`gru_optim.kernels._plan.plan`, shared with the C++ passes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._plan import Plan, plan

__all__ = ["fold_", "project_", "stats", "sum_squares"]

_BLOCK_GPU = 4096
_BLOCK_CPU = 1 << 16  # the interpreter runs one NumPy program per block: fewer, larger


@functools.cache
def _kernels() -> Any:
    from . import _triton_kernels as k

    return {
        "sumsq": k.sumsq,
        "fold": k.fold,
        "stats": k.stats,
        "project": k.project,
        "reduce": k.reduce,
        "dtype": k.DTYPES,
    }


def _plan(roles: Sequence[Sequence[Tensor]]) -> Plan:
    device = roles[0][0].device
    return plan(roles, block=_BLOCK_CPU if device.type == "cpu" else _BLOCK_GPU)


def _compute(k: Any, *groups: Sequence[Tensor]) -> Any:
    """The arithmetic dtype of an elementwise pass: float64 if a tensor is, else float32."""
    wide = any(g[0].dtype == torch.float64 for g in groups)
    return k["dtype"][torch.float64 if wide else torch.float32]


def _reduce(plan: Plan, partials: Tensor, ncol: int) -> Tensor:
    k = _kernels()
    out = torch.empty((plan.n, ncol), dtype=torch.float64, device=partials.device)
    k["reduce"][(plan.n,)](partials, plan.first, plan.count, out, NCOL=ncol, CHUNK=256)
    return out


def sum_squares(tensors: Sequence[Tensor]) -> Tensor:
    """``|t|^2`` of every tensor (one group: same device and dtype), float64."""
    k = _kernels()
    plan = _plan([tensors])
    part = torch.empty(plan.n_blocks, dtype=torch.float64, device=tensors[0].device)
    k["sumsq"][(plan.n_blocks,)](
        plan.ptrs[0],
        plan.sizes,
        plan.tids,
        plan.starts,
        part,
        X=k["dtype"][tensors[0].dtype],
        BLOCK=plan.block,
    )
    return _reduce(plan, part, 1)[:, 0]


def stats(grads: Sequence[Tensor], ema: Sequence[Tensor]) -> Tensor:
    """``(n, 3)`` float64: ``<g, m>``, ``|g|^2``, ``|m|^2`` per tensor pair, one pass."""
    k = _kernels()
    plan = _plan([grads, ema])
    part = torch.empty((plan.n_blocks, 3), dtype=torch.float64, device=grads[0].device)
    k["stats"][(plan.n_blocks,)](
        plan.ptrs[0],
        plan.ptrs[1],
        plan.sizes,
        plan.tids,
        plan.starts,
        part,
        G=k["dtype"][grads[0].dtype],
        M=k["dtype"][ema[0].dtype],
        BLOCK=plan.block,
    )
    return _reduce(plan, part, 3)


def _elementwise(
    name: str, grads: Sequence[Tensor], ema: Sequence[Tensor], *args: Tensor, **flags: Any
) -> None:
    """Launch the pairwise elementwise kernel ``name`` over (gradient, memory) pairs."""
    k = _kernels()
    plan = _plan([grads, ema])
    k[name][(plan.n_blocks,)](
        plan.ptrs[0],
        plan.ptrs[1],
        plan.sizes,
        plan.tids,
        plan.starts,
        *args,
        G=k["dtype"][grads[0].dtype],
        M=k["dtype"][ema[0].dtype],
        C=_compute(k, grads, ema),
        BLOCK=plan.block,
        **flags,
    )


def fold_(
    ema: Sequence[Tensor],
    grads: Sequence[Tensor],
    gammas: Tensor,
    gate: Tensor,
    *,
    sq_norms: bool = False,
) -> Tensor | None:
    """``m <- lerp(m, g, gamma_i)`` for every pair where the 0-dim ``gate`` is true.

    With ``sq_norms``: also ``|g_i|^2`` of every gradient (float64, as :func:`sum_squares`
    computes it) from the fold's own read of the gradients, whatever the gate says; the
    retain side then needs no separate norm pass."""
    gammas = gammas.contiguous()
    plan = _plan([grads, ema])
    # Without the norms the kernel never touches ``out``: any device pointer will do.
    part = (
        torch.empty(plan.n_blocks, dtype=torch.float64, device=grads[0].device)
        if sq_norms
        else gammas
    )
    _elementwise("fold", grads, ema, gammas, gate.to(torch.int32), part, SUMSQ=sq_norms)
    return _reduce(plan, part, 1)[:, 0] if sq_norms else None


def project_(grads: Sequence[Tensor], ema: Sequence[Tensor], coefs: Tensor, skip: Tensor) -> None:
    """``g_i <- g_i - coefs_i m_i`` unless the 0-dim ``skip`` is true.

    ``coefs`` may be any 1-D view (an expanded global coefficient has stride 0): the kernel
    reads a dense table, so it is made contiguous here."""
    _elementwise("project", grads, ema, coefs.contiguous(), skip.to(torch.int32))
