"""Spaces: where the rule is applied, and how the driver steps around it.

- :class:`GradientSpace` (the paper): rectify the gradient, clip it, step.
- :class:`UpdateSpace`: clip the gradient, step, then rectify the parameter change
  ``theta_new - theta_old`` (as the vector ``v = theta_old - theta_new``, which plays the
  role of a gradient), so that ``<theta_new - theta_old, m> <= 0`` whatever the inner
  optimizer's preconditioning. One extra parameter-sized buffer.
- :func:`closure_driven_step`: optimizers whose ``step`` re-evaluates the closure
  (``LBFGS``; SAM, which also uses the gradient present when it is called): the memory
  is folded once, every evaluation of the forget closure is rectified against it.

Each returns ``(solution, reason, grad_norm, clip_coef)`` for the statistics; the host
reads that decide a skip go through the engine's ``skip``/``gate`` (only when GRU checks).
The engine is seen through :class:`Steps`, the few things a space asks of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ..functional import tensor_sq_norms
from ..rules import Rule, Solution
from ._inner import gradient_first
from ._partition import Layout
from ._reduce import Reducer, local
from ._sources import GradientSource, ParamSource
from ._stats import SkipReason, reason_of

__all__ = ["SPACES", "GradientSpace", "Steps", "UpdateSpace", "closure_driven_step"]

Result = tuple[Solution, Tensor, Tensor | None, Tensor | None]


class Steps(Protocol):
    """What a space needs from the engine."""

    @property
    def rule(self) -> Rule: ...
    @property
    def foreach(self) -> bool | None: ...
    @property
    def fused(self) -> bool: ...
    def skip(self, reason: Tensor) -> bool: ...
    def gate(self, reason: Tensor) -> tuple[bool, Tensor | None]: ...
    def clip_(
        self,
        grads: Sequence[Tensor],
        reducer: Reducer,
        skip: Tensor | None = None,
        scale: float = 1.0,
    ) -> tuple[Tensor | None, Tensor | None]: ...


def _forget_reason(sol: Solution, before: Tensor) -> Tensor:
    """``before`` (the retain side's or the scaler's reason) unless it is none, then the
    forget side's: a non-finite gradient, or sums out of range."""
    device = sol.coef.device
    reason = reason_of(
        (~torch.isfinite(sol.stats.grad_sq_norm).all(), SkipReason.FORGET_NONFINITE),
        (~sol.ok, SkipReason.OUT_OF_RANGE),
        device=device,
    )
    return torch.where(before.to(device) != 0, before.to(device), reason)


class GradientSpace:
    """Rectify the gradient in place, clip it, step the inner optimizer."""

    name = "gradient"
    keeps_offsets = True
    """The part of ``.grad`` kept from the retain side is accounted for by dot offsets."""

    def step(
        self,
        eng: Steps,
        layout: Layout,
        vectors: list[Tensor],
        offsets: Tensor | None,
        before: Tensor,
        source: GradientSource,
        kept: list[Tensor] | None = None,
        scale: float = 1.0,
    ) -> Result:
        """Solve, decide, apply, add ``kept`` (a part added after rectification that is
        not in ``vectors``), clip, step. ``scale``: the loss scale ``vectors`` still
        carry (for the clip's norm)."""
        sol = layout.solve(eng.rule, vectors, offsets, foreach=eng.foreach, fused=eng.fused)
        reason = _forget_reason(sol, before)
        grad_norm = clip = None
        host_skip, skip = eng.gate(reason)
        if host_skip:
            source.skipped()
        else:
            layout.apply_(eng.rule, vectors, sol, foreach=eng.foreach, fused=eng.fused, skip=skip)
            if kept is not None:
                torch._foreach_add_(vectors, kept)
            grad_norm, clip = eng.clip_(vectors, layout.reducer, skip, scale)
            source.step(skip)
        return sol, reason, grad_norm, clip


class UpdateSpace:
    """Step on the (clipped) gradient, then rectify the parameter change."""

    name = "update"
    keeps_offsets = False

    def step(
        self,
        eng: Steps,
        layout: Layout,
        vectors: list[Tensor],
        offsets: Tensor | None,
        before: Tensor,
        source: ParamSource,
        kept: list[Tensor] | None = None,
        scale: float = 1.0,
    ) -> Result:
        device = vectors[0].device
        g_sq = tensor_sq_norms(vectors, foreach=eng.foreach).sum().reshape(1)
        layout.reducer.sum_(g_sq)
        reason = reason_of((~torch.isfinite(g_sq[0]), SkipReason.FORGET_NONFINITE), device=device)
        reason = torch.where(before.to(device) != 0, before.to(device), reason)
        if eng.skip(reason):
            return layout.solve(eng.rule, vectors, foreach=eng.foreach), reason, None, None
        grad_norm, clip = eng.clip_(vectors, layout.reducer)
        weights = [local(p) for p in layout.members]
        old = source.buffers_like(weights)
        torch._foreach_copy_(old, weights)
        source.step_plain()
        torch._foreach_sub_(old, weights)  # old <- v = theta_old - theta_new
        sol = layout.solve(eng.rule, old, foreach=eng.foreach)
        bad = reason_of((~sol.ok, SkipReason.OUT_OF_RANGE), device=device)
        if eng.skip(bad):
            # Put the weights back (the inner optimizer's state keeps this step).
            torch._foreach_add_(weights, old)
            return sol, bad, grad_norm, clip
        # theta_old - v~ = theta_new + (v - v~): the rule's correction, sign flipped.
        layout.apply_(eng.rule, weights, sol, sign=-1.0, foreach=eng.foreach)
        return sol, bad, grad_norm, clip


SPACES: dict[str, Any] = {"gradient": GradientSpace(), "update": UpdateSpace()}
"""The spaces :class:`~gru_optim.GRUOptimizer` accepts, by name (a DeepSpeed step is
always in gradient space)."""


def closure_driven_step(
    eng: Steps,
    space: str,
    source: ParamSource,
    run_forget: Callable[[], Any],
    build_layout: Callable[[list[Tensor]], Layout],
) -> tuple[Any, Result]:
    """``inner.step(closure)`` for optimizers that re-evaluate their closure: in gradient
    space each evaluation's gradient is rectified (the inner optimizer cannot be told to
    skip, so an evaluation out of range is passed on unrectified); in update space the
    whole step's change is rectified afterwards."""
    last: dict[str, Any] = {}

    def evaluate() -> Any:
        loss = run_forget()
        last["loss"] = loss
        if space != "gradient":
            return loss
        params = source.trainable()
        source.densify(params)
        with torch.no_grad():
            layout = build_layout(params)
            vectors = [local(p.grad) for p in layout.members]  # type: ignore[arg-type]
            sol = layout.solve(eng.rule, vectors, foreach=eng.foreach)
            reason = _forget_reason(sol, torch.zeros((), dtype=torch.long))
            clip: tuple[Tensor | None, Tensor | None] = (None, None)
            if not eng.skip(reason):
                layout.apply_(eng.rule, vectors, sol, foreach=eng.foreach)
                clip = eng.clip_(vectors, layout.reducer)
        last["result"] = (sol, reason, *clip)
        return loss

    # A step that uses the gradient present when it is called (SAM): the forget gradient
    # at the current weights, rectified like every later evaluation.
    first = gradient_first(source.inner)
    if space == "gradient":
        if first:
            evaluate()
        out = source.step_plain(evaluate)
        return out, last["result"]
    with torch.no_grad():
        layout = build_layout(source.trainable())
        weights = [local(p) for p in layout.members]
        old = [w.detach().clone() for w in weights]
    if first:
        evaluate()
    out = source.step_plain(evaluate)
    with torch.no_grad():
        torch._foreach_sub_(old, weights)
        sol = layout.solve(eng.rule, old, foreach=eng.foreach)
        reason = reason_of((~sol.ok, SkipReason.OUT_OF_RANGE), device=old[0].device)
        if not eng.skip(reason):
            layout.apply_(eng.rule, weights, sol, sign=-1.0, foreach=eng.foreach)
    return out, (sol, reason, None, None)
