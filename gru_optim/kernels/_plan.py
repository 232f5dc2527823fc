"""The tables a compiled pass reads, shared by the C++ and the Triton kernels.

A pass over a list of tensors (one list per *role*: the gradients, the memories) is one
call: the kernel reads a table of data pointers per role and a table of sizes, and, for
the block-launched Triton kernels, a map from each program (a block of ``block``
elements) to its tensor and offset. :func:`plan` builds these tables once per layout:
in steady training the allocator hands the gradients the same addresses every step, so
a step looks them up instead of rebuilding them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Plan", "device_floats", "plan"]

_CACHE = 64


class Plan:
    """The device tables of one list of tensors per role: ``ptrs`` (one int64 table of
    data pointers per role), ``sizes`` and ``n``; with a ``block``, also the block map
    (``tids``/``starts``: each block's tensor and first element; ``first``/``count``:
    each tensor's first block and number of blocks; ``n_blocks``)."""

    def __init__(
        self, roles: Sequence[Sequence[Tensor]], device: torch.device, block: int | None
    ) -> None:
        sizes = [t.numel() for t in roles[0]]

        def table(values: list[int]) -> Tensor:
            t = torch.tensor(values, dtype=torch.int64)
            if device.type == "cpu":
                return t
            return t.pin_memory().to(device, non_blocking=True)

        self.n = len(sizes)
        self.ptrs = [table([x.data_ptr() for x in role]) for role in roles]
        self.sizes = table(sizes)
        self.block = block or 0
        if block is None:
            return
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
        self.n_blocks = len(tids)
        self.tids = table(tids)
        self.starts = table(starts)
        self.first = table(first)
        self.count = table(count)


_PLANS: OrderedDict[Any, Plan] = OrderedDict()


def plan(
    roles: Sequence[Sequence[Tensor]],
    *,
    block: int | None = None,
    accept: Callable[[Tensor], None] | None = None,
) -> Plan:
    """The tables of ``roles`` (lists of equal length; tensors of one index have equal
    sizes), cached by the tensors' addresses and sizes. On a miss every tensor is
    checked: contiguous, equal sizes across roles, and ``accept(tensor)`` (which raises
    for what a backend cannot take)."""
    key = (
        block,
        roles[0][0].device,
        tuple((tuple(map(Tensor.data_ptr, r)), tuple(map(Tensor.numel, r))) for r in roles),
    )
    p = _PLANS.get(key)
    if p is None:
        for role in roles:
            for x in role:
                if accept is not None:
                    accept(x)
                if not x.is_contiguous():
                    raise ValueError("the fused kernels need contiguous tensors")
        for role in roles[1:]:
            if [x.numel() for x in role] != [x.numel() for x in roles[0]]:
                raise ValueError("the fused kernels need tensors of equal sizes in each pair")
        p = _PLANS[key] = Plan(roles, roles[0][0].device, block)
        if len(_PLANS) > _CACHE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return p


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
        if len(_FLOATS) > _CACHE:
            _FLOATS.popitem(last=False)
    return t
