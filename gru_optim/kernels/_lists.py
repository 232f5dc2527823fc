"""Helpers over lists of tensors shared by every backend: grouping by (device, dtype),
stacking per-tensor scalars, the accumulation dtype."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Key", "compute_dtype", "default_foreach", "group", "one_group", "stack_scalars"]

Key = tuple[torch.device, torch.dtype, torch.dtype]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def group(a: Sequence[Tensor], b: Sequence[Tensor] | None = None) -> dict[Key, list[int]]:
    """Indices of ``a`` grouped by (device, dtype of a[i], dtype of b[i])."""
    groups: dict[Key, list[int]] = {}
    for i, t in enumerate(a):
        key = (t.device, t.dtype, b[i].dtype if b is not None else t.dtype)
        groups.setdefault(key, []).append(i)
    return groups


def one_group(groups: dict[Key, list[int]], n: int) -> bool:
    """Whether ``groups`` is a single group holding indices ``0 .. n-1`` in order: then a
    group's result vector is already the result, with no per-tensor work."""
    return len(groups) == 1 and next(iter(groups.values())) == list(range(n))


def stack_scalars(values: Sequence[Tensor | None], device: torch.device) -> Tensor:
    """Stack 0-dim tensors into one vector on ``device`` (promoting to the widest dtype)."""
    vals = [v for v in values if v is not None]
    assert len(vals) == len(values)
    dtype = compute_dtype(*(v.dtype for v in vals))
    return torch.stack([v.to(device=device, dtype=dtype) for v in vals])


def default_foreach(tensors: Sequence[Tensor]) -> bool:
    """The multi-tensor path unless a tensor is a subclass that foreach kernels reject."""
    return all(type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter) for t in tensors)
