"""The reduction boundary: local shards and the one packed all-reduce of a step.

GRU's sums (dot products, squared norms) are computed on whatever each process holds:
the whole tensor for plain parameters and DDP replicas (whose gradients DDP already
averaged), the local shard for FSDP2's sharded DTensors. For shards every sum is a
partial sum; :meth:`Reducer.sum_` adds them across the processes with one collective on
one packed tensor. Nothing else in GRU calls ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Reducer", "local"]


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, the tensor itself otherwise (shares storage).

    A complex tensor comes back as its real view (``torch.view_as_real``, shares storage):
    every pass of GRU (dot products, norms, the fold, the correction; foreach, compiled
    C++ and Triton alike) then works on real floating tensors, and ``<g, m>`` is the real
    inner product ``Re<g, m>`` of the complex vectors, as torch's optimizers treat
    complex parameters.
    """
    to_local = getattr(t, "to_local", None)
    t = to_local() if to_local is not None else t
    return torch.view_as_real(t) if t.is_complex() else t


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


class Reducer:
    """Sums packed partial sums across the processes that shard the parameters."""

    def __init__(self, group: Any = None) -> None:
        self.group = group

    @classmethod
    def for_params(cls, params: Sequence[Tensor]) -> Reducer:
        """The reducer for ``params``: over the mesh of their sharded DTensors, or none.

        Raises ``NotImplementedError`` for layouts GRU does not support (replicated
        DTensors, several meshes, meshes of more than one dimension).
        """
        group = None
        for p in params:
            if not _is_dtensor(p):
                continue
            from torch.distributed.tensor import Shard

            placements = p.placements  # type: ignore[attr-defined]
            if not any(isinstance(pl, Shard) for pl in placements):
                raise NotImplementedError(
                    "GRUOptimizer supports DTensor parameters sharded on one mesh "
                    f"dimension (FSDP2); got placements {placements}"
                )
            mesh = p.device_mesh  # type: ignore[attr-defined]
            if mesh.ndim != 1:
                raise NotImplementedError("GRUOptimizer supports 1-D device meshes (FSDP2)")
            g = mesh.get_group()
            if group is not None and g is not group:
                raise NotImplementedError("all sharded parameters must share one device mesh")
            group = g
        return cls(group)

    @property
    def sharded(self) -> bool:
        """Whether sums are partial and need :meth:`sum_`."""
        return self.group is not None

    def sum_(self, packed: Tensor) -> None:
        """Add ``packed`` across the processes, in place (nothing when not sharded)."""
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(packed, group=self.group)

    @property
    def fn(self) -> Callable[[Tensor], None] | None:
        """:meth:`sum_` as the ``all_reduce`` argument of the functional core."""
        return self.sum_ if self.group is not None else None
