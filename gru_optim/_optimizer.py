"""``GRUOptimizer``: the stateful shell around the functional core."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._functional import (
    conflict_coefficients,
    ema_update_,
    expand_segments,
    project_,
    segment_dots,
    tensor_dots,
    tensor_sq_norms,
)

__all__ = ["EMA_KEY", "GRUOptimizer", "RetainPass"]

EMA_KEY = "gru_ema"
"""Key of the retain memory in each parameter's entry of ``state_dict()["state"]``."""

Closure = Callable[[], Any]
Granularity = Literal["global", "tensor", "group"]
Space = Literal["gradient", "update"]

def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, the tensor itself otherwise (shares storage)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _sharded_group(params: list[Tensor]) -> Any:
    """The process group over which dot products of sharded parameters are partial sums.

    ``None`` when no parameter is a sharded DTensor (plain tensors, or DDP replicas whose
    gradients are already all-reduced).
    """
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    group = None
    for p in params:
        if isinstance(p, DTensor):
            if not any(isinstance(pl, Shard) for pl in p.placements):
                raise NotImplementedError(
                    "GRUOptimizer supports DTensor parameters sharded on one mesh "
                    f"dimension (FSDP2); got placements {p.placements}"
                )
            if p.device_mesh.ndim != 1:
                raise NotImplementedError("GRUOptimizer supports 1-D device meshes (FSDP2)")
            g = p.device_mesh.get_group()
            if group is not None and g is not group:
                raise NotImplementedError("all sharded parameters must share one device mesh")
            group = g
    return group


def _signature(params: list[Tensor]) -> list[tuple[int, int]]:
    """Identity and version counter of each parameter's gradient: changes on backward.

    The version is the local tensor's: FSDP2 accumulates into ``grad._local_tensor`` in
    place, which leaves the DTensor wrapper's own counter unchanged.
    """
    out = []
    for p in params:
        g = p.grad
        out.append((0, -1) if g is None else (id(g), _local(g)._version))
    return out


class _RetainGradients:
    """Stands for the retain gradient in ``GradScaler.unscale_`` (which keys its
    bookkeeping by object and reads only ``param_groups``)."""

    def __init__(self, owner: Optimizer) -> None:
        self._owner = owner

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._owner.param_groups


class RetainPass:
    """Handle yielded by :meth:`GRUOptimizer.retain_pass`."""

    def __init__(self, loss: Tensor | None = None) -> None:
        self.loss: Tensor | None = None if loss is None else loss.detach()

    def record(self, loss: Tensor) -> None:
        """Add ``loss`` (detached) to the retain loss reported in ``last_stats``; call it
        once per micro-batch to report their sum."""
        loss = loss.detach()
        self.loss = loss if self.loss is None else self.loss + loss


@dataclass
class _RetainRecord:
    """What a retain pass leaves for the step that consumes it."""

    loss: Tensor | None
    grad_norm: Tensor
    nonfinite: bool
    offsets: dict[Tensor, Tensor] = field(default_factory=dict)
    signature: list[tuple[int, int]] = field(default_factory=list)


class GRUOptimizer(Optimizer):
    r"""Gradient Rectified Unlearning around any ``torch.optim`` optimizer.

    Keeps an exponential moving average of the retain gradient,
    ``m_t = gamma * g_r + (1 - gamma) * m_{t-1}`` (``m_0 = 0``), and before each step of
    the wrapped optimizer replaces the forget gradient ``g`` by the closest vector that
    does not conflict with ``m``: if ``<g, m> < 0`` then
    ``g <- g - <g, m> / ||m||^2 * m``, otherwise ``g`` is left exactly as it is.

    Args:
        optimizer: the optimizer to wrap (an instance). ``param_groups``, ``state`` and
            ``defaults`` are the inner optimizer's own objects.
        gamma: weight of the new retain gradient in the memory, in ``(0, 1]``
            (``1``: no smoothing). The authors' default is ``0.8``.
        granularity: ``"global"`` (the paper): one dot product over all trainable
            parameters; ``"group"``: one per parameter group; ``"tensor"``: one per
            parameter tensor.
        retain_weight: after rectification add this multiple of the current retain
            gradient (the authors' ``+ce`` variant). ``0`` adds nothing.
        space: ``"gradient"`` (the paper) rectifies the gradient before the inner step;
            ``"update"`` rectifies the inner optimizer's actual parameter change, so that
            ``<theta_new - theta_old, m> <= 0`` after the step whatever the
            preconditioning. It keeps one extra parameter-sized buffer (in the
            parameters' dtype).
        ema_dtype: dtype of the memory. ``None``: float32, or the parameter's dtype when
            that is float64. ``torch.bfloat16`` halves its memory.
        skip_nonfinite: skip a step whose retain or forget gradient is not finite:
            weights, inner state and memory stay as they were (see :meth:`step`). On an
            accelerator this costs one host synchronisation per retain pass and one per
            step; ``False`` makes the step free of host synchronisation and lets
            non-finite values through as the inner optimizer would.
        foreach: use the multi-tensor (``torch._foreach_*``) kernels; ``None`` picks them
            whenever the tensors allow.
        grad_scaler: the ``torch.amp.GradScaler`` (or FSDP's ``ShardedGradScaler``) whose
            ``scaler.scale(loss).backward()`` produced the gradients (fp16 training).
            GRU then unscales the retain gradient before it enters the memory and the
            forget gradient before the rectification (each exactly once, through
            ``scaler.unscale_``; a forget gradient the caller already unscaled, e.g. to
            clip it, is not unscaled again), and skips a step on overflow whatever
            ``skip_nonfinite`` says. Call ``opt.step(...)`` or ``scaler.step(opt, ...)``
            (closures may be positional: they run before anything is unscaled), then
            ``scaler.update()`` once per iteration as usual: GRU never calls it.

    Use it with closures::

        opt.zero_grad()
        opt.step(forget_closure, retain_closure)

    or without (training loops that call ``backward`` themselves)::

        with opt.retain_pass():
            retain_loss.backward()
        forget_loss.backward()
        opt.step()

    ``step()`` with no retain closure and no pending retain pass is exactly the inner
    optimizer's step.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        gamma: float = 0.8,
        granularity: Granularity = "global",
        retain_weight: float = 0.0,
        space: Space = "gradient",
        ema_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = True,
        foreach: bool | None = None,
        grad_scaler: Any = None,
    ) -> None:
        if isinstance(optimizer, GRUOptimizer):
            raise TypeError("the optimizer is already a GRUOptimizer; wrap the inner one once")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "GRUOptimizer wraps a torch.optim.Optimizer instance, got "
                f"{type(optimizer).__name__}; build the optimizer first, e.g. "
                "GRUOptimizer(torch.optim.AdamW(model.parameters()))"
            )
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(f"gamma must be a float in (0, 1], got {gamma!r}")
        if not 0.0 < float(gamma) <= 1.0:
            raise ValueError(
                f"gamma must be in (0, 1] (it weighs the new retain gradient), got {gamma}"
            )
        if granularity not in ("global", "tensor", "group"):
            raise ValueError(
                f"granularity must be 'global', 'tensor' or 'group', got {granularity!r}"
            )
        if space not in ("gradient", "update"):
            raise ValueError(f"space must be 'gradient' or 'update', got {space!r}")
        if not isinstance(retain_weight, (int, float)) or not retain_weight >= 0.0:
            raise ValueError(f"retain_weight must be a float >= 0, got {retain_weight!r}")
        if ema_dtype is not None and not (
            isinstance(ema_dtype, torch.dtype) and ema_dtype.is_floating_point
        ):
            raise ValueError(f"ema_dtype must be a floating dtype or None, got {ema_dtype!r}")
        self._inner = optimizer
        self.gamma = float(gamma)
        self.granularity: Granularity = granularity
        self.retain_weight = float(retain_weight)
        self.space: Space = space
        self.ema_dtype = ema_dtype
        self.skip_nonfinite = bool(skip_nonfinite)
        self.foreach = foreach
        if grad_scaler is not None and not (
            callable(getattr(grad_scaler, "unscale_", None))
            and callable(getattr(grad_scaler, "is_enabled", None))
        ):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        self.grad_scaler = grad_scaler
        # What the scaler sees as the owner of the retain gradient (the GRU optimizer owns
        # the forget gradient): two unscale_ calls per iteration, both counted by update().
        self._retain_owner = _RetainGradients(self)
        self._ema: dict[Tensor, Tensor] = {}
        self._update_buffers: dict[Tensor, Tensor] = {}
        self._pending: _RetainRecord | None = None
        self.last_stats: dict[str, Tensor] = {}
        # Optimizer.__init__ installs the hook dictionaries and patches step for hooks and
        # profiling; while it runs, its writes to param_groups/state/defaults are ignored
        # (they belong to the inner optimizer).
        self._initializing = True
        try:
            super().__init__(optimizer.param_groups, optimizer.defaults)
        finally:
            self._initializing = False

    # ------------------------------------------------------------------ delegation
    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._inner

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if not self.__dict__.get("_initializing", False):
            self._inner.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        if not self.__dict__.get("_initializing", False):
            self._inner.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        if not self.__dict__.get("_initializing", False):
            self._inner.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the inner optimizer."""
        if self.__dict__.get("_initializing", False):
            return
        self._inner.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``; also discards a retain pass not yet used.

        Inside the forget closure of ``step(forget_closure, retain_closure)`` and before
        its ``backward`` (closures written the torch way, ``zero_grad()`` first), it leaves
        the gradients alone: they hold only what the retain pass left (nothing, or
        ``retain_weight`` times the retain gradient), which the step still needs.
        """
        pending = self._pending
        if (
            pending is not None
            and self.__dict__.get("_in_forget_closure", False)
            and _signature(self._params()) == pending.signature
        ):
            return
        self._pending = None
        self._inner.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        # Like torch's Optimizer, leave out the hooks and what an LR scheduler attaches to
        # the instance (``step`` wrapped with a weak reference to *this* optimizer, and
        # ``_opt_called``): a copy must step itself, not the original.
        return {
            k: v
            for k, v in self.__dict__.items()
            if not k.startswith("_optimizer_") and k not in ("step", "_opt_called")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["_initializing"] = False
        super().__setstate__(state)

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self._inner).splitlines())
        return (
            f"GRUOptimizer(gamma={self.gamma}, granularity={self.granularity!r}, "
            f"retain_weight={self.retain_weight}, space={self.space!r},\n{inner}\n)"
        )

    # ------------------------------------------------------------------ helpers
    def _params(self) -> list[Tensor]:
        seen: set[int] = set()
        out = []
        for group in self._inner.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _check_grads(self, params: list[Tensor]) -> None:
        for p in params:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse or g.layout != torch.strided:
                raise RuntimeError(
                    "GRUOptimizer does not support sparse gradients (layout "
                    f"{g.layout}); use dense embeddings (sparse=False)"
                )
            if g.is_complex():
                raise RuntimeError(
                    "GRUOptimizer does not support complex parameters: the projection is "
                    "defined for real gradients; view them with torch.view_as_real"
                )

    def _ema_dtype_for(self, p: Tensor) -> torch.dtype:
        if self.ema_dtype is not None:
            return self.ema_dtype
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _new_ema(self, p: Tensor) -> Tensor:
        return torch.zeros_like(p, dtype=self._ema_dtype_for(p), memory_format=torch.preserve_format)

    @staticmethod
    def _all_reduce_fn(group: Any) -> Callable[[Tensor], None] | None:
        if group is None:
            return None
        import torch.distributed as dist

        def reduce(t: Tensor) -> None:
            dist.all_reduce(t, group=group)

        return reduce

    # ------------------------------------------------------------------ loss scaling
    # GradScaler.step(opt, ...) hands the step to an optimizer with this flag instead of
    # unscaling first; GRU unscales itself, after its closures ran.
    _step_supports_amp_scaling = True

    def _scaling(self) -> bool:
        return self.grad_scaler is not None and bool(self.grad_scaler.is_enabled())

    def _checks_nonfinite(self) -> bool:
        return self.skip_nonfinite or self._scaling()

    def _unscale(self, owner: Any) -> None:
        """Unscale the gradients now in ``.grad`` once, on behalf of ``owner``."""
        if not self._scaling():
            return
        states = getattr(self.grad_scaler, "_per_optimizer_states", {})
        if owner is self and id(self) in states:
            stage = getattr(states[id(self)].get("stage"), "name", None)
            if stage == "UNSCALED":
                return  # the caller already unscaled the forget gradient
        try:
            self.grad_scaler.unscale_(owner)
        except RuntimeError as e:
            raise RuntimeError(
                f"{e} With GRUOptimizer(grad_scaler=scaler) call scaler.update() once per "
                "iteration, after opt.step() (or scaler.step(opt))."
            ) from e

    def _grads_nonfinite(self, params: list[Tensor]) -> bool:
        with torch.no_grad():
            with_grad = [p for p in params if p.grad is not None]
            sq = tensor_sq_norms([_local(p.grad) for p in with_grad], foreach=self.foreach)  # type: ignore[arg-type]
            total = sq.sum() if sq.numel() else torch.zeros(())
            group = _sharded_group(with_grad)
            if group is not None:
                self._all_reduce_fn(group)(total)  # type: ignore[misc]
            return self._nonfinite(total)

    def _nonfinite(self, sq_total: Tensor) -> bool:
        """The one host read GRU makes (only with ``skip_nonfinite``)."""
        return not bool(torch.isfinite(sq_total))

    @staticmethod
    def _check_callable(name: str, fn: Any) -> None:
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable (a closure), got {type(fn).__name__}")

    # ------------------------------------------------------------------ retain side
    @contextlib.contextmanager
    def retain_pass(self, loss: Tensor | None = None) -> Iterator[RetainPass]:
        """Context in which the retain loss is back-propagated (the closure-free path).

        On exit the retain gradient (everything accumulated inside, so micro-batches may
        loop in it) is folded into the memory and the gradients are set to ``None``, ready for the
        forget loss's ``backward`` and :meth:`step`. The losses given as ``loss`` or to the
        yielded handle's :meth:`RetainPass.record` (summed) are only recorded for
        :attr:`last_stats`::

            with opt.retain_pass() as rp:
                loss = retain_loss_fn()
                loss.backward()
                rp.record(loss)
        """
        if self._pending is not None or self.__dict__.get("_in_retain_pass", False):
            raise RuntimeError(
                "retain_pass entered twice before step(): put all retain micro-batches in "
                "one retain_pass, then back-propagate the forget loss and call step()"
            )
        params = self._params()
        before = _signature(params)
        handle = RetainPass(loss)
        self._in_retain_pass = True
        try:
            yield handle
        finally:
            self._in_retain_pass = False
        if _signature(params) == before:
            raise RuntimeError(
                "no gradient was computed inside retain_pass(): call backward on the retain "
                "loss inside the with-block"
            )
        self._fold_retain(params, handle.loss)

    def _fold_retain(self, params: list[Tensor], loss: Any) -> None:
        self._check_grads(params)
        self._unscale(self._retain_owner)
        with torch.no_grad():
            with_grad = [p for p in params if p.grad is not None]
            grads = [_local(p.grad) for p in with_grad]  # type: ignore[arg-type]
            group = _sharded_group(with_grad)
            sq = tensor_sq_norms(grads, foreach=self.foreach)
            total = sq.sum() if sq.numel() else torch.zeros(())
            if group is not None and self._checks_nonfinite():
                self._all_reduce_fn(group)(total)  # type: ignore[misc]
            nonfinite = self._checks_nonfinite() and self._nonfinite(total)
            offsets: dict[Tensor, Tensor] = {}
            if not nonfinite:
                for p in with_grad:
                    if p not in self._ema:
                        self._ema[p] = self._new_ema(p)
                emas = [_local(self._ema[p]) for p in with_grad]
                ema_update_(emas, grads, self.gamma, foreach=self.foreach)
                present = {id(p) for p in with_grad}
                absent = [p for p in self._ema if id(p) not in present]
                if self.gamma == 1.0:
                    # m = 1 * 0 + 0 * m is exactly zero: no memory, as a reloaded
                    # checkpoint reads an all-zero memory (see load_state_dict).
                    for p in absent:
                        del self._ema[p]
                elif absent:
                    torch._foreach_mul_([_local(self._ema[p]) for p in absent], 1.0 - self.gamma)
                if self.retain_weight != 0.0:
                    d = tensor_dots(grads, emas) * self.retain_weight
                    offsets = dict(zip(with_grad, d.unbind()))
            if self.retain_weight != 0.0:
                factor: Any = self.retain_weight
                if self._scaling() and grads:
                    # The forget backward adds scaled gradients on top: keep this part
                    # scaled too, so that one unscale_ of the sum is right.
                    factor = self.grad_scaler.scale(
                        torch.full((), self.retain_weight, device=grads[0].device)
                    )
                torch._foreach_mul_(grads, factor)
            else:
                # Cleared the way zero_grad(set_to_none=True) clears them: no write pass,
                # and the forget backward then stores its gradient instead of adding it
                # to zeros. DDP re-points them at its buckets, FSDP2 re-creates them.
                for p in with_grad:
                    p.grad = None
            self._pending = _RetainRecord(
                loss=loss.detach() if isinstance(loss, Tensor) else None,
                grad_norm=total.sqrt(),
                nonfinite=nonfinite,
                offsets=offsets,
                signature=_signature(params),
            )

    # ------------------------------------------------------------------ step
    def step(  # type: ignore[override]
        self,
        closure: Closure | None = None,
        retain_closure: Closure | None = None,
    ) -> Any:
        """One optimizer step.

        - ``step(forget_closure, retain_closure)``: runs the retain closure, folds its
          gradient into the memory, clears the gradients (to ``None``; with
          ``retain_weight`` they keep that multiple of the retain gradient), runs the forget closure,
          rectifies the gradients in place and steps the inner optimizer. Each closure
          computes its loss, calls ``backward`` and returns the loss. Returns the forget
          loss.
        - ``step()`` (or ``step(forget_closure)``) after a :meth:`retain_pass`: rectifies
          the gradients present now (computed by ``forget_closure`` if given) and steps.
        - ``step()`` / ``step(closure)`` otherwise: exactly the inner optimizer's step.

        A step whose retain or forget gradient is not finite (with ``skip_nonfinite``)
        leaves the weights and the inner state untouched and says so in
        ``last_stats["skipped"]``. The memory is left untouched when the retain gradient
        is not finite; when only the forget gradient is, the memory keeps this step's
        (finite) retain gradient, measured at the unchanged weights.

        Errors are raised before the weights or the inner state change. An error about
        the retain side (no gradient, sparse or complex gradients) leaves the memory
        untouched too; one found after the retain gradient was folded in (a forget
        closure that computes no gradient) leaves the memory holding it, as above:
        undoing the fold would need a second parameter-sized buffer.
        """
        self._check_callable("closure", closure)
        self._check_callable("retain_closure", retain_closure)
        if retain_closure is not None:
            if self._pending is not None:
                raise RuntimeError(
                    "step() got a retain_closure after a retain_pass(); use one or the other"
                )
            params = self._params()
            before = _signature(params)
            with torch.enable_grad():
                retain_loss = retain_closure()
            if _signature(params) == before:
                raise RuntimeError(
                    "the retain closure computed no gradient: it must call loss.backward() "
                    "and return the loss"
                )
            self._fold_retain(params, retain_loss)
        if "found_inf" in self.__dict__ and self.grad_scaler is None:
            # Set by GradScaler.step, which deletes them only after a successful step.
            self.__dict__.pop("found_inf", None)
            self.__dict__.pop("grad_scale", None)
            raise RuntimeError(
                "GradScaler.step() got a GRUOptimizer built without grad_scaler=: build it "
                "with GRUOptimizer(inner, grad_scaler=scaler) so that the retain gradient is "
                "unscaled before it enters the memory"
            )
        if self._pending is None:
            if not self._scaling():
                return self._inner.step(closure) if closure is not None else self._inner.step()
            plain_loss = None
            if closure is not None:
                with torch.enable_grad():
                    plain_loss = closure()
            params = self._params()
            self._check_grads(params)
            self._unscale(self)
            if not self._grads_nonfinite(params):
                self._inner.step()
            return plain_loss
        pending = self._pending
        params = self._params()
        loss = None
        if closure is not None:
            self._in_forget_closure = True
            try:
                with torch.enable_grad():
                    loss = closure()
            finally:
                self._in_forget_closure = False
        if _signature(params) == pending.signature:
            self._pending = None
            raise RuntimeError(
                "no forget gradient: the forget closure (or the code before step()) must "
                "call backward on the forget loss"
            )
        self._pending = None
        self._check_grads(params)
        self._unscale(self)
        self._rectify_and_step(params, pending, loss)
        return loss

    def _rectify_and_step(self, params: list[Tensor], pending: _RetainRecord, loss: Any) -> None:
        with torch.no_grad():
            # Parameters with a memory but no forget gradient take their share of the
            # correction: their forget gradient is zero.
            for p in params:
                if p.grad is None and p in self._ema:
                    p.grad = torch.zeros_like(p)
            with_grad = [p for p in params if p.grad is not None]
            grads_all = [_local(p.grad) for p in with_grad]  # type: ignore[arg-type]
            paired = [p for p in with_grad if p in self._ema]
            grads = [_local(p.grad) for p in paired]  # type: ignore[arg-type]
            emas = [_local(self._ema[p]) for p in paired]
            segments = self._segments(paired)
            group = _sharded_group(with_grad)
            reduce = self._all_reduce_fn(group)

            g_sq = tensor_sq_norms(grads_all, foreach=self.foreach)
            g_sq_total = g_sq.sum() if g_sq.numel() else torch.zeros(())
            if paired:
                offsets = None
                if pending.offsets:
                    offsets = torch.stack([pending.offsets[p] for p in paired])
                seg_dot, seg_sq, reduced = segment_dots(
                    grads,
                    emas,
                    segments,
                    dot_offsets=offsets,
                    extra=g_sq_total.reshape(1),
                    all_reduce=reduce,
                    foreach=self.foreach,
                )
                if reduced is not None and reduce is not None:
                    g_sq_total = reduced[0]
            else:
                seg_dot = seg_sq = g_sq_total.new_zeros(1)
                if reduce is not None:
                    g_sq_total = g_sq_total.reshape(1).clone()
                    reduce(g_sq_total)
                    g_sq_total = g_sq_total[0]
            nonfinite = pending.nonfinite or (
                self._checks_nonfinite() and self._nonfinite(g_sq_total)
            )

            coef = conflict_coefficients(seg_dot, seg_sq)
            if not nonfinite:
                if self.space == "gradient":
                    if paired:
                        per_tensor = expand_segments(coef, segments, len(paired))
                        project_(grads, emas, per_tensor, foreach=self.foreach)
                    self._inner.step()
                else:
                    coef = self._update_space_step(paired, emas, segments, reduce)
            self._record_stats(pending, loss, seg_dot, seg_sq, coef, g_sq_total, nonfinite)

    def _update_space_step(
        self,
        paired: list[Tensor],
        emas: list[Tensor],
        segments: list[int] | None,
        reduce: Callable[[Tensor], None] | None,
    ) -> Tensor:
        """Step the inner optimizer, then rectify the parameter change against ``m``."""
        params = [_local(p) for p in paired]
        prev = []
        for p, lp in zip(paired, params):
            buf = self._update_buffers.get(p)
            if buf is None or buf.shape != lp.shape or buf.dtype != lp.dtype:
                buf = self._update_buffers[p] = torch.empty_like(lp)
            prev.append(buf)
        if prev:
            torch._foreach_copy_(prev, params)
        self._inner.step()
        if not prev:
            return torch.zeros(1)
        # prev <- theta_new - theta_old, the update the inner optimizer made.
        torch._foreach_sub_(prev, params)
        torch._foreach_neg_(prev)
        seg_dot, seg_sq, _ = segment_dots(
            prev, emas, segments, all_reduce=reduce, foreach=self.foreach
        )
        # The update must not ascend the retain loss along m: <delta, m> <= 0, i.e. the
        # gradient-space rule applied to -delta.
        coef = conflict_coefficients(-seg_dot, seg_sq)
        project_(params, emas, -expand_segments(coef, segments, len(params)), foreach=self.foreach)
        return coef

    def _segments(self, paired: list[Tensor]) -> list[int] | None:
        if self.granularity == "global":
            return None
        if self.granularity == "tensor":
            return [1] * len(paired)
        index = {id(p) for p in paired}
        sizes = []
        for group in self._inner.param_groups:
            n = sum(1 for p in group["params"] if id(p) in index)
            if n:
                sizes.append(n)
        return sizes

    def _record_stats(
        self,
        pending: _RetainRecord,
        loss: Any,
        seg_dot: Tensor,
        seg_sq: Tensor,
        coef: Tensor,
        g_sq_total: Tensor,
        skipped: bool,
    ) -> None:
        dot = seg_dot.sum()
        ema_norm = seg_sq.sum().sqrt()
        g_norm = g_sq_total.sqrt().to(dot)
        denom = g_norm * ema_norm
        conflicts = (seg_dot < 0) & (seg_sq > 0)
        device = dot.device
        nan = torch.full((), float("nan"), device=device)
        self.last_stats = {
            "forget_loss": loss.detach() if isinstance(loss, Tensor) else nan,
            "retain_loss": pending.loss if pending.loss is not None else nan,
            "dot": dot,
            "cosine": torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), 0.0),
            "conflict": conflicts.any(),
            "conflict_fraction": conflicts.to(dot.dtype).mean(),
            "coef": coef.to(dot.dtype).mean() if coef.numel() else dot.new_zeros(()),
            "forget_grad_norm": g_norm,
            "retain_grad_norm": pending.grad_norm.to(device),
            "ema_norm": ema_norm,
            # a fill, not a host-to-device copy: no synchronisation on accelerators
            "skipped": torch.full((), skipped, dtype=torch.bool, device=device),
        }

    # ------------------------------------------------------------------ checkpoints
    def _index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(self._params())}

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, each parameter's entry holding its memory
        under :data:`EMA_KEY`. Loads into a plain inner optimizer after dropping that key.

        Every trainable parameter has an entry, zeros before its first retain gradient
        (``m_0 = 0``), so that a template taken from a fresh optimizer (as
        ``torch.distributed.checkpoint`` loads in place) has the keys to load the memory
        into. :meth:`load_state_dict` reads an all-zero memory as no memory."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self._inner.state_dict()
        state = dict(sd["state"])
        index = self._index()
        for p, m in self._ema.items():
            k = index.get(id(p))
            if k is None:
                continue
            entry = dict(state.get(k, {}))
            entry[EMA_KEY] = m
            state[k] = entry
        for p in self._params():
            if p.requires_grad and p not in self._ema:
                k = index[id(p)]
                entry = dict(state.get(k, {}))
                entry[EMA_KEY] = self._new_ema(p)
                state[k] = entry
        sd = {"state": state, "param_groups": sd["param_groups"]}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hook_result = post_hook(self, sd)
            if hook_result is not None:
                sd = hook_result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` or from the plain inner optimizer
        (the memory then starts empty). Raises before changing anything when the state
        dict does not belong to these parameters."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
        groups = self._inner.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} parameter groups, the optimizer "
                f"{len(groups)}: it comes from another model or optimizer"
            )
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"parameter group {i} has {len(g['params'])} parameters but the state "
                    f"dict's has {len(sg['params'])}: it comes from another model"
                )
        id_to_param = {}
        for g, sg in zip(groups, saved_groups):
            for p, k in zip(g["params"], sg["params"]):
                id_to_param[k] = p
        inner_state: dict[Any, Any] = {}
        emas: dict[Tensor, Tensor] = {}
        for k, entry in state_dict["state"].items():
            if k not in id_to_param:
                raise ValueError(f"state dict has state for unknown parameter {k!r}")
            p = id_to_param[k]
            entry = dict(entry)
            m = entry.pop(EMA_KEY, None)
            if m is not None:
                if tuple(m.shape) != tuple(p.shape):
                    raise ValueError(
                        f"retain memory of parameter {k} has shape {tuple(m.shape)}, the "
                        f"parameter {tuple(p.shape)}: the state dict comes from another model"
                    )
                emas[p] = m
            for name, v in entry.items():
                # Per-parameter buffers (exp_avg, momentum_buffer, ...) have the
                # parameter's shape; factored ones (Adafactor's row/col variances) have 1
                # where they are reduced. Anything else comes from another model.
                if (
                    isinstance(v, Tensor)
                    and v.dim() == p.dim() > 0
                    and any(a not in (b, 1) for a, b in zip(v.shape, p.shape))
                ):
                    raise ValueError(
                        f"state {name!r} of parameter {k} has shape {tuple(v.shape)}, the "
                        f"parameter {tuple(p.shape)}: the state dict comes from another model"
                    )
            if entry:
                inner_state[k] = entry
        self._inner.load_state_dict({"state": inner_state, "param_groups": saved_groups})
        with torch.no_grad():
            new: dict[Tensor, Tensor] = {}
            for p, m in emas.items():
                buf = self._ema.get(p)
                if buf is None or buf.dtype != self._ema_dtype_for(p):
                    buf = self._new_ema(p)
                buf.copy_(m)
                new[p] = buf
            if new:
                # An all-zero memory is no memory (state_dict writes zeros for parameters
                # without one). One host read, and one collective for sharded memories.
                keys = list(new)
                first = _local(new[keys[0]]).device
                flags = torch.stack(
                    [_local(new[q]).ne(0).any().to(first, torch.float32) for q in keys]
                )
                group = _sharded_group(keys)
                if group is not None:
                    self._all_reduce_fn(group)(flags)  # type: ignore[misc]
                new = {q: new[q] for q, f in zip(keys, flags.tolist()) if f > 0}
        self._ema = new
        self._pending = None
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------ introspection
    def retain_memory(self, p: Tensor) -> Tensor | None:
        """The retain memory ``m`` of parameter ``p`` (``None`` before its first retain
        gradient). The tensor is the live buffer: do not modify it."""
        return self._ema.get(p)
