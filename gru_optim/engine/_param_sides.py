"""The sides of a GRU step on a torch optimizer's parameters (``.grad``).

:class:`ParamSides` drives an :class:`~gru_optim.engine._engine.Engine` over a
:class:`~gru_optim.engine._sources.ParamSource`:

- the retain side (:meth:`ParamSides.retain_side`): stale gradients are cleared, the
  caller back-propagates the retain loss, its gradient is unscaled and folded into the
  memory once (:meth:`Engine.fold`), and the step's
  :class:`~gru_optim.engine._pending.Pending` record is left;
- the post side (:meth:`ParamSides.post_side`): a gradient added after rectification stays
  in ``.grad``; its dot products with the memory are recorded so the rule rectifies only
  what the forget backward adds;
- the forget side (:meth:`ParamSides.forget_side`): the members, segments and reducer of
  the step, then the space's step (:meth:`Engine.rectify`), then the statistics;
- :meth:`ParamSides.run`: the whole ``step(forget_closure, retain_closure, post_closure)``,
  everything that can be refused refused before the retain side folds.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..rules import CosClip
from ._config import check_weighted
from ._engine import Closure, Engine, check_loss
from ._groups import (
    Hyper,
    check_values,
    fill_groups,
    group_values,
    read_groups,
    unread_rule_keys,
)
from ._partition import Layout, group_of_segments
from ._pending import GradWatch, Pending, RetainPass, signature
from ._policy import PlainSteps, PlainStepWarning, caller_level, check_plain_steps, frozen_lr
from ._reduce import Reducer, local
from ._sources import ParamSource
from ._spaces import SPACES, closure_driven_step
from ._stats import SkipReason, plain_stats, reason_of

__all__ = ["ParamSides"]


class ParamSides:
    """A GRU step over the ``.grad`` of a torch optimizer's parameters.

    ``closure_driven``: the inner optimizer re-evaluates its closure inside ``step``
    (``LBFGS``)."""

    def __init__(
        self,
        engine: Engine,
        source: ParamSource,
        *,
        closure_driven: bool,
        plain_steps: PlainSteps = "warn",
    ) -> None:
        self.engine = engine
        self.source = source
        self.closure_driven = closure_driven
        self.plain_steps: PlainSteps = check_plain_steps(plain_steps)
        self.in_forget_closure = False
        self.in_retain_pass = False
        self.warned_dropped = False
        self.warned_plain = False

    @property
    def inner_name(self) -> str:
        return type(self.source.inner).__name__

    # ------------------------------------------------------------------ hyperparameters
    def rule_checks(self) -> dict[str, Any]:
        """The validation of each of the rule's hyperparameters."""
        rule = self.engine.rule
        return {k: (lambda v, where, k=k: rule.check(k, v, where)) for k in rule.hyperparameters}

    def read_hyper(self) -> list[Hyper]:
        return read_groups(self.source.groups, self.engine.hdefaults, self.rule_checks())

    def install(self, planned: list[dict[str, Any]]) -> None:
        """Validate GRU's values ``planned`` for each group (and their combination), then
        write them: a refused call writes nothing."""
        wheres = [f" (param_groups[{i}])" for i in range(len(planned))]
        self.check_combinations(check_values(planned, self.rule_checks(), wheres))
        for group, values in zip(self.source.groups, planned):
            group.update(values)

    def add_group(self, param_group: dict[str, Any]) -> None:
        """``add_param_group`` through GRU: validated first (GRU's values in the group, and
        their combination with the other groups'), refused between a retain side and its
        step."""
        if self.engine.pending is not None or self.in_retain_pass or self.in_forget_closure:
            raise RuntimeError(
                "add_param_group() between retain_pass() (or a retain closure) and step(): "
                "the memory is one fold ahead and the step would take the new parameters' "
                "retain gradient (or none) for a forget gradient; add the group after "
                "step() (or before the retain pass)"
            )
        groups, hdefaults = self.source.groups, self.engine.hdefaults
        hypers = check_values(
            group_values(groups, hdefaults),
            self.rule_checks(),
            [f" (param_groups[{i}])" for i in range(len(groups))],
        )
        if isinstance(param_group, dict):
            unread = unread_rule_keys(param_group, self.engine.rule.hyperparameters)
            if unread:
                raise ValueError(
                    f"the new parameter group has {unread[0]!r}, which this GRUOptimizer's "
                    f"rule ({self.engine.rule.name}) does not read: it would be kept and "
                    "ignored. Leave it out, or build the GRUOptimizer with cos_clip=... "
                    "(and granularity='group' for a threshold per group)"
                )
            (values,) = group_values([param_group], hdefaults)
            hypers += check_values([values], self.rule_checks(), [" (the new parameter group)"])
            self.check_combinations(hypers)
        self.source.inner.add_param_group(param_group)
        fill_groups(groups[-1:], hdefaults)

    def check_plain_step(self) -> None:
        """A step with no retain gradient is the inner optimizer's plain step: warn once
        (``plain_steps="warn"``), raise (``"error"``) or say nothing (``"allow"``). A step
        with every learning rate 0 moves nothing and is not reported."""
        if self.plain_steps == "allow" or (self.plain_steps == "warn" and self.warned_plain):
            return
        if frozen_lr(self.source.groups):
            return
        message = (
            "GRUOptimizer.step() got no retain gradient (no retain_closure, and no "
            "retain_pass() before it), so it rectified nothing: it was the inner "
            f"{self.inner_name}'s plain step. Give the retain loss with "
            "opt.step(forget_closure, retain_closure), or back-propagate it inside "
            "`with opt.retain_pass():` before the forget loss's backward and step(). For "
            "deliberate plain steps build GRUOptimizer(..., plain_steps='allow')"
        )
        if self.plain_steps == "error":
            raise RuntimeError(message + " (this optimizer has plain_steps='error')")
        self.warned_plain = True
        warnings.warn(
            message + " (warned once per optimizer; plain_steps='error' raises instead)",
            PlainStepWarning,
            stacklevel=caller_level(),
        )

    def check_combinations(self, hypers: list[Hyper]) -> None:
        eng = self.engine
        weighted = any(h.retain_weight != 0.0 for h in hypers)
        check_weighted(eng.rule, weighted)
        if eng.granularity == "global" and eng.rule.hyperparameters:
            values = [h.rule for h in hypers]
            if any(v != values[0] for v in values):
                raise ValueError(
                    f"the parameter groups share one segment (granularity='global') but "
                    f"have different {sorted(values[0])}: use granularity='group' or the "
                    "same values"
                )
        if self.closure_driven and (weighted or eng.amp.scaler is not None):
            raise ValueError(
                f"{self.inner_name} re-evaluates its closure inside step(): GRU "
                "supports it with retain_weight=0 and without grad_scaler"
            )

    def check_post(self) -> None:
        """A post-rectification pass is possible with this rule (raises otherwise)."""
        if isinstance(self.engine.rule, CosClip):
            raise ValueError(
                "cos_clip needs the norm of the forget gradient alone, which GRU cannot "
                "separate from a post-rectification gradient kept in .grad"
            )

    # ------------------------------------------------------------------ the public passes
    def run(
        self, closure: Closure | None, retain_closure: Closure | None, post_closure: Closure | None
    ) -> Any:
        """``GRUOptimizer.step(closure, retain_closure, post_closure)`` (see there)."""
        eng = self.engine
        for name, fn in (
            ("closure", closure),
            ("retain_closure", retain_closure),
            ("post_closure", post_closure),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable (a closure), got {type(fn).__name__}")
        if retain_closure is None and post_closure is None and eng.pending is None:
            self.check_plain_step()
            return self.plain_step(closure)
        if retain_closure is not None and eng.pending is not None:
            raise RuntimeError(
                "step() got a retain_closure after a retain_pass(); use one or the other"
            )
        hypers = self.read_hyper()
        self.check_combinations(hypers)
        # Everything that can be refused is refused here, before the retain side folds.
        self.source.check_ready(self.engine.amp.scaler is not None)
        if self.closure_driven:
            if closure is None:
                raise RuntimeError(
                    f"{self.inner_name} needs the forget closure: "
                    "opt.step(forget_closure, retain_closure)"
                )
            if post_closure is not None:
                raise ValueError(
                    f"{self.inner_name} re-evaluates its closure inside step(): "
                    "GRU supports it without a post_closure"
                )
        if post_closure is not None:
            self.check_post()
        try:
            if retain_closure is not None:
                with (
                    self.retain_side(
                        hypers,
                        "the retain closure computed no gradient: it must "
                        "call loss.backward() and return the loss",
                    ) as record,
                    torch.enable_grad(),
                ):
                    record(check_loss(retain_closure(), "retain closure"))
            if self.closure_driven:
                assert closure is not None
                return self.closure_driven_step(closure, hypers)
            if post_closure is not None:
                with self.post_side() as record, torch.enable_grad():
                    record(check_loss(post_closure(), "post_closure"))
            pending = eng.pending
            assert pending is not None
            loss = self.run_forget(closure) if closure is not None else None
            self.forget_side(pending, loss, hypers)
            return loss
        finally:
            eng.discard_pending()

    @contextlib.contextmanager
    def retain_pass(self, loss: Tensor | None) -> Iterator[RetainPass]:
        """``GRUOptimizer.retain_pass`` (see there)."""
        if self.closure_driven:
            raise RuntimeError(
                f"{self.inner_name} needs closures: use "
                "opt.step(forget_closure, retain_closure) instead of retain_pass()"
            )
        if self.engine.pending is not None or self.in_retain_pass:
            raise RuntimeError(
                "retain_pass entered twice before step(): put all retain micro-batches in "
                "one retain_pass, then back-propagate the forget loss and call step()"
            )
        hypers = self.read_hyper()
        self.source.check_ready(self.engine.amp.scaler is not None)
        handle = RetainPass(check_loss(loss, "retain_pass loss") if loss is not None else None)
        self.in_retain_pass = True
        try:
            with self.retain_side(
                hypers,
                "no gradient was computed inside retain_pass(): "
                "call backward on the retain loss inside the with-block",
            ) as record:
                yield handle
                record(handle.loss)
        finally:
            self.in_retain_pass = False

    @contextlib.contextmanager
    def post_pass(self) -> Iterator[None]:
        """``GRUOptimizer.post_pass`` (see there)."""
        try:
            with self.post_side() as record:
                yield
                record(None)
        except BaseException:
            self.engine.discard_pending()
            raise

    def before_zero_grad(self) -> bool:
        """What ``zero_grad()`` does to a pending retain pass; ``False``: leave the
        gradients alone (inside the forget closure, before its backward)."""
        pending = self.engine.pending
        if pending is None:
            return True
        if self.in_forget_closure:
            if signature(self.source.trainable()) == pending.signature:
                return False
            raise RuntimeError(
                "zero_grad() inside the forget closure after its backward would discard "
                "the forget gradient (and what the retain side left in .grad): call it "
                "first in the closure, before backward, or not at all"
            )
        if not self.warned_dropped:
            self.warned_dropped = True
            # It announces the plain step that follows: that step does not warn again.
            self.warned_plain = True
            warnings.warn(
                "zero_grad() discarded a retain pass that no step() used: the next step "
                "is a plain, unrectified step (last_stats['rectified'] is False). Call "
                "zero_grad() before the retain pass, not between it and step().",
                PlainStepWarning,
                stacklevel=3,
            )
        self.engine.discard_pending()
        return True

    # ------------------------------------------------------------------ the sides
    @contextlib.contextmanager
    def retain_side(self, hypers: list[Hyper], no_grad: str) -> Iterator[Callable[[Any], None]]:
        """Clear stale gradients, let the caller back-propagate the retain loss, fold.

        Gradients present when the retain side starts belong to no pass of this step (a
        previous step's, or a forget backward run too early): they are cleared as
        ``zero_grad(set_to_none=True)`` clears them, so the memory only ever receives the
        retain loss's gradient.
        """
        params = self.source.trainable()
        self.source.clear()
        losses: list[Any] = []
        # Inside, as inside retain_pass(): add_param_group and load_state_dict are refused.
        outer, self.in_retain_pass = self.in_retain_pass, True
        try:
            yield losses.append
        finally:
            self.in_retain_pass = outer
        if all(p.grad is None for p in params):
            raise RuntimeError(no_grad)
        self.fold(params, losses[0] if losses else None, hypers)

    @contextlib.contextmanager
    def post_side(self) -> Iterator[Callable[[Any], None]]:
        pending = self.engine.pending
        params = self.source.trainable()
        if pending is None:
            raise RuntimeError(
                "a post-rectification pass needs a retain side first: retain_pass() (or a "
                "retain_closure), then the post pass, then the forget backward and step()"
            )
        self.check_post()
        if signature(params) != pending.signature:
            raise RuntimeError(
                "the post-rectification pass must run right after the retain side and "
                "before the forget backward (the gradients changed since the retain side)"
            )
        losses: list[Any] = []
        yield losses.append
        if signature(params) == pending.signature:
            raise RuntimeError(
                "the post-rectification pass computed no gradient: call backward on its loss"
            )
        self.source.densify(params)
        pending.post = True
        if losses and losses[0] is not None:
            pending.extra["post_loss"] = losses[0]
        self.keep_in_grad(params, pending)

    def fold(self, params: list[Tensor], loss: Any, hypers: list[Hyper]) -> None:
        """Fold the retain gradient now in ``.grad`` into the memory and leave the step's
        record in ``engine.pending``."""
        eng = self.engine
        self.source.densify(params)
        eng.amp.unscale_retain()
        gi = self.source.group_index()
        with torch.no_grad():
            with_grad = [p for p in params if p.grad is not None]
            grads = [local(p.grad) for p in with_grad]  # type: ignore[arg-type]
            device = grads[0].device
            gamma = {id(p): hypers[gi[id(p)]].gamma for p in params}
            reducer = Reducer.for_params(with_grad) if eng.checking() else Reducer(None)
            pending = eng.fold(with_grad, grads, params, gamma, loss, reducer)
            by_weight: dict[float, list[Tensor]] = {}
            for p in with_grad:
                w = hypers[gi[id(p)]].retain_weight
                if w == 0.0:
                    # Cleared the way zero_grad(set_to_none=True) clears them: no write
                    # pass, and the forget backward then stores its gradient instead of
                    # adding it to zeros. DDP re-points them at its buckets, FSDP2
                    # re-creates them.
                    p.grad = None
                else:
                    by_weight.setdefault(w, []).append(local(p.grad))  # type: ignore[arg-type]
            for w, gs in by_weight.items():
                # Kept scaled like the gradients a scaled forget backward adds on top, so
                # that one unscale of the sum is right.
                torch._foreach_mul_(gs, eng.amp.scaled(w, device))
            eng.pending = pending
            if by_weight:
                self.keep_in_grad(params, pending)
            else:
                pending.signature = signature(params)

    def keep_in_grad(self, params: list[Tensor], pending: Pending) -> None:
        """Part of the final gradient stays in ``.grad`` through the forget backward:
        record its dot products with the memory, and watch for in-place changes."""
        eng = self.engine
        pending.close()
        if SPACES[eng.space].keeps_offsets:
            with torch.no_grad():
                mem = eng.memory
                kept = [p for p in params if p.grad is not None and p in mem]
                if kept:
                    d = eng.rule.offsets(
                        [local(p.grad) for p in kept],  # type: ignore[arg-type]
                        mem.locals(kept),
                        mem.histories(kept) if mem.history else None,
                    )
                    inv = eng.amp.inv_scale(d.device)
                    pending.offsets = dict(
                        zip(kept, (d if inv is None else d * inv.to(d)).unbind())
                    )
            pending.watch = GradWatch(params)
        pending.signature = signature(params)

    def run_forget(self, closure: Closure) -> Any:
        self.in_forget_closure = True
        try:
            with torch.enable_grad():
                return check_loss(closure(), "forget closure")
        finally:
            self.in_forget_closure = False

    def plain_step(self, closure: Closure | None) -> Any:
        """No retain side: the inner optimizer's step (skipped on a scaler overflow)."""
        eng, source = self.engine, self.source
        params = source.trainable()
        clipping = eng.max_grad_norm is not None
        if not eng.amp.enabled:
            out = source.step_plain(closure)
            eng.last_stats = plain_stats(source.device_of(params), out, clipping=clipping)
            return out
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        eng.amp.unscale_forget()
        device = source.device_of(params)
        found = eng.amp.found_inf(device)
        reason = reason_of((found, SkipReason.SCALER_OVERFLOW), device=device)  # type: ignore[arg-type]
        if not bool(reason != 0):
            source.step_plain()
        eng.last_stats = plain_stats(device, loss, reason, clipping=clipping)
        return loss

    def forget_side(self, pending: Pending, loss: Any, hypers: list[Hyper]) -> None:
        """Rectify the forget gradient now in ``.grad`` and step (in the chosen space)."""
        eng = self.engine
        params = self.source.trainable()
        if signature(params) == pending.signature:
            raise RuntimeError(
                "no forget gradient: the forget closure (or the code before step()) must "
                "call backward on the forget loss, after the retain side: retain closure "
                "or retain_pass() first, then the forget backward, then step(); gradients "
                "present when the retain side starts are discarded as stale"
            )
        if pending.watch is not None:
            changed = pending.watch.changed(allowed=1 if eng.amp.caller_unscaled() else 0)
            if changed:
                raise RuntimeError(
                    f"{len(changed)} gradient(s) were changed in place (clipped?) or "
                    "replaced (p.grad = ..., or a module's zero_grad()) outside the "
                    "backward passes between the retain side and step(), while part of the "
                    "final gradient (retain_weight or a post pass) sits in .grad: the "
                    "rectification would be wrong. Clip with GRUOptimizer(max_grad_norm=...) "
                    "instead, which clips the rectified gradient right before the inner "
                    "step, and zero gradients only through the optimizer's zero_grad()"
                )
        self.source.densify(params)
        eng.amp.unscale_forget()
        with torch.no_grad():
            layout = self.layout(params, hypers, zero_fill=True)
            vectors = [local(p.grad) for p in layout.members]  # type: ignore[arg-type]
            device = vectors[0].device
            offsets = None
            if pending.offsets:
                zero = torch.zeros_like(next(iter(pending.offsets.values()))).to(device)
                offsets = torch.stack(
                    [pending.offsets.get(p, zero).to(device) for p in layout.members]
                )
            found = eng.amp.found_inf(device)
            before = pending.reason.to(device)
            if found is not None:
                before = torch.where(
                    before != 0,
                    before,
                    reason_of((found, SkipReason.SCALER_OVERFLOW), device=device),
                )
            result = eng.rectify(layout, vectors, offsets, before, self.source)
        eng.record(pending, loss, result)

    def closure_driven_step(self, closure: Closure, hypers: list[Hyper]) -> Any:
        eng = self.engine
        pending = eng.pending
        assert pending is not None
        eng.discard_pending()
        if eng.skip(pending.reason):
            eng.last_stats = plain_stats(
                pending.grad_norm.device,
                None,
                pending.reason,
                clipping=eng.max_grad_norm is not None,
            )
            return None
        out, result = closure_driven_step(
            eng,
            eng.space,
            self.source,
            lambda: self.run_forget(closure),
            lambda params: self.layout(params, hypers, zero_fill=eng.space == "gradient"),
        )
        eng.record(pending, None, result, loss_fallback=out)
        return out

    def layout(self, params: list[Tensor], hypers: list[Hyper], *, zero_fill: bool) -> Layout:
        """The members of this step (trainable parameters with a gradient or a memory),
        their directions, segments, per-segment rule hyperparameters and reducer. With
        ``zero_fill`` a member with a memory but no gradient gets a zero gradient: its
        forget gradient is zero, and it takes its share of the correction."""
        eng = self.engine
        members = [p for p in params if p.grad is not None or p in eng.memory]
        if zero_fill:
            for p in members:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        segments = eng.partition(members, self.source.groups)
        hyper = self.segment_hyper(members, segments, hypers)
        return eng.layout(members, segments, hyper, Reducer.for_params(members))

    def segment_hyper(
        self, members: list[Tensor], segments: list[int] | None, hypers: list[Hyper]
    ) -> list[dict[str, float]]:
        """The rule's hyperparameters per segment (the groups of a segment must agree)."""
        rule = self.engine.rule
        n = 1 if segments is None else len(segments)
        if not rule.hyperparameters:
            return [{}] * n
        out = []
        for groups in group_of_segments(members, segments, self.source.group_index()):
            values = [hypers[g].rule for g in groups]
            if any(v != values[0] for v in values):
                raise ValueError(
                    f"the parameter groups {groups} share one segment (granularity="
                    f"{self.engine.granularity!r}) but have different {sorted(values[0])}: "
                    "use granularity='group' or the same values"
                )
            out.append(values[0] if values else rule.defaults())
        return out
