"""What a retain pass leaves for the step that consumes it.

Between the retain side (``retain_closure`` or ``retain_pass()``) and ``step()`` GRU
holds a :class:`Pending` record: the retain loss and norm, whether the step must be
skipped, and, when part of the final gradient already sits in ``.grad`` (the
``retain_weight`` multiple of the retain gradient, or a post-rectification pass), that
part's dot products with the memory. The forget backward adds onto that part, and the
rule rectifies only the difference (the dot products are subtracted).

That bookkeeping is only right if nothing but backward passes touches ``.grad`` in the
meantime: a gradient clipped (or otherwise changed in place) before ``step()`` would
change the part GRU accounted for. :class:`GradWatch` notices such a change: it records
each gradient's version counter at the end of every backward pass (after DDP's own
end-of-backward writes) and compares at ``step()``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["GradWatch", "Pending", "RetainPass", "signature"]


def signature(params: list[Tensor]) -> list[tuple[int, int]]:
    """Identity and version counter of each parameter's gradient: changes on backward.

    The version is the local tensor's: FSDP2 accumulates into ``grad._local_tensor`` in
    place, which leaves the DTensor wrapper's own counter unchanged. A complex gradient's
    is read on the tensor itself (its real view shares it), so that a lazy conjugate,
    which has no real view until it is resolved, has one too.
    """
    out = []
    for p in params:
        g = p.grad
        out.append((0, -1) if g is None else (id(g), _shard(g)._version))
    return out


def _shard(t: Tensor) -> Tensor:
    """The local shard of a DTensor, the tensor itself otherwise (no real view)."""
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()


def _detached(loss: Any) -> Tensor | float:
    """A recorded loss: a scalar tensor (detached) or a real number (a float)."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"a retain loss to record must be a scalar, got shape {tuple(loss.shape)}"
            )
        return loss.detach()
    if not isinstance(loss, bool) and isinstance(loss, numbers.Real):
        return float(loss)
    raise TypeError(f"a retain loss to record must be a number, got {type(loss).__name__}")


class RetainPass:
    """Handle yielded by :meth:`GRUOptimizer.retain_pass`."""

    def __init__(self, loss: Tensor | float | None = None) -> None:
        self.loss: Tensor | float | None = None if loss is None else _detached(loss)

    def record(self, loss: Tensor | float) -> None:
        """Add ``loss`` (a scalar tensor, detached, or a number) to the retain loss
        reported in ``last_stats``; call it once per micro-batch to report their sum."""
        value = _detached(loss)
        self.loss = value if self.loss is None else self.loss + value


class GradWatch:
    """Notices in-place changes of ``.grad`` made outside backward passes.

    Works for plain tensors (DDP replicas included). DTensor parameters (FSDP2), whose
    gradients FSDP2 writes outside autograd's accumulation, are not watched.
    """

    def __init__(self, params: list[Tensor]) -> None:
        self._params = [p for p in params if getattr(p, "to_local", None) is None]
        self._versions = self._read()
        # The gradient tensors that hold the kept part: backward accumulates into them in
        # place, so another object there means ``.grad`` was replaced or set to None.
        self._objects = {id(p): p.grad for p in self._params if p.grad is not None}
        self._queued = False
        self._handles = [
            p.register_post_accumulate_grad_hook(self._accumulated)  # type: ignore[no-untyped-call]
            for p in self._params
        ]

    def _read(self) -> dict[int, int | None]:
        return {id(p): None if p.grad is None else p.grad._version for p in self._params}

    def _accumulated(self, p: Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after)

    def _after(self) -> None:
        # Queued again from inside the callbacks: runs after every callback that was
        # queued during the backward pass (DDP's gradient finalisation among them).
        torch.autograd.Variable._execution_engine.queue_callback(self._record)

    def _record(self) -> None:
        self._versions = self._read()
        self._queued = False

    def changed(self, allowed: int = 0) -> list[int]:
        """Indices (into the watched parameters) of gradients changed in place since the
        last backward pass, beyond ``allowed`` extra version bumps, or replaced (another
        tensor, or ``None``, where the kept part was). A change through ``.data`` bumps
        no version counter and is not seen."""
        out = []
        for i, p in enumerate(self._params):
            before = self._versions.get(id(p))
            now = None if p.grad is None else p.grad._version
            if before is not None and now is not None and now - before > allowed:
                out.append(i)
            elif id(p) in self._objects and p.grad is not self._objects[id(p)]:
                out.append(i)
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._objects = {}


@dataclass
class Pending:
    """The record of one retain side, consumed by the next ``step()``."""

    loss: Tensor | float | None
    grad_norm: Tensor
    reason: Tensor
    """0-dim int: why the step must be skipped (0: it need not)."""
    signature: list[tuple[int, int]] = field(default_factory=list)
    offsets: dict[Tensor, Tensor] | None = None
    """Dot products with the memory of the part of ``.grad`` kept from the retain side
    (``None``: nothing is kept)."""
    watch: GradWatch | None = None
    post: bool = False
    """A post-rectification pass has run."""
    extra: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
