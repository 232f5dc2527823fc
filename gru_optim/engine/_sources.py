"""Gradient sources: where a driver's gradients live, and how its step is taken.

The engine's forget side works on a :class:`~gru_optim.engine._partition.Layout` (the
members, their local gradient vectors, directions, segments and reducer) and hands the
rectified gradients to a :class:`GradientSource` to step on. Two drivers, two sources:

- :class:`ParamSource`: the ``.grad`` of a torch optimizer's parameters (local shards of
  FSDP2's DTensors), stepped by the inner optimizer (``GRUOptimizer``);
- :class:`FragmentSource`: one flat fragment per member (this process's part of the
  flattened parameter), for a driver that keeps its own gradients; the ZeRO stage
  adapters of :mod:`gru_optim.integrations.deepspeed` (DeepSpeed's reduced gradient
  partitions, stepped by ``engine.step()``) are its subclasses.

A new driver is one more source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._inner import not_ready, step_inner
from ._reduce import Reducer, local

__all__ = ["FragmentSource", "GradientSource", "ParamSource"]


class GradientSource(Protocol):
    """What the forget side needs from a driver once the gradients are rectified."""

    def step(self, skip: Tensor | None) -> None:
        """Step on the rectified gradients; ``skip``: a device flag that, when true, makes
        the step change nothing (``None``: step)."""

    def skipped(self) -> None:
        """The step was skipped by a host decision (the gradients were left as they are)."""


def _has_state(inner: Optimizer) -> bool:
    """Whether every parameter about to be stepped already has its state in ``inner``
    (a dictionary lookup per parameter, no tensor read)."""
    state = inner.state
    return all(
        p in state and len(state[p]) > 0
        for g in inner.param_groups
        for p in g["params"]
        if p.grad is not None
    )


class ParamSource:
    """The parameters of a torch optimizer, their ``.grad``, and its step.

    ``device_skip``: the inner optimizer takes a skip flag on the device (torch's fused
    optimizers read ``found_inf`` as ``GradScaler`` hands it to them)."""

    def __init__(self, inner: Optimizer, *, device_skip: bool = False) -> None:
        self.inner = inner
        self.device_skip = device_skip
        self._buffers: dict[Any, Tensor] = {}

    @property
    def groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def params(self) -> list[Tensor]:
        """Every parameter once, in group order."""
        seen: set[int] = set()
        out = []
        for group in self.inner.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def trainable(self) -> list[Tensor]:
        """The parameters GRU acts on: a frozen one (``requires_grad=False``) never gets
        a gradient from GRU and never enters a fold or a dot product."""
        return [p for p in self.params() if p.requires_grad]

    def group_index(self) -> dict[int, int]:
        """``id(p)`` -> index of the first group holding ``p``."""
        out: dict[int, int] = {}
        for i, group in enumerate(self.inner.param_groups):
            for p in group["params"]:
                out.setdefault(id(p), i)
        return out

    @staticmethod
    def densify(params: list[Tensor]) -> None:
        """Sparse gradients (``nn.Embedding(sparse=True)``) become dense, in place of
        ``.grad``: the memory is dense (it decays every row) and so is the rectified
        gradient ``g - c m``, which the inner optimizer then steps (it must accept dense
        gradients: ``SparseAdam`` is refused when the GRUOptimizer is built). Complex
        gradients are read as real views (``_reduce.local``), which a lazy conjugate (a
        loss using ``p.conj()``) has none of: it is resolved here, in place of ``.grad``,
        so that the rectification written into that view reaches the gradient stepped."""
        for p in params:
            g = p.grad
            if g is not None and g.layout != torch.strided:
                g = p.grad = g.to_dense()
            if g is not None and g.is_conj():
                p.grad = g.resolve_conj()

    def check_ready(self, scaled: bool) -> None:
        """Refuse a GRU step that would fail part-way, before anything changes: one the
        inner optimizer would refuse, or complex parameters under a gradient scaler
        (``scaled``)."""
        reason = not_ready(self.inner)
        if reason is not None:
            raise RuntimeError(reason)
        if scaled and any(p.is_complex() for p in self.trainable()):
            raise RuntimeError(
                "torch's GradScaler does not unscale complex gradients "
                "(_amp_foreach_non_finite_check_and_unscale_ is not implemented for complex "
                "dtypes): train complex parameters without grad_scaler (bf16 autocast or fp32)"
            )

    def clear(self) -> None:
        """Every parameter's gradient to ``None`` (a frozen one's too: a gradient GRU wrote
        before the parameter was frozen would otherwise be stepped again and again)."""
        for p in self.params():
            p.grad = None

    @staticmethod
    def device_of(params: list[Tensor]) -> torch.device:
        """Where the statistics of a step over ``params`` live."""
        for p in params:
            if p.grad is not None:
                return local(p.grad).device
        return local(params[0]).device if params else torch.device("cpu")

    def step_plain(self, closure: Any = None) -> Any:
        """The inner optimizer's step, as a plain loop would take it."""
        return step_inner(self.inner, closure)

    def step(self, skip: Tensor | None) -> None:
        """The inner optimizer's step, unless ``skip`` (a device flag) is true: torch's
        fused optimizers take the flag on the device (as GradScaler hands them
        ``found_inf``); others need one host read."""
        if skip is None:
            step_inner(self.inner)
            return
        inner = self.inner
        if not self.device_skip or not _has_state(inner):
            # torch's fused optimizers create their state (SGD's momentum buffers with
            # empty_like) before they read ``found_inf``: a device skip of a parameter's
            # first step would leave uninitialised state behind, so that step reads the
            # flag on the host.
            if not bool(skip):
                step_inner(inner)
            return
        had = "found_inf" in inner.__dict__
        saved = inner.__dict__.get("found_inf")
        inner.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
        try:
            step_inner(inner)
        finally:
            if had:
                inner.found_inf = saved  # type: ignore[attr-defined]
            else:
                del inner.found_inf  # type: ignore[attr-defined]

    def skipped(self) -> None:
        """Nothing to do: the inner optimizer was not called."""

    def buffers_like(self, tensors: list[Tensor]) -> list[Tensor]:
        """Reusable buffers shaped like ``tensors`` (update space's one extra buffer)."""
        out = []
        for t in tensors:
            key = (t.data_ptr(), t.shape, t.dtype, t.device)
            buf = self._buffers.get(key)
            if buf is None:
                buf = self._buffers[key] = torch.empty_like(t)
            out.append(buf)
        return out


class FragmentSource:
    """A driver's own gradients, one flat fragment per member, and the driver's step.

    ``members``: the trainable parameters (given per group), in the same order on every
    process (the packed sums line up); ``group_of[i]``: member ``i``'s group;
    ``ranges[i]``: ``(start, length)`` of this process's fragment in the flattened
    parameter (empty where it has none); ``numels[i]``: the parameter's full size;
    ``reducer``: the sum over the processes holding the other fragments. A subclass reads
    the fragments (:meth:`_read`), stores them back (:meth:`write`) and steps the driver
    (:meth:`step_driver`)."""

    skips_itself = True
    """Whether the driver's own step skips non-finite gradients (then a skip is handed to
    it as NaN gradients, :meth:`skipped`)."""

    def __init__(self, groups: Sequence[tuple[int, Sequence[Tensor]]]) -> None:
        self.reducer = Reducer(None)
        self.members: list[Tensor] = []
        self.group_of: list[int] = []
        self.present: list[bool] = []
        """``present[i]``: member ``i`` had a gradient at the last :meth:`read`."""
        self.grads: list[Tensor] = []
        self.applied = False
        """Whether the driver applied its last step (:meth:`step_driver`)."""
        seen: set[int] = set()
        for gi, params in groups:
            for p in params:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self.members.append(p)
                    self.group_of.append(gi)
        self.numels = [p.numel() for p in self.members]
        self.ranges = [(0, n) for n in self.numels]

    def read(self, fill: Sequence[bool] | None = None) -> list[Tensor]:
        """This process's fragments, flat, writable in place (kept for :meth:`step`).
        Where a member has no gradient, zeros, attached as its gradient if ``fill[i]``
        (it will take a correction)."""
        self.present = [True] * len(self.members)
        self.grads = self._read(fill)
        return self.grads

    def _read(self, fill: Sequence[bool] | None) -> list[Tensor]:
        raise NotImplementedError

    def write(self, grads: list[Tensor]) -> None:
        """Store ``grads`` (from :meth:`read`, changed in place) where the driver reads them."""

    def clear(self, grads: list[Tensor]) -> None:
        """Zero the gradients so that the next pass starts from nothing."""
        torch._foreach_zero_(grads)
        self.write(grads)

    def discard(self) -> None:
        """Before a retain pass: drop what no pass of this step computed (stale gradients)."""

    def poison(self, grads: list[Tensor]) -> None:
        """Make the driver's overflow check skip this step (NaN everywhere)."""
        for g in grads:
            g.fill_(float("nan"))
        self.write(grads)

    def step(self, skip: Tensor | None) -> None:
        """Store the rectified fragments and step the driver."""
        self.write(self.grads)
        self.step_driver()

    def skipped(self) -> None:
        """Hand the skip to the driver's overflow handling (DeepSpeed lowers its loss
        scale), or, where the driver does not skip itself, drop the gradients."""
        self.poison(self.grads)
        if self.skips_itself:
            self.step_driver()

    def step_driver(self) -> bool:
        """The driver's own step on the stored gradients; whether it was applied (kept in
        :attr:`applied`)."""
        raise NotImplementedError
