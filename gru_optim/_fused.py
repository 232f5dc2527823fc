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

On CPU tensors the same four passes run as C++ (:mod:`gru_optim._native`, built on first
use with the system compiler), unless Triton's interpreter is asked for.

Decisions never leave the device: the fold reads a 0-dim ``gate`` (fold only when it is
true) and the projection a 0-dim ``skip`` flag, both written by earlier kernels or torch
ops. Triton is imported only when a fused pass runs. With ``TRITON_INTERPRET=1`` (set
before Triton is imported) CPU tensors run the Triton kernels under Triton's interpreter:
that is how they are tested without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _native

__all__ = [
    "fold_",
    "fused_available",
    "fused_reason",
    "interpreting",
    "project_",
    "device_floats",
    "stats",
    "sum_squares",
]

_BLOCK_GPU = 4096
_BLOCK_CPU = 1 << 16  # the interpreter runs one NumPy program per block: fewer, larger


def interpreting() -> bool:
    """Whether Triton's interpreter is asked for (Triton's own reading of the flag, its
    ``knobs.env_bool``): then CPU tensors run the Triton kernels, else the C++ ones."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


def _native_cpu(t: Tensor) -> bool:
    """Whether a pass over CPU tensors runs the C++ kernels (:mod:`gru_optim._native`)."""
    return t.device.type == "cpu" and not interpreting()


def fused_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (``None``: they can): what
    ``fused=True`` needs."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'gru-optim[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        return (
            "fused=True on CPU tensors runs Triton's interpreter, which needs "
            "TRITON_INTERPRET=1 in the environment before Triton is imported"
        )
    return f"no fused kernels for {device.type} tensors"


def fused_available(device: torch.device) -> bool:
    return fused_reason(device) is None


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


class _Plan:
    """The device tables of one list of tensors: pointers per role, sizes, and the
    block -> (tensor, offset) map."""

    def __init__(self, roles: Sequence[Sequence[Tensor]], device: torch.device) -> None:
        block = _BLOCK_CPU if device.type == "cpu" else _BLOCK_GPU
        sizes = [t.numel() for t in roles[0]]
        tids: list[int] = []
        starts: list[int] = []
        first: list[int] = []
        count: list[int] = []
        for i, n in enumerate(sizes):
            first.append(len(tids))
            nb = max(1, -(-n // block))
            count.append(nb)
            tids.extend([i] * nb)
            starts.extend(range(0, nb * block, block))
        self.block = block
        self.n_blocks = len(tids)
        self.n_tensors = len(sizes)

        def table(values: list[int]) -> Tensor:
            t = torch.tensor(values, dtype=torch.int64)
            if device.type == "cpu":
                return t
            return t.pin_memory().to(device, non_blocking=True)

        self.ptrs = [table([x.data_ptr() for x in role]) for role in roles]
        self.sizes = table(sizes)
        self.tids = table(tids)
        self.starts = table(starts)
        self.first = table(first)
        self.count = table(count)


_PLANS: OrderedDict[Any, _Plan] = OrderedDict()


def _plan(roles: Sequence[Sequence[Tensor]]) -> _Plan:
    """Cached by the tensors' addresses: in steady training the allocator hands the
    gradients the same addresses every step, so the tables are built once."""
    device = roles[0][0].device
    key = (device, tuple(tuple((x.data_ptr(), x.numel()) for x in role) for role in roles))
    plan = _PLANS.get(key)
    if plan is None:
        for role in roles:
            for x in role:
                if not x.is_contiguous():
                    raise ValueError("the fused kernels need contiguous tensors")
        plan = _PLANS[key] = _Plan(roles, device)
        if len(_PLANS) > 64:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def _compute(k: Any, *groups: Sequence[Tensor]) -> Any:
    """The arithmetic dtype of an elementwise pass: float64 if a tensor is, else float32."""
    wide = any(g[0].dtype == torch.float64 for g in groups)
    return k["dtype"][torch.float64 if wide else torch.float32]


def _reduce(plan: _Plan, partials: Tensor, ncol: int) -> Tensor:
    k = _kernels()
    out = torch.empty((plan.n_tensors, ncol), dtype=torch.float64, device=partials.device)
    k["reduce"][(plan.n_tensors,)](partials, plan.first, plan.count, out, NCOL=ncol, CHUNK=256)
    return out


def sum_squares(tensors: Sequence[Tensor]) -> Tensor:
    """``|t|^2`` of every tensor (one group: same device and dtype), float64."""
    if _native_cpu(tensors[0]):
        return _native.sum_squares(tensors)
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
    if _native_cpu(grads[0]):
        return _native.stats(grads, ema)
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


_FLOATS: OrderedDict[Any, Tensor] = OrderedDict()


def device_floats(values: Sequence[float], device: torch.device) -> Tensor:
    """``values`` as a float64 tensor on ``device``, made once per distinct values (an
    asynchronous copy from pinned memory: no host synchronisation)."""
    key = (device, tuple(values))
    t = _FLOATS.get(key)
    if t is None:
        host = torch.tensor(list(values), dtype=torch.float64)
        t = host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)
        _FLOATS[key] = t
        if len(_FLOATS) > 64:
            _FLOATS.popitem(last=False)
    return t


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
    if _native_cpu(grads[0]):
        return _native.fold_(ema, grads, gammas, gate, sq_norms=sq_norms)
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
    if _native_cpu(grads[0]):
        _native.project_(grads, ema, coefs, skip)
        return
    _elementwise("project", grads, ema, coefs.contiguous(), skip.to(torch.int32))
