"""The engine: one GRU step, composed from its parts.

:class:`Engine` owns the retain memory (:mod:`._memory`), the rule (:mod:`gru_optim.rules`),
the partition (:mod:`._partition`), the AMP boundary (:mod:`._amp`), the space
(:mod:`._spaces`) and the statistics (:mod:`._stats`); the reducer of a step comes with
its layout (:mod:`._reduce`). It performs

- the retain side: :meth:`Engine.fold` folds local retain gradients into the memory and
  leaves the step's :class:`~gru_optim.engine._pending.Pending` record;
- the forget side: :meth:`Engine.rectify` solves the rule over a layout, decides whether
  to skip, applies it, clips, and steps the gradient source;
- the statistics: :meth:`Engine.record`.

Both drivers call these. For a torch optimizer's parameters (``.grad``, a
:class:`~gru_optim.engine._sources.ParamSource`) the engine also runs the whole step:
:meth:`Engine.run` (``GRUOptimizer.step``), :meth:`Engine.retain_pass` and
:meth:`Engine.post_pass`, in :mod:`._param_sides`. ``GRUDeepSpeed`` adapts DeepSpeed's
partitions to :meth:`Engine.fold` and :meth:`Engine.rectify`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..functional import clip_coefficient, sum_sq, total_norm
from ..rules import Rule
from ._amp import AmpBoundary
from ._memory import RetainMemory
from ._partition import PARTITIONS, Layout
from ._pending import Pending
from ._reduce import Reducer
from ._sources import GradientSource
from ._spaces import SPACES, Result
from ._stats import SkipReason, plain_stats, reason_of, step_stats

__all__ = ["Closure", "Engine", "check_closures", "check_loss"]

Closure = Callable[[], Any]


def check_loss(loss: Any, what: str) -> Any:
    """A closure returns its scalar loss (or nothing); a loss given (``what`` ends in
    ``loss``) is one."""
    if loss is None or (not isinstance(loss, bool) and isinstance(loss, numbers.Real)):
        return loss
    got = f"the {what} is" if what.endswith("loss") else f"the {what} returned"
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"{got} a tensor of shape {tuple(loss.shape)}; it must be the scalar loss "
                "that was back-propagated (reduce it with .mean() or .sum())"
            )
        return loss
    raise TypeError(
        f"{got} a {type(loss).__name__}; it must be the loss, a scalar tensor or a real "
        "number (convert a 0-d NumPy array with float(...))"
    )


def check_closures(**closures: Any) -> None:
    """Each given closure is callable (raises ``TypeError`` naming it)."""
    for name, fn in closures.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable (a closure), got {type(fn).__name__}")


class Engine:
    """The parts of a GRU step and the arithmetic that joins them.

    Args:
        rule: the rectification rule.
        memory: the retain memory (and GRU-k's recent retain gradients).
        amp: the gradient scaler's boundary (``AmpBoundary(None, ...)``: none).
        granularity: a key of :data:`~gru_optim.engine._partition.PARTITIONS`.
        space: a key of :data:`~gru_optim.engine._spaces.SPACES`.
        max_grad_norm: clip the final gradient to this norm (``None``: no clip).
        skip_nonfinite: skip a step when anything it computes is not finite.
        foreach, fused: the kernels (``fused`` resolved: a bool); ``backend``: which.
        hdefaults: GRU's parameter-group keys and their defaults.
    """

    def __init__(
        self,
        *,
        rule: Rule,
        memory: RetainMemory,
        amp: AmpBoundary,
        granularity: str,
        space: str = "gradient",
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = True,
        foreach: bool | None = None,
        fused: bool = False,
        backend: Any = None,
        hdefaults: dict[str, Any] | None = None,
    ) -> None:
        self.rule = rule
        self.memory = memory
        self.amp = amp
        self.partition = PARTITIONS[granularity]
        self.granularity = granularity
        self.space = space
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.foreach = foreach
        self.fused = fused
        self.backend = backend
        """The kernels' backend chosen for a torch optimizer's parameters (``None``: the
        driver uses the foreach path)."""
        self.hdefaults: dict[str, Any] = dict(hdefaults or {})
        self.pending: Pending | None = None
        """The retain side's record, until the step that consumes it."""
        self.last_stats: dict[str, Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        if self.pending is not None:
            raise RuntimeError(
                "copying or pickling a GRUOptimizer between retain_pass() and step(): the "
                "copy's memory would be one fold ahead and its next step a plain one; copy "
                "after step() (or before the retain pass)"
            )
        return dict(self.__dict__)

    # ------------------------------------------------------------------ decisions
    def checking(self) -> bool:
        """Whether GRU checks for non-finite values (and may skip)."""
        return self.skip_nonfinite or self.amp.enabled

    def skip(self, reason: Tensor) -> bool:
        """Whether to skip: the host read of a step (only when GRU checks)."""
        return self.checking() and bool(reason != 0)

    def gate(self, reason: Tensor) -> tuple[bool, Tensor | None]:
        """How a skip is decided: on the host (``(skip, None)``, one read when GRU checks)
        or, on the fused path, on the device (``(False, skip flag)``: the kernels, the clip
        and a fused inner optimizer read the flag themselves)."""
        if not self.checking():
            return False, None
        if self.fused:
            return False, reason != 0
        return bool(reason != 0), None

    def check_no_pending(self, in_retain_pass: bool = False) -> None:
        """A retain pass may start (raises if one was already made for this step)."""
        if self.pending is not None or in_retain_pass:
            raise RuntimeError(
                "retain_pass entered twice before step(): put all retain micro-batches in "
                "one retain_pass, then back-propagate the forget loss and call step()"
            )

    def partition_of(self, members: list[Tensor], group_of: Sequence[int]) -> list[int] | None:
        """The segments of ``members`` whose parameter groups are ``group_of`` (a driver
        that keeps its own flat members, such as DeepSpeed's fragments)."""
        groups: dict[int, list[Tensor]] = {}
        for m, g in zip(members, group_of):
            groups.setdefault(g, []).append(m)
        return self.partition(members, [{"params": groups[g]} for g in sorted(groups)])

    def discard_pending(self) -> None:
        if self.pending is not None:
            self.pending.close()
        self.pending = None

    # ------------------------------------------------------------------ retain side
    def fold(
        self,
        with_grad: Sequence[Tensor],
        grads: Sequence[Tensor],
        keys: Sequence[Tensor],
        gamma: dict[int, float],
        loss: Any,
        reducer: Reducer,
    ) -> Pending:
        """Fold the (unscaled, local) retain gradients ``grads`` of the memory keys
        ``with_grad`` into the memory (``keys`` with a memory but no gradient decay), once,
        unless they are not finite (or would overflow a float16 memory): the returned
        record says why the step must then be skipped."""
        device = grads[0].device
        reason = torch.zeros((), dtype=torch.long, device=device)
        total: Tensor | None = None
        if self.checking():
            total = sum_sq(
                list(grads), all_reduce=reducer.fn, foreach=self.foreach, fused=self.fused
            )
            risk = self.memory.overflow_risk(with_grad, grads)
            if risk is not None:  # float16 memory only
                risk = risk.to(total).reshape(1)
                reducer.sum_(risk)
            reason = reason_of(
                (~torch.isfinite(total), SkipReason.RETAIN_NONFINITE),
                (
                    risk[0] > 0 if risk is not None else torch.zeros((), dtype=torch.bool),
                    SkipReason.MEMORY_OVERFLOW,
                ),
                device=device,
            )
        host_skip, device_skip = self.gate(reason)  # the retain side's one host read
        if not host_skip:
            norms = self.memory.fold_(
                with_grad,
                grads,
                keys,
                gamma,
                foreach=self.foreach,
                fused=self.fused,
                gate=None if device_skip is None else ~device_skip,
                # Not checking: the norm (a statistic only) comes out of the fold's own
                # read of the gradients on the fused path.
                sq_norms=not self.checking(),
            )
            if norms is not None:
                total = norms.sum()
        assert total is not None  # not checking: the gate is always open
        return Pending(
            loss=loss.detach().reshape(()) if isinstance(loss, Tensor) else loss,
            grad_norm=total.sqrt(),
            reason=reason,
        )

    # ------------------------------------------------------------------ forget side
    def layout(
        self,
        members: list[Tensor],
        segments: list[int] | None,
        hyper: list[dict[str, float]],
        reducer: Reducer,
        numels: Sequence[int] | None = None,
    ) -> Layout:
        """The rule's view of one step: ``members`` (memory keys, in group order), their
        directions from the memory, the ``segments`` of the partition (from
        :attr:`partition`) and each segment's rule hyperparameters."""
        mem = self.memory
        return Layout(
            members,
            mem.locals(members),
            segments,
            hyper,
            reducer,
            mem.histories(members) if mem.history else None,
            numels=numels,
        )

    def rectify(
        self,
        layout: Layout,
        vectors: list[Tensor],
        offsets: Tensor | None,
        before: Tensor,
        source: GradientSource,
        *,
        kept: list[Tensor] | None = None,
        scale: float = 1.0,
    ) -> Result:
        """The forget side in this engine's space: solve the rule over ``layout`` for the
        local forget gradients ``vectors`` (``offsets``: dot products of a part of them
        kept from the retain side), skip (``before``: the reason already known) or apply,
        add ``kept`` (a part added after rectification), clip, and step ``source``.
        ``scale``: the loss scale ``vectors`` still carry (DeepSpeed's)."""
        return SPACES[self.space].step(  # type: ignore[no-any-return]
            self, layout, vectors, offsets, before, source, kept, scale
        )

    def clip_(
        self,
        grads: Sequence[Tensor],
        reducer: Reducer,
        skip: Tensor | None = None,
        scale: float = 1.0,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Clip the final gradient to ``max_grad_norm`` (one norm over all processes, of
        the gradient divided by ``scale``); with a true device ``skip`` flag the factor is
        1 (a skipped step changes nothing)."""
        if self.max_grad_norm is None or not grads:
            return None, None
        norm = total_norm(list(grads), all_reduce=reducer.fn, foreach=self.foreach)
        if scale != 1.0:
            norm = norm / scale
        coef = clip_coefficient(norm, self.max_grad_norm)
        if skip is not None:
            coef = torch.where(skip.to(coef.device), torch.ones_like(coef), coef)
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for dev, gs in by_device.items():
            torch._foreach_mul_(gs, coef.to(dev))
        return norm, coef

    # ------------------------------------------------------------------ statistics
    def record(
        self,
        pending: Pending,
        loss: Any,
        result: Result,
        loss_fallback: Any = None,
        inv: float = 1.0,
    ) -> None:
        """``last_stats`` of a rectified step (``inv``: unscales sums of gradients that
        were still loss-scaled)."""
        sol, reason, grad_norm, clip = result
        stats = sol.stats
        scaled = inv != 1.0
        self.last_stats = step_stats(
            loss=loss if loss is not None else loss_fallback,
            retain_loss=pending.loss,
            retain_grad_norm=pending.grad_norm,
            dot=stats.dot * inv if scaled else stats.dot,
            ema_sq_norm=stats.ema_sq_norm,
            grad_sq_norm=stats.grad_sq_norm * inv**2 if scaled else stats.grad_sq_norm,
            coef=sol.coef * inv if scaled else sol.coef,
            reason=reason if self.checking() else torch.zeros_like(reason),
            grad_norm=grad_norm,
            clip_coef=clip,
            active=sol.active,
            min_slack=sol.min_slack * inv if scaled else sol.min_slack,
            clipping=self.max_grad_norm is not None,
        )
        if "post_loss" in pending.extra:
            self.last_stats["post_loss"] = plain_stats(
                self.last_stats["dot"].device, pending.extra["post_loss"]
            )["forget_loss"]
