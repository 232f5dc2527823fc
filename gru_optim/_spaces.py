"""Spaces: where the rule is applied, and how the inner optimizer steps around it.

- :class:`GradientSpace` (the paper): rectify the gradient, clip it, step.
- :class:`UpdateSpace`: clip the gradient, step, then rectify the parameter change
  ``theta_new - theta_old`` (as the vector ``v = theta_old - theta_new``, which plays the
  role of a gradient), so that ``<theta_new - theta_old, m> <= 0`` whatever the inner
  optimizer's preconditioning. One extra parameter-sized buffer.
- :func:`closure_driven_step`: optimizers whose ``step`` re-evaluates the closure
  (``LBFGS``; SAM, which also uses the gradient present when it is called): the memory
  is folded once, every evaluation of the forget closure is rectified against it.

Each returns ``(solution, reason, grad_norm, clip_coef)`` for the statistics; the host
reads that decide a skip go through ``opt._skip`` (only when GRU checks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._functional import tensor_sq_norms
from ._inner import gradient_first, step_inner
from ._partition import Layout
from ._reduce import local
from ._rules import Solution
from ._stats import SkipReason, reason_of

if TYPE_CHECKING:
    from ._sides import _Sides as GRUOptimizer

__all__ = ["SPACES", "GradientSpace", "UpdateSpace", "closure_driven_step"]

Result = tuple[Solution, Tensor, Tensor | None, Tensor | None]


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
        opt: GRUOptimizer,
        layout: Layout,
        vectors: list[Tensor],
        offsets: Tensor | None,
        before: Tensor,
        params: list[Tensor],
    ) -> Result:
        sol = layout.solve(opt._rule, vectors, offsets, foreach=opt.foreach, fused=opt._fused)
        reason = _forget_reason(sol, before)
        grad_norm = clip = None
        host_skip, skip = opt._gate(reason)
        if not host_skip:
            layout.apply_(opt._rule, vectors, sol, foreach=opt.foreach, fused=opt._fused, skip=skip)
            grad_norm, clip = opt._clip_(params, layout.reducer, skip)
            opt._step_inner(skip)
        return sol, reason, grad_norm, clip


class UpdateSpace:
    """Step on the (clipped) gradient, then rectify the parameter change."""

    name = "update"
    keeps_offsets = False

    def step(
        self,
        opt: GRUOptimizer,
        layout: Layout,
        vectors: list[Tensor],
        offsets: Tensor | None,
        before: Tensor,
        params: list[Tensor],
    ) -> Result:
        device = vectors[0].device
        g_sq = tensor_sq_norms(vectors, foreach=opt.foreach).sum().reshape(1)
        layout.reducer.sum_(g_sq)
        reason = reason_of((~torch.isfinite(g_sq[0]), SkipReason.FORGET_NONFINITE), device=device)
        reason = torch.where(before.to(device) != 0, before.to(device), reason)
        if opt._skip(reason):
            return layout.solve(opt._rule, vectors, foreach=opt.foreach), reason, None, None
        grad_norm, clip = opt._clip_(params, layout.reducer)
        weights = [local(p) for p in layout.members]
        old = opt._buffers_like(weights)
        torch._foreach_copy_(old, weights)
        step_inner(opt._inner)
        torch._foreach_sub_(old, weights)  # old <- v = theta_old - theta_new
        sol = layout.solve(opt._rule, old, foreach=opt.foreach)
        bad = reason_of((~sol.ok, SkipReason.OUT_OF_RANGE), device=device)
        if opt._skip(bad):
            # Put the weights back (the inner optimizer's state keeps this step).
            torch._foreach_add_(weights, old)
            return sol, bad, grad_norm, clip
        # theta_old - v~ = theta_new + (v - v~): the rule's correction, sign flipped.
        layout.apply_(opt._rule, weights, sol, sign=-1.0, foreach=opt.foreach)
        return sol, bad, grad_norm, clip


SPACES: dict[str, Any] = {"gradient": GradientSpace(), "update": UpdateSpace()}
"""The spaces :class:`~gru_optim.GRUOptimizer` accepts, by name."""


def closure_driven_step(
    opt: GRUOptimizer,
    closure: Callable[[], Any],
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
        if opt.space != "gradient":
            return loss
        params = opt._trainable()
        opt._densify(params)
        with torch.no_grad():
            layout = build_layout(params)
            vectors = [local(p.grad) for p in layout.members]  # type: ignore[arg-type]
            sol = layout.solve(opt._rule, vectors, foreach=opt.foreach)
            reason = _forget_reason(sol, torch.zeros((), dtype=torch.long))
            clip: tuple[Tensor | None, Tensor | None] = (None, None)
            if not opt._skip(reason):
                layout.apply_(opt._rule, vectors, sol, foreach=opt.foreach)
                clip = opt._clip_(params, layout.reducer)
        last["result"] = (sol, reason, *clip)
        return loss

    # A step that uses the gradient present when it is called (SAM): the forget gradient
    # at the current weights, rectified like every later evaluation.
    first = gradient_first(opt._inner)
    if opt.space == "gradient":
        if first:
            evaluate()
        out = step_inner(opt._inner, evaluate)
        return out, last["result"]
    with torch.no_grad():
        layout = build_layout(opt._trainable())
        weights = [local(p) for p in layout.members]
        old = [w.detach().clone() for w in weights]
    if first:
        evaluate()
    out = step_inner(opt._inner, evaluate)
    with torch.no_grad():
        torch._foreach_sub_(old, weights)
        sol = layout.solve(opt._rule, old, foreach=opt.foreach)
        reason = reason_of((~sol.ok, SkipReason.OUT_OF_RANGE), device=old[0].device)
        if not opt._skip(reason):
            layout.apply_(opt._rule, weights, sol, sign=-1.0, foreach=opt.foreach)
    return out, (sol, reason, None, None)
