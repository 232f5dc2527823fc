"""The two sides of a GRU step, as methods the optimizer inherits.

- The retain side (:meth:`_Sides._retain_side`, :meth:`_Sides._fold`): stale gradients are
  cleared, the caller back-propagates the retain loss, its gradient is folded into the
  memory once, and the step's :class:`~gru_optim._pending.Pending` record is left.
- The post side (:meth:`_Sides._post_side`): a gradient added after rectification stays in
  ``.grad``; its dot products with the memory are recorded so the rule rectifies only what
  the forget backward adds.
- The forget side (:meth:`_Sides._forget_side`): the members, segments and reducer of the
  step (:class:`~gru_optim._partition.Layout`), then the space's step (rule, clip, inner
  step; :mod:`._spaces`), then the statistics.

``GRUOptimizer`` (``_optimizer.py``) holds the state and the public API and orchestrates
these in :meth:`~gru_optim.GRUOptimizer.step`.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._amp import AmpBoundary
from ._functional import clip_coefficient, sum_sq, total_norm
from ._groups import Hyper, read_groups
from ._inner import step_inner
from ._memory import RetainMemory
from ._partition import PARTITIONS, Layout, group_of_segments
from ._pending import GradWatch, Pending, signature
from ._reduce import Reducer, local
from ._rules import CosClip, Rule
from ._spaces import SPACES, closure_driven_step
from ._stats import SkipReason, plain_stats, reason_of, step_stats

__all__ = ["Closure", "check_loss"]

Closure = Callable[[], Any]


def check_loss(loss: Any, what: str) -> Any:
    """A closure returns its scalar loss (or nothing)."""
    if loss is None or (not isinstance(loss, bool) and isinstance(loss, numbers.Real)):
        return loss
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"the {what} returned a tensor of shape {tuple(loss.shape)}; it must return "
                "the scalar loss it back-propagated (reduce it with .mean() or .sum())"
            )
        return loss
    raise TypeError(f"the {what} must return its loss (a scalar tensor), got {type(loss).__name__}")


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


class _Sides:
    """The retain, post and forget sides of a step (mixed into ``GRUOptimizer``)."""

    # The optimizer's state these methods read and write (set in GRUOptimizer.__init__).
    _inner: Optimizer
    _memory: RetainMemory
    _amp: AmpBoundary
    _rule: Rule
    _hdefaults: dict[str, Any]
    _pending: Pending | None
    _closure_driven: bool
    _update_buffers: dict[Any, Tensor]
    _in_forget_closure: bool
    _fused: bool
    _device_skip: bool
    granularity: str
    space: str
    max_grad_norm: float | None
    skip_nonfinite: bool
    foreach: bool | None
    last_stats: dict[str, Tensor]

    def _rule_checks(self) -> dict[str, Any]:
        """The validation of each of the rule's hyperparameters."""
        return {
            k: (lambda v, where, k=k: self._rule.check(k, v, where))
            for k in self._rule.hyperparameters
        }

    def _read_hyper(self) -> list[Hyper]:
        return read_groups(self._inner.param_groups, self._hdefaults, self._rule_checks())

    def _check_combinations(self, hypers: list[Hyper]) -> None:
        weighted = any(h.retain_weight != 0.0 for h in hypers)
        if weighted and isinstance(self._rule, CosClip):
            raise ValueError(
                "cos_clip needs the norm of the forget gradient alone, which GRU cannot "
                "separate from a retain_weight term kept in .grad: use retain_weight=0 "
                "with cos_clip"
            )
        if self.granularity == "global" and self._rule.hyperparameters:
            values = [h.rule for h in hypers]
            if any(v != values[0] for v in values):
                raise ValueError(
                    f"the parameter groups share one segment (granularity='global') but "
                    f"have different {sorted(values[0])}: use granularity='group' or the "
                    "same values"
                )
        if self._closure_driven and (weighted or self._amp.scaler is not None):
            raise ValueError(
                f"{type(self._inner).__name__} re-evaluates its closure inside step(): GRU "
                "supports it with retain_weight=0 and without grad_scaler"
            )

    def _check_post(self) -> None:
        """A post-rectification pass is possible with this rule (raises otherwise)."""
        if isinstance(self._rule, CosClip):
            raise ValueError(
                "cos_clip needs the norm of the forget gradient alone, which GRU cannot "
                "separate from a post-rectification gradient kept in .grad"
            )

    def _params(self) -> list[Tensor]:
        seen: set[int] = set()
        out = []
        for group in self._inner.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _trainable(self) -> list[Tensor]:
        """The parameters GRU acts on: a frozen one (``requires_grad=False``) never gets
        a gradient from GRU and never enters a fold or a dot product."""
        return [p for p in self._params() if p.requires_grad]

    def _group_index(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for i, group in enumerate(self._inner.param_groups):
            for p in group["params"]:
                out.setdefault(id(p), i)
        return out

    @staticmethod
    def _densify(params: list[Tensor]) -> None:
        """Sparse gradients (``nn.Embedding(sparse=True)``) become dense, in place of
        ``.grad``: the memory is dense (it decays every row) and so is the rectified
        gradient ``g - c m``, which the inner optimizer then steps (it must accept dense
        gradients: ``SparseAdam`` is refused when the GRUOptimizer is built). Complex
        gradients need nothing: every pass reads them as real views (``_reduce.local``)."""
        for p in params:
            g = p.grad
            if g is not None and g.layout != torch.strided:
                p.grad = g.to_dense()

    def _checking(self) -> bool:
        return self.skip_nonfinite or self._amp.enabled

    def _discard_pending(self) -> None:
        if self._pending is not None:
            self._pending.close()
        self._pending = None

    @contextlib.contextmanager
    def _retain_side(self, hypers: list[Hyper], no_grad: str) -> Iterator[Callable[[Any], None]]:
        """Clear stale gradients, let the caller back-propagate the retain loss, fold.

        Gradients present when the retain side starts belong to no pass of this step (a
        previous step's, or a forget backward run too early): they are cleared as
        ``zero_grad(set_to_none=True)`` clears them, so the memory only ever receives the
        retain loss's gradient.
        """
        params = self._trainable()
        # Every parameter's stale gradient goes, a frozen one's too: a gradient GRU wrote
        # before the parameter was frozen would otherwise be stepped again and again.
        for p in self._params():
            p.grad = None
        losses: list[Any] = []
        yield losses.append
        if all(p.grad is None for p in params):
            raise RuntimeError(no_grad)
        self._fold(params, losses[0] if losses else None, hypers)

    @contextlib.contextmanager
    def _post_side(self) -> Iterator[Callable[[Any], None]]:
        pending = self._pending
        params = self._trainable()
        if pending is None:
            raise RuntimeError(
                "a post-rectification pass needs a retain side first: retain_pass() (or a "
                "retain_closure), then the post pass, then the forget backward and step()"
            )
        self._check_post()
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
        self._densify(params)
        pending.post = True
        if losses and losses[0] is not None:
            pending.extra["post_loss"] = losses[0]
        self._keep_in_grad(params, pending)

    def _fold(self, params: list[Tensor], loss: Any, hypers: list[Hyper]) -> None:
        """Fold the retain gradient now in ``.grad`` into the memory and leave the step's
        record in ``self._pending``."""
        self._densify(params)
        self._amp.unscale_retain()
        gi = self._group_index()
        with torch.no_grad():
            with_grad = [p for p in params if p.grad is not None]
            grads = [local(p.grad) for p in with_grad]  # type: ignore[arg-type]
            device = grads[0].device
            reason = torch.zeros((), dtype=torch.long, device=device)
            total: Tensor | None = None
            if self._checking():
                reducer = Reducer.for_params(with_grad)
                total = sum_sq(
                    grads, all_reduce=reducer.fn, foreach=self.foreach, fused=self._fused
                )
                risk = self._memory.overflow_risk(with_grad, grads)
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
            host_skip, device_skip = self._gate(reason)  # the retain side's one host read
            if not host_skip:
                gamma = {id(p): hypers[gi[id(p)]].gamma for p in params}
                norms = self._memory.fold_(
                    with_grad,
                    grads,
                    params,
                    gamma,
                    foreach=self.foreach,
                    fused=self._fused,
                    gate=None if device_skip is None else ~device_skip,
                    # Not checking: the norm (a statistic only) comes out of the fold's
                    # own read of the gradients on the fused path.
                    sq_norms=not self._checking(),
                )
                if norms is not None:
                    total = norms.sum()
            assert total is not None  # not checking: the gate is always open
            pending = Pending(
                loss=loss.detach().reshape(()) if isinstance(loss, Tensor) else loss,
                grad_norm=total.sqrt(),
                reason=reason,
            )
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
                torch._foreach_mul_(gs, self._amp.scaled(w, device))
            self._pending = pending
            if by_weight:
                self._keep_in_grad(params, pending)
            else:
                pending.signature = signature(params)

    def _keep_in_grad(self, params: list[Tensor], pending: Pending) -> None:
        """Part of the final gradient stays in ``.grad`` through the forget backward:
        record its dot products with the memory, and watch for in-place changes."""
        pending.close()
        if SPACES[self.space].keeps_offsets:
            with torch.no_grad():
                kept = [p for p in params if p.grad is not None and p in self._memory]
                if kept:
                    d = self._rule.offsets(
                        [local(p.grad) for p in kept],  # type: ignore[arg-type]
                        self._memory.locals(kept),
                        self._memory.histories(kept) if self._memory.history else None,
                    )
                    inv = self._amp.inv_scale(d.device)
                    pending.offsets = dict(
                        zip(kept, (d if inv is None else d * inv.to(d)).unbind())
                    )
            pending.watch = GradWatch(params)
        pending.signature = signature(params)

    def _run_forget(self, closure: Closure) -> Any:
        self._in_forget_closure = True
        try:
            with torch.enable_grad():
                return check_loss(closure(), "forget closure")
        finally:
            self._in_forget_closure = False

    def _plain_step(self, closure: Closure | None) -> Any:
        """No retain side: the inner optimizer's step (skipped on a scaler overflow)."""
        params = self._trainable()
        clipping = self.max_grad_norm is not None
        if not self._amp.enabled:
            out = step_inner(self._inner, closure)
            self.last_stats = plain_stats(self._stats_device(params), out, clipping=clipping)
            return out
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._amp.unscale_forget()
        device = self._stats_device(params)
        found = self._amp.found_inf(device)
        reason = reason_of((found, SkipReason.SCALER_OVERFLOW), device=device)  # type: ignore[arg-type]
        if not bool(reason != 0):
            step_inner(self._inner)
        self.last_stats = plain_stats(device, loss, reason, clipping=clipping)
        return loss

    def _forget_side(self, pending: Pending, loss: Any, hypers: list[Hyper]) -> None:
        """Rectify the forget gradient now in ``.grad`` and step (in the chosen space)."""
        params = self._trainable()
        if signature(params) == pending.signature:
            raise RuntimeError(
                "no forget gradient: the forget closure (or the code before step()) must "
                "call backward on the forget loss, after the retain side: retain closure "
                "or retain_pass() first, then the forget backward, then step(); gradients "
                "present when the retain side starts are discarded as stale"
            )
        if pending.watch is not None:
            changed = pending.watch.changed(allowed=1 if self._amp.caller_unscaled() else 0)
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
        self._densify(params)
        self._amp.unscale_forget()
        with torch.no_grad():
            layout = self._layout(params, hypers, zero_fill=True)
            vectors = [local(p.grad) for p in layout.members]  # type: ignore[arg-type]
            device = vectors[0].device
            offsets = None
            if pending.offsets:
                zero = torch.zeros_like(next(iter(pending.offsets.values()))).to(device)
                offsets = torch.stack(
                    [pending.offsets.get(p, zero).to(device) for p in layout.members]
                )
            found = self._amp.found_inf(device)
            before = pending.reason.to(device)
            if found is not None:
                before = torch.where(
                    before != 0,
                    before,
                    reason_of((found, SkipReason.SCALER_OVERFLOW), device=device),
                )
            result = SPACES[self.space].step(self, layout, vectors, offsets, before, params)
        self._record(pending, loss, result)

    def _closure_driven_step(self, closure: Closure, hypers: list[Hyper]) -> Any:
        pending = self._pending
        assert pending is not None
        self._discard_pending()
        if self._skip(pending.reason):
            self.last_stats = plain_stats(
                pending.grad_norm.device,
                None,
                pending.reason,
                clipping=self.max_grad_norm is not None,
            )
            return None
        out, result = closure_driven_step(
            self,
            closure,
            lambda: self._run_forget(closure),
            lambda params: self._layout(params, hypers, zero_fill=self.space == "gradient"),
        )
        self._record(pending, None, result, loss_fallback=out)
        return out

    def _layout(self, params: list[Tensor], hypers: list[Hyper], *, zero_fill: bool) -> Layout:
        """The members of this step (trainable parameters with a gradient or a memory),
        their directions, segments, per-segment rule hyperparameters and reducer. With
        ``zero_fill`` a member with a memory but no gradient gets a zero gradient: its
        forget gradient is zero, and it takes its share of the correction."""
        members = [p for p in params if p.grad is not None or p in self._memory]
        if zero_fill:
            for p in members:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        segments = PARTITIONS[self.granularity](members, self._inner.param_groups)
        return Layout(
            members,
            self._memory.locals(members),
            segments,
            self._segment_hyper(members, segments, hypers),
            Reducer.for_params(members),
            self._memory.histories(members) if self._memory.history else None,
        )

    def _segment_hyper(
        self, members: list[Tensor], segments: list[int] | None, hypers: list[Hyper]
    ) -> list[dict[str, float]]:
        """The rule's hyperparameters per segment (the groups of a segment must agree)."""
        n = 1 if segments is None else len(segments)
        if not self._rule.hyperparameters:
            return [{}] * n
        out = []
        for groups in group_of_segments(members, segments, self._group_index()):
            values = [hypers[g].rule for g in groups]
            if any(v != values[0] for v in values):
                raise ValueError(
                    f"the parameter groups {groups} share one segment (granularity="
                    f"{self.granularity!r}) but have different {sorted(values[0])}: use "
                    "granularity='group' or the same values"
                )
            out.append(values[0] if values else self._rule.defaults())
        return out

    def _record(self, pending: Pending, loss: Any, result: Any, loss_fallback: Any = None) -> None:
        sol, reason, grad_norm, clip = result
        self.last_stats = step_stats(
            loss=loss if loss is not None else loss_fallback,
            retain_loss=pending.loss,
            retain_grad_norm=pending.grad_norm,
            dot=sol.stats.dot,
            ema_sq_norm=sol.stats.ema_sq_norm,
            grad_sq_norm=sol.stats.grad_sq_norm,
            coef=sol.coef,
            reason=reason if self._checking() else torch.zeros_like(reason),
            grad_norm=grad_norm,
            clip_coef=clip,
            active=sol.active,
            min_slack=sol.min_slack,
            clipping=self.max_grad_norm is not None,
        )
        if "post_loss" in pending.extra:
            self.last_stats["post_loss"] = plain_stats(
                self.last_stats["dot"].device, pending.extra["post_loss"]
            )["forget_loss"]

    def _stats_device(self, params: list[Tensor]) -> torch.device:
        for p in params:
            if p.grad is not None:
                return local(p.grad).device
        return local(params[0]).device if params else torch.device("cpu")

    def _skip(self, reason: Tensor) -> bool:
        """Whether to skip: the host read of a step (only when GRU checks)."""
        return self._checking() and bool(reason != 0)

    def _gate(self, reason: Tensor) -> tuple[bool, Tensor | None]:
        """How a skip is decided: on the host (``(skip, None)``, one read when GRU checks)
        or, on the fused path, on the device (``(False, skip flag)``: the kernels, the clip
        and a fused inner optimizer read the flag themselves)."""
        if not self._checking():
            return False, None
        if self._fused:
            return False, reason != 0
        return bool(reason != 0), None

    def _step_inner(self, skip: Tensor | None = None) -> None:
        """The inner optimizer's step, unless ``skip`` (a device flag) is true: torch's
        fused optimizers take the flag on the device (as GradScaler hands them
        ``found_inf``); others need one host read."""
        if skip is None:
            step_inner(self._inner)
            return
        inner = self._inner
        if not self._device_skip or not _has_state(inner):
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

    def _clip_(
        self, params: list[Tensor], reducer: Reducer, skip: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Clip the final gradient to ``max_grad_norm`` (one norm over all processes); with
        a true device ``skip`` flag the factor is 1 (a skipped step changes nothing)."""
        if self.max_grad_norm is None:
            return None, None
        grads = [local(p.grad) for p in params if p.grad is not None]
        if not grads:
            return None, None
        norm = total_norm(grads, all_reduce=reducer.fn, foreach=self.foreach)
        coef = clip_coefficient(norm, self.max_grad_norm)
        if skip is not None:
            coef = torch.where(skip.to(coef.device), torch.ones_like(coef), coef)
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for dev, gs in by_device.items():
            torch._foreach_mul_(gs, coef.to(dev))
        return norm, coef

    def _buffers_like(self, tensors: list[Tensor]) -> list[Tensor]:
        """Reusable buffers shaped like ``tensors`` (update space's one extra buffer)."""
        out = []
        for t in tensors:
            key = (t.data_ptr(), t.shape, t.dtype, t.device)
            buf = self._update_buffers.get(key)
            if buf is None:
                buf = self._update_buffers[key] = torch.empty_like(t)
            out.append(buf)
        return out
