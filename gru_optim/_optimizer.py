"""``GRUOptimizer``: the public API and the orchestration of one GRU step.

A step has four parts, each in its own module: the retain side folds the retain gradient
into the memory (:mod:`._memory`), the forget side asks the rule (:mod:`._rules`) to
rectify the forget gradient over the segments of the partition (:mod:`._partition`), in
the chosen space (:mod:`._spaces`), summing across processes at one boundary
(:mod:`._reduce`), with gradient scaling at another (:mod:`._amp`); then the inner
optimizer steps (:mod:`._inner`) and the statistics are recorded (:mod:`._stats`). The
sides themselves are in :mod:`._sides`. ``docs/design.md`` draws it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import numbers
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._amp import AmpBoundary
from ._checkpoint import load_state, save_state
from ._groups import (
    GAMMA_KEY,
    RETAIN_WEIGHT_KEY,
    Hyper,
    check_gamma,
    check_retain_weight,
    check_values,
    fill_groups,
    group_values,
    plan_groups,
    real,
)
from ._inner import needs_closure, not_ready
from ._memory import EMA_KEY, RetainMemory
from ._partition import PARTITIONS, Granularity
from ._pending import Pending, RetainPass, signature
from ._rules import Cone, OneDirection, Rule, make_rule
from ._sides import Closure, _Sides, check_loss
from ._spaces import SPACES
from .kernels import Backend, choose_backend

__all__ = ["EMA_KEY", "GRUOptimizer", "PlainStepWarning", "RetainPass"]

_DEVICE_FOUND_INF = ("Adam", "AdamW", "SGD", "Adagrad")
_DEFAULT_GAMMA = 0.8
"""The authors' ``gamma``: the value of a group that has none when none is given."""

PlainSteps = Literal["warn", "error", "allow"]
_PLAIN_STEPS: tuple[str, ...] = ("warn", "error", "allow")


class PlainStepWarning(UserWarning):
    """A ``GRUOptimizer.step()`` rectified nothing because no retain gradient was given
    (no ``retain_closure``, no ``retain_pass()`` before it): it was the inner optimizer's
    plain step. Issued once per optimizer; ``GRUOptimizer(plain_steps="allow")`` silences
    it for deliberate plain steps, ``plain_steps="error"`` raises instead. Filter it like
    any warning: ``warnings.filterwarnings("ignore", category=PlainStepWarning)``."""


# The live GRUOptimizer around each inner optimizer (weak references both ways: a
# wrapper that was garbage-collected, or an inner optimizer that was, leaves no entry).
_OWNERS: weakref.WeakKeyDictionary[Optimizer, weakref.ref[GRUOptimizer]] = (
    weakref.WeakKeyDictionary()
)


def _gru_inside(optimizer: Any) -> bool:
    """Whether a GRUOptimizer sits inside ``optimizer`` (Accelerate's
    ``AcceleratedOptimizer`` or any wrapper exposing ``.optimizer``)."""
    for _ in range(8):
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return False
        if isinstance(optimizer, GRUOptimizer):
            return True
    return False


def _check_plain_steps(value: Any) -> None:
    if not isinstance(value, str) or value not in _PLAIN_STEPS:
        raise ValueError(
            f"plain_steps must be one of {', '.join(map(repr, _PLAIN_STEPS))}, got {value!r}"
        )


def _refuse_second_wrapper(optimizer: Optimizer) -> None:
    """Raise when a live GRUOptimizer already wraps ``optimizer``.

    Live means still referenced: a wrapper dropped with ``del`` (or by rebinding its name)
    does not block, even while it waits in a reference cycle for the garbage collector,
    which runs once here to decide.
    """
    ref = _OWNERS.get(optimizer)
    if ref is None or ref() is None:
        return
    gc.collect()
    if ref() is None:
        return
    raise RuntimeError(
        f"this {type(optimizer).__name__} is already wrapped by a GRUOptimizer that is "
        "still in use: two wrappers would fold their retain gradients into the same "
        "parameter groups and inner state. Keep using the first one (change its "
        "hyperparameters with opt.gamma = ... or its param_groups), or drop every "
        "reference to it (del opt; an LR scheduler or Trainer holding it counts) before "
        "wrapping again"
    )


_INTERNAL = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def _caller_level() -> int:
    """``stacklevel`` for a warning issued by the caller of this function that names the
    first frame outside gru_optim and torch (the user's ``opt.step()`` line, through
    the step wrappers and LR schedulers' patches)."""
    level = 2
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def _frozen_lr(groups: list[dict[str, Any]]) -> bool:
    """Every group's learning rate is 0 (a step that moves nothing, as
    ``torch.distributed.checkpoint`` takes to create the inner state): decided from Python
    numbers and CPU tensors only, never by a device read."""
    for g in groups:
        lr = g.get("lr")
        if isinstance(lr, Tensor):
            if lr.device.type != "cpu" or lr.numel() != 1 or float(lr) != 0.0:
                return False
        elif not isinstance(lr, numbers.Real) or lr != 0:
            return False
    return True


def _takes_device_found_inf(optimizer: Optimizer) -> bool:
    """torch's fused optimizers skip a step on the device when ``found_inf`` is set on
    them (as ``GradScaler`` does)."""
    return (
        type(optimizer).__name__ in _DEVICE_FOUND_INF
        and type(optimizer).__module__.startswith("torch.optim")
        and all(bool(g.get("fused")) for g in optimizer.param_groups)
    )


class GRUOptimizer(_Sides, Optimizer):
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
            (``1``: no smoothing). Stored per parameter group under ``"gru_gamma"``.
            ``None`` (the default): each group keeps the value it already holds (see
            below), else the authors' ``0.8``.
        granularity: ``"global"`` (the paper): one dot product over all trainable
            parameters; ``"group"``: one per parameter group; ``"tensor"``: one per
            parameter tensor.
        retain_weight: after rectification add this multiple of the current retain
            gradient (the authors' ``+ce`` variant). ``0`` adds nothing. Stored per
            parameter group under ``"gru_retain_weight"``. ``None`` (the default): each
            group keeps the value it already holds, else ``0``.
        space: ``"gradient"`` (the paper) rectifies the gradient before the inner step;
            ``"update"`` rectifies the inner optimizer's actual parameter change, so that
            ``<theta_new - theta_old, m> <= 0`` after the step whatever the
            preconditioning. It keeps one extra parameter-sized buffer (in the
            parameters' dtype).
        cos_clip: ``None`` (the paper's projection) or a cosine threshold in ``[-1, 0]``:
            the authors' partial projection, which removes only the part of a conflict
            beyond that cosine (they use ``-0.5``). Stored per parameter group under
            ``"gru_cos_clip"``.
        directions: ``1`` (the paper) or ``k`` up to 16 (GRU-k): rectify against the
            memory and the ``k - 1`` most recent raw retain gradients at once, the
            projection onto the cone they span (:class:`~gru_optim.rules.Cone`). Keeps
            ``k - 1`` extra parameter-sized buffers in ``ema_dtype``.
        rule: a :class:`~gru_optim.rules.Rule` instance instead of the three above.
        max_grad_norm: clip the final gradient (the rectified forget gradient plus what
            is added after rectification) to this global norm right before the inner
            step, as the authors' Trainer does; ``None`` does not clip. Clip here, not
            between ``backward`` and ``step()``.
        ema_dtype: dtype of the memory. ``None``: float32, or the parameter's dtype when
            that is float64. ``torch.bfloat16`` halves its memory.
        skip_nonfinite: skip a step when anything it computes is not finite (see
            :meth:`step`); the reason is in ``last_stats["skip_reason"]``. On an
            accelerator this costs one host synchronisation per retain side and one per
            step; ``False`` makes the step free of host synchronisation and lets
            non-finite values through as the inner optimizer would.
        foreach: use the multi-tensor (``torch._foreach_*``) kernels; ``None`` picks them
            whenever the tensors allow.
        fused: the fused Triton kernels (one launch per pass over all tensors of a dtype
            group, sums in float64, skip decisions on the device: no host
            synchronisation in a step with a fused torch inner optimizer, at most one
            otherwise). ``None``: on CUDA when Triton is importable and the rule has a
            fused path (the projection and cos clip in gradient space), and on CPU the
            same passes as compiled C++ (``gru_optim.kernels``, built on first use with
            the system compiler; the foreach path where none is found or the build
            fails, with a ``gru_optim.KernelFallbackWarning`` once, and while
            ``TRITON_INTERPRET=1`` is set); ``True`` on CPU tensors runs the Triton
            kernels under Triton's interpreter and needs ``TRITON_INTERPRET=1``;
            ``False``: the foreach path. :attr:`kernels` says which path runs.
        grad_scaler: the ``torch.amp.GradScaler`` (or FSDP's ``ShardedGradScaler``) whose
            ``scaler.scale(loss).backward()`` produced the gradients (fp16 training).
            GRU then unscales the retain gradient before it enters the memory and the
            forget gradient before the rectification (each exactly once, through
            ``scaler.unscale_``; a forget gradient the caller already unscaled is not
            unscaled again), and skips a step on overflow whatever ``skip_nonfinite``
            says. Call ``opt.step(...)`` or ``scaler.step(opt, ...)``, then
            ``scaler.update()`` once per iteration as usual: GRU never calls it.
        plain_steps: what a step that rectifies nothing because it was given no retain
            gradient (no ``retain_closure``, no :meth:`retain_pass` before it) does:
            ``"warn"`` (once per optimizer, a :class:`~gru_optim.PlainStepWarning`),
            ``"error"`` (raises ``RuntimeError`` before anything changes) or ``"allow"``
            (deliberate plain steps, e.g. warm-up steps or a pass-through test). A step
            with every learning rate 0 (how ``torch.distributed.checkpoint`` creates the
            inner state) is never reported.

    Hyperparameters already in the inner optimizer's groups (``gru_gamma``,
    ``gru_retain_weight``, ``gru_cos_clip``: an optimizer that loaded a GRU checkpoint,
    or was wrapped before): a value given here wins and is written into every group; a
    value not given (``None``) is each group's own, and groups without one (and groups
    added later) take the value the others agree on, else the default. The rule's
    hyperparameter (``cos_clip``) comes with the rule chosen here. Everything is
    validated before anything is written: a refused call leaves the inner optimizer as
    it was. One inner optimizer has at most one live wrapper: wrapping it again while
    the first ``GRUOptimizer`` is still referenced raises (``del`` the first one, and
    whatever holds it, to re-wrap); a deep copy or an unpickled wrapper holds its own
    copy of the inner optimizer.

    Use it with closures::

        opt.zero_grad()
        opt.step(forget_closure, retain_closure)

    or without (training loops that call ``backward`` themselves)::

        with opt.retain_pass():
            retain_loss.backward()
        forget_loss.backward()
        opt.step()

    ``step()`` with no retain closure and no pending retain pass is exactly the inner
    optimizer's step (reported once, see ``plain_steps``).
    """

    # GradScaler.step(opt, ...) hands the step to an optimizer with this flag instead of
    # unscaling first; GRU unscales itself, after its closures ran (see _amp.py).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        gamma: float | None = None,
        granularity: Granularity = "global",
        retain_weight: float | None = None,
        space: str = "gradient",
        cos_clip: float | None = None,
        directions: int = 1,
        rule: Rule | None = None,
        max_grad_norm: float | None = None,
        ema_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        grad_scaler: Any = None,
        plain_steps: PlainSteps = "warn",
        **inner_options: Any,
    ) -> None:
        # inner_options only catches the inner optimizer's options given here by mistake
        # (GRUOptimizer(model.parameters(), lr=1e-3)), to say what to do instead.
        if isinstance(optimizer, GRUOptimizer):
            raise TypeError("the optimizer is already a GRUOptimizer; wrap the inner one once")
        if _gru_inside(optimizer):
            raise TypeError(
                f"the optimizer ({type(optimizer).__name__}) already wraps a GRUOptimizer "
                "(as its .optimizer): GRU would rectify twice, the inner one with no retain "
                "pass; wrap the plain optimizer once and use that GRUOptimizer"
            )
        given_options = ", ".join(f"{k}=" for k in inner_options)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "GRUOptimizer wraps a torch.optim.Optimizer instance, got "
                f"{type(optimizer).__name__}"
                + (f" and the option(s) {given_options}" if given_options else "")
                + "; build the optimizer with its own options first, e.g. "
                "GRUOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))"
            )
        if inner_options:
            raise TypeError(
                f"GRUOptimizer got unexpected keyword argument(s) {given_options}: the "
                "wrapped optimizer's options (lr, betas, ...) go to it when you build it; see "
                "help(GRUOptimizer) for GRU's own (gamma, granularity, ...)"
            )
        if isinstance(optimizer, torch.optim.SparseAdam):
            raise TypeError(
                "SparseAdam steps only sparse gradients, and the rectified gradient "
                "g - c * m is dense (the retain memory m is): wrap an optimizer that accepts "
                "dense gradients (torch.optim.Adam, AdamW, SGD, ...); GRU densifies sparse "
                "gradients (nn.Embedding(sparse=True)) itself"
            )
        # Everything is validated before anything is written (into the inner optimizer's
        # groups or the registry of wrappers): a refused call changes nothing.
        _refuse_second_wrapper(optimizer)
        given: dict[str, Any] = {}
        if gamma is not None:
            given[GAMMA_KEY] = check_gamma(gamma)
        if retain_weight is not None:
            given[RETAIN_WEIGHT_KEY] = check_retain_weight(retain_weight)
        _check_plain_steps(plain_steps)
        if granularity not in PARTITIONS:
            raise ValueError(
                f"granularity must be one of {', '.join(map(repr, PARTITIONS))}, "
                f"got {granularity!r}"
            )
        if space not in SPACES:
            raise ValueError(f"space must be 'gradient' or 'update', got {space!r}")
        rule = make_rule(directions=directions, cos_clip=cos_clip, rule=rule)
        self._rule: Rule = rule
        if max_grad_norm is not None:
            max_grad_norm = real("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
        for name, flag in (("skip_nonfinite", skip_nonfinite),):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
        self._inner = optimizer
        history = rule.directions - 1 if isinstance(rule, Cone) else 0
        self._memory = RetainMemory(ema_dtype, history=history)
        self._amp = AmpBoundary(grad_scaler, self)
        self.granularity: str = granularity
        self.space: str = space
        self.max_grad_norm: float | None = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.foreach = foreach
        self._backend = self._resolve_fused(fused, optimizer)
        self._fused = self._backend is not Backend.FOREACH
        self._device_skip = self._fused and _takes_device_found_inf(optimizer)
        # The rule's hyperparameters come with the rule chosen here: given explicitly.
        given.update(self._rule.defaults())
        self._hdefaults, planned = plan_groups(
            optimizer.param_groups,
            given,
            {GAMMA_KEY: _DEFAULT_GAMMA, RETAIN_WEIGHT_KEY: 0.0},
        )
        self._closure_driven = needs_closure(optimizer)
        self._plain_steps: PlainSteps = plain_steps
        self._warned_plain = False
        self._update_buffers: dict[Any, Tensor] = {}
        self._pending: Pending | None = None
        self._warned_dropped = False
        self._in_forget_closure = False
        self._in_retain_pass = False
        self._last_stats: dict[str, Tensor] = {}
        n = len(optimizer.param_groups)
        self._check_combinations(
            check_values(planned, self._rule_checks(), [f" (param_groups[{i}])" for i in range(n)])
        )
        for group, values in zip(optimizer.param_groups, planned):
            group.update(values)
        # Optimizer.__init__ installs the hook dictionaries and patches step for hooks and
        # profiling; while it runs, its writes to param_groups/state/defaults are ignored
        # (they belong to the inner optimizer).
        self._initializing = True
        try:
            super().__init__(optimizer.param_groups, optimizer.defaults)
        finally:
            self._initializing = False
        _OWNERS[optimizer] = weakref.ref(self)

    def _resolve_fused(self, fused: bool | None, optimizer: Optimizer) -> Backend:
        """Where the passes run: :func:`gru_optim.kernels.choose_backend`'s answer, once
        (raises for ``fused=True`` where the fused kernels cannot run)."""
        return choose_backend(
            fused,
            {p.device for g in optimizer.param_groups for p in g["params"]},
            supported=isinstance(self._rule, OneDirection) and self.space == "gradient",
        )

    def _real(self) -> GRUOptimizer:
        """This optimizer, also when a method is called through a wrapper that copied its
        ``__dict__`` (PyTorch Lightning's ``LightningOptimizer`` subclasses it on the fly
        and keeps the original as ``_optimizer``): state written through the wrapper would
        stay on the wrapper, so every stateful method works on the original."""
        inner = self.__dict__.get("_optimizer")
        return inner if isinstance(inner, GRUOptimizer) and inner is not self else self

    @property
    def last_stats(self) -> dict[str, Tensor]:
        """What the last step did, as 0-dim tensors on the device (see the quickstart's
        table; ``gru_optim._stats`` documents every key)."""
        stats: dict[str, Tensor] = self._real().__dict__["_last_stats"]
        return stats

    @last_stats.setter
    def last_stats(self, value: dict[str, Tensor]) -> None:
        self._real().__dict__["_last_stats"] = value

    @property
    def kernels(self) -> str:
        """Which path the projection's passes run: ``"triton"`` (the fused kernels, on a
        GPU or under Triton's interpreter), ``"cpu"`` (the same passes as compiled C++)
        or ``"foreach"`` (torch's multi-tensor operations: GRU-k, update space, custom
        rules, ``fused=False``, or no compiler)."""
        return self._real()._backend.value

    # ------------------------------------------------------------------ delegation
    def __getattr__(self, name: str) -> Any:
        """Public attributes of the inner optimizer that this class does not define
        (schedule-free's ``train()`` / ``eval()``, Lookahead's ``backup_and_load_cache()``,
        ...), so that training loops that look for them on the optimizer (``hasattr(opt,
        "train")``: the HF Trainer, ``GRUTrainer``) find them. Only called when normal
        lookup fails; private names are never delegated, and nothing is found before
        ``__init__`` set the inner optimizer (unpickling, ``copy``). Calling an inner
        method bypasses GRU: methods that step are GRU's own (``step``)."""
        if name.startswith("_"):
            raise AttributeError(name)
        # Through _real() (which reads __dict__ only): Lightning's LightningOptimizer
        # keeps the original as _optimizer.
        inner = self._real().__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def _check_ready(self) -> None:
        """Refuse a GRU step that would fail part-way, before anything changes: one the
        inner optimizer would refuse, or complex parameters under a gradient scaler."""
        reason = not_ready(self._inner)
        if reason is not None:
            raise RuntimeError(reason)
        if self._amp.scaler is not None and any(p.is_complex() for p in self._trainable()):
            raise RuntimeError(
                "torch's GradScaler does not unscale complex gradients "
                "(_amp_foreach_non_finite_check_and_unscale_ is not implemented for complex "
                "dtypes): train complex parameters without grad_scaler (bf16 autocast or fp32)"
            )

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if not self.__dict__.get("_initializing", False):
            self._inner.param_groups = value

    @property
    def state(self) -> Any:
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        if not self.__dict__.get("_initializing", False):
            self._inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        if not self.__dict__.get("_initializing", False):
            self._inner.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the inner optimizer (GRU's keys default to the values
        this optimizer was built with).

        Validated first (GRU's values in the group, and their combination with the other
        groups'): a refused group is not added and nothing changes. Refused between a
        retain side and its ``step()``, as :meth:`state_dict` is: the memory is then one
        fold ahead and the step would treat the new parameters' gradients wrongly."""
        if self.__dict__.get("_initializing", False):
            return
        real = self._real()
        if real is not self:
            real.add_param_group(param_group)
            return
        if self._pending is not None or self._in_retain_pass or self._in_forget_closure:
            raise RuntimeError(
                "add_param_group() between retain_pass() (or a retain closure) and step(): "
                "the memory is one fold ahead and the step would take the new parameters' "
                "retain gradient (or none) for a forget gradient; add the group after "
                "step() (or before the retain pass)"
            )
        groups = self._inner.param_groups
        hypers = check_values(
            group_values(groups, self._hdefaults),
            self._rule_checks(),
            [f" (param_groups[{i}])" for i in range(len(groups))],
        )
        if isinstance(param_group, dict):
            (values,) = group_values([param_group], self._hdefaults)
            hypers += check_values([values], self._rule_checks(), [" (the new parameter group)"])
            self._check_combinations(hypers)
        self._inner.add_param_group(param_group)
        fill_groups(self._inner.param_groups[-1:], self._hdefaults)

    # ------------------------------------------------------------------ hyperparameters
    def _uniform(self, key: str) -> Any:
        values = [g.get(key, self._hdefaults[key]) for g in self.param_groups]
        if any(v != values[0] for v in values):
            raise ValueError(
                f"{key} differs between parameter groups; read param_groups[i][{key!r}]"
            )
        return values[0]

    @property
    def gamma(self) -> float:
        """``gamma`` of every parameter group (set it to change all of them)."""
        return float(self._uniform(GAMMA_KEY))

    @gamma.setter
    def gamma(self, value: float) -> None:
        value = check_gamma(value)
        for g in self.param_groups:
            g[GAMMA_KEY] = value

    @property
    def retain_weight(self) -> float:
        """``retain_weight`` of every parameter group (set it to change all of them)."""
        return float(self._uniform(RETAIN_WEIGHT_KEY))

    @retain_weight.setter
    def retain_weight(self, value: float) -> None:
        value = check_retain_weight(value)
        self._check_combinations([Hyper(1.0, value, {})])
        for g in self.param_groups:
            g[RETAIN_WEIGHT_KEY] = value

    @property
    def rule(self) -> Rule:
        """The rectification rule."""
        return self._rule

    @property
    def plain_steps(self) -> PlainSteps:
        """What a step given no retain gradient does: ``"warn"``, ``"error"`` or
        ``"allow"`` (see the constructor); settable."""
        value: PlainSteps = self._real().__dict__["_plain_steps"]
        return value

    @plain_steps.setter
    def plain_steps(self, value: PlainSteps) -> None:
        _check_plain_steps(value)
        self._real().__dict__["_plain_steps"] = value

    @property
    def ema_dtype(self) -> torch.dtype | None:
        return self._memory.dtype

    @property
    def grad_scaler(self) -> Any:
        return self._amp.scaler

    # ------------------------------------------------------------------ zero_grad, pickling
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``; also discards a retain pass not yet used
        (with a warning, once).

        Inside the forget closure of ``step(forget_closure, retain_closure)`` and before
        its ``backward`` (closures written the torch way, ``zero_grad()`` first), it leaves
        the gradients alone: they hold only what the retain side left (nothing, or
        ``retain_weight`` times the retain gradient), which the step still needs.
        """
        real = self._real()
        if real is not self:
            real.zero_grad(set_to_none)
            return
        pending = self._pending
        if pending is not None:
            if self._in_forget_closure:
                if signature(self._trainable()) == pending.signature:
                    return
                raise RuntimeError(
                    "zero_grad() inside the forget closure after its backward would discard "
                    "the forget gradient (and what the retain side left in .grad): call it "
                    "first in the closure, before backward, or not at all"
                )
            if not self._warned_dropped:
                self._warned_dropped = True
                # It announces the plain step that follows: that step does not warn again.
                self._warned_plain = True
                warnings.warn(
                    "zero_grad() discarded a retain pass that no step() used: the next step "
                    "is a plain, unrectified step (last_stats['rectified'] is False). Call "
                    "zero_grad() before the retain pass, not between it and step().",
                    PlainStepWarning,
                    stacklevel=2,
                )
            self._discard_pending()
        self._inner.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        if self.__dict__.get("_pending") is not None:
            raise RuntimeError(
                "copying or pickling a GRUOptimizer between retain_pass() and step(): the "
                "copy's memory would be one fold ahead and its next step a plain one; copy "
                "after step() (or before the retain pass)"
            )
        # Like torch's Optimizer, leave out the hooks and what an LR scheduler attaches to
        # the instance (``step`` wrapped with a weak reference to *this* optimizer, and
        # ``_opt_called``): a copy must step itself, not the original. A pending retain
        # pass (autograd hooks on the original's parameters) is not copied either.
        return {
            k: (None if k == "_pending" else v)
            for k, v in self.__dict__.items()
            if not k.startswith("_optimizer_") and k not in ("step", "_opt_called")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["_initializing"] = False
        state.setdefault("_plain_steps", "warn")
        state.setdefault("_warned_plain", False)
        super().__setstate__(state)
        # A deep copy or an unpickled optimizer wraps its own copy of the inner one.
        inner = state.get("_inner")
        if isinstance(inner, Optimizer):
            ref = _OWNERS.get(inner)
            if ref is None or ref() is None:
                _OWNERS[inner] = weakref.ref(self)

    def _check_plain_step(self) -> None:
        """A step with no retain gradient is the inner optimizer's plain step: warn once
        (``plain_steps="warn"``), raise (``"error"``) or say nothing (``"allow"``). A step
        with every learning rate 0 moves nothing and is not reported."""
        if self.plain_steps == "allow" or (self.plain_steps == "warn" and self._warned_plain):
            return
        if _frozen_lr(self._inner.param_groups):
            return
        message = (
            "GRUOptimizer.step() got no retain gradient (no retain_closure, and no "
            "retain_pass() before it), so it rectified nothing: it was the inner "
            f"{type(self._inner).__name__}'s plain step. Give the retain loss with "
            "opt.step(forget_closure, retain_closure), or back-propagate it inside "
            "`with opt.retain_pass():` before the forget loss's backward and step(). For "
            "deliberate plain steps build GRUOptimizer(..., plain_steps='allow')"
        )
        if self.plain_steps == "error":
            raise RuntimeError(message + " (this optimizer has plain_steps='error')")
        self._warned_plain = True
        warnings.warn(
            message + " (warned once per optimizer; plain_steps='error' raises instead)",
            PlainStepWarning,
            stacklevel=_caller_level(),
        )

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self._inner).splitlines())
        return (
            f"GRUOptimizer(rule={self._rule.name}, granularity={self.granularity!r}, "
            f"space={self.space!r}, max_grad_norm={self.max_grad_norm},\n{inner}\n)"
        )

    # ------------------------------------------------------------------ retain side
    def retain_pass(
        self, loss: Tensor | None = None
    ) -> contextlib.AbstractContextManager[RetainPass]:
        """Context in which the retain loss is back-propagated (the closure-free path).

        On entry the gradients are cleared (what is there belongs to no pass of this
        step). On exit the retain gradient (everything accumulated inside, so
        micro-batches may loop in it) is folded into the memory and the gradients are set
        to ``None``, ready for the forget loss's ``backward`` and :meth:`step`. The
        losses given as ``loss`` or to the yielded handle's :meth:`RetainPass.record`
        (summed) are only recorded for :attr:`last_stats`::

            with opt.retain_pass() as rp:
                loss = retain_loss_fn()
                loss.backward()
                rp.record(loss)
        """
        return _EagerContext(lambda: self._retain_pass(loss))

    @contextlib.contextmanager
    def _retain_pass(self, loss: Tensor | None) -> Iterator[RetainPass]:
        real = self._real()
        if real is not self:
            with real.retain_pass(loss) as handle:
                yield handle
            return
        if self._closure_driven:
            raise RuntimeError(
                f"{type(self._inner).__name__} needs closures: use "
                "opt.step(forget_closure, retain_closure) instead of retain_pass()"
            )
        if self._pending is not None or self._in_retain_pass:
            raise RuntimeError(
                "retain_pass entered twice before step(): put all retain micro-batches in "
                "one retain_pass, then back-propagate the forget loss and call step()"
            )
        hypers = self._read_hyper()
        self._check_ready()
        handle = RetainPass(check_loss(loss, "retain_pass loss") if loss is not None else None)
        self._in_retain_pass = True
        try:
            with self._retain_side(
                hypers,
                "no gradient was computed inside retain_pass(): "
                "call backward on the retain loss inside the with-block",
            ) as record:
                yield handle
                record(handle.loss)
        finally:
            self._in_retain_pass = False

    def post_pass(self) -> contextlib.AbstractContextManager[None]:
        """Context for a gradient added after rectification, unprojected (the authors'
        ``+KL``), in the closure-free path: between :meth:`retain_pass` and the forget
        loss's ``backward``::

            with opt.retain_pass():
                retain_nll.backward()
            with opt.post_pass():
                (kl_weight * retain_kl).backward()
            forget_loss.backward()
            opt.step()

        The memory keeps only the retain pass's gradient. No extra buffer: the post
        gradient stays in ``.grad`` and the rule rectifies only what the forget backward
        adds on top (``retain_weight`` is the special case of ``retain_weight`` times the
        retain gradient). An exception inside discards the retain pass.
        """
        return _EagerContext(self._post_pass)

    @contextlib.contextmanager
    def _post_pass(self) -> Iterator[None]:
        real = self._real()
        if real is not self:
            with real.post_pass():
                yield
            return
        try:
            with self._post_side() as record:
                yield
                record(None)
        except BaseException:
            self._discard_pending()
            raise

    # ------------------------------------------------------------------ step
    def step(
        self,
        closure: Closure | None = None,
        retain_closure: Closure | None = None,
        post_closure: Closure | None = None,
    ) -> Any:
        """One optimizer step.

        - ``step(forget_closure, retain_closure)``: clears the gradients, runs the retain
          closure, folds its gradient into the memory, clears the gradients again (with
          ``retain_weight`` they keep that multiple of the retain gradient), runs
          ``post_closure`` if given (a gradient added after rectification, unprojected:
          the authors' ``+KL``), runs the forget closure, rectifies the gradients in
          place, clips them (``max_grad_norm``) and steps the inner optimizer. Each
          closure computes its loss, calls ``backward`` and returns the loss. Returns the
          forget loss.
        - ``step()`` (or ``step(forget_closure)``) after a :meth:`retain_pass`: rectifies
          the gradients present now (computed by ``forget_closure`` if given) and steps.
        - ``step()`` / ``step(closure)`` otherwise: exactly the inner optimizer's step
          (``last_stats["rectified"]`` is ``False``), a :class:`~gru_optim.PlainStepWarning`
          the first time (``plain_steps``).

        A step is skipped (with ``skip_nonfinite``, or always under a gradient scaler)
        when anything it computes is not finite or out of range: the retain or forget
        gradient, the memory, a dot product, a coefficient. The weights and the inner
        state are then untouched and ``last_stats["skip_reason"]`` says why
        (:class:`~gru_optim.SkipReason`). The memory is left untouched when the retain
        gradient is the cause; otherwise it keeps this step's (finite) retain gradient,
        measured at the unchanged weights.

        Errors are raised before the weights or the inner state change, and leave the
        optimizer ready for the same call again. An error found after the retain
        gradient was folded in (a forget closure that raises or computes no gradient)
        leaves the memory holding that fold: a retry folds the retain gradient of the
        same weights once more (one more step of the moving average). Undoing the fold
        would need a second parameter-sized buffer.
        """
        real = self._real()
        if real is not self:
            return real.step(closure, retain_closure, post_closure)
        for name, fn in (
            ("closure", closure),
            ("retain_closure", retain_closure),
            ("post_closure", post_closure),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable (a closure), got {type(fn).__name__}")
        self._amp.reject_scaler_step(self)
        if retain_closure is None and post_closure is None and self._pending is None:
            self._check_plain_step()
            return self._plain_step(closure)
        if retain_closure is not None and self._pending is not None:
            raise RuntimeError(
                "step() got a retain_closure after a retain_pass(); use one or the other"
            )
        hypers = self._read_hyper()
        self._check_combinations(hypers)
        # Everything that can be refused is refused here, before the retain side folds.
        self._check_ready()
        if self._closure_driven:
            if closure is None:
                raise RuntimeError(
                    f"{type(self._inner).__name__} needs the forget closure: "
                    "opt.step(forget_closure, retain_closure)"
                )
            if post_closure is not None:
                raise ValueError(
                    f"{type(self._inner).__name__} re-evaluates its closure inside step(): "
                    "GRU supports it without a post_closure"
                )
        if post_closure is not None:
            self._check_post()
        try:
            if retain_closure is not None:
                with (
                    self._retain_side(
                        hypers,
                        "the retain closure computed no gradient: it must "
                        "call loss.backward() and return the loss",
                    ) as record,
                    torch.enable_grad(),
                ):
                    record(check_loss(retain_closure(), "retain closure"))
            if self._closure_driven:
                assert closure is not None
                return self._closure_driven_step(closure, hypers)
            if post_closure is not None:
                with self._post_side() as record, torch.enable_grad():
                    record(check_loss(post_closure(), "post_closure"))
            pending = self._pending
            assert pending is not None
            loss = self._run_forget(closure) if closure is not None else None
            self._forget_side(pending, loss, hypers)
            return loss
        finally:
            self._discard_pending()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, each parameter's entry holding its memory
        under :data:`EMA_KEY`, GRU's hyperparameters in the parameter groups. Loads into
        a plain inner optimizer after dropping that key.

        Every trainable parameter has an entry, zeros before its first retain gradient
        (``m_0 = 0``), so that a template taken from a fresh optimizer (as
        ``torch.distributed.checkpoint`` loads in place) has the keys to load the memory
        into. :meth:`load_state_dict` reads an all-zero memory as no memory.

        Raises between a retain side and its ``step()``: the memory is then one fold
        ahead of the weights, and what the step still needs sits in ``.grad``, which no
        checkpoint holds. Save after ``step()``.
        """
        real = self._real()
        if real is not self:
            return real.state_dict()
        if self._pending is not None:
            raise RuntimeError(
                "state_dict() between retain_pass() and step(): the memory is one fold ahead "
                "of the weights and the step's gradients are not in a checkpoint; save after "
                "step() (or before the retain pass)"
            )
        return save_state(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` or from the plain inner optimizer
        (the memory then starts empty). Everything is validated first: on any error
        nothing has changed."""
        real = self._real()
        if real is not self:
            real.load_state_dict(state_dict)
            return
        if self._pending is not None or self._in_retain_pass:
            raise RuntimeError(
                "load_state_dict() between retain_pass() and step(): the retain pass would "
                "be lost silently; load before the retain pass (or after step())"
            )
        load_state(self, state_dict)

    # ------------------------------------------------------------------ introspection
    def retain_memory(self, p: Tensor) -> Tensor | None:
        """The retain memory ``m`` of parameter ``p`` (``None`` before its first retain
        gradient). The tensor is the live buffer: do not modify it."""
        return self._memory.get(p)

    def retain_history(self, p: Tensor) -> list[Tensor]:
        """The ``directions - 1`` most recent raw retain gradients of ``p`` (GRU-k), oldest
        first (zeros before they exist; ``[]`` with ``directions=1``). Views of the live
        buffers: do not modify them."""
        return self._memory.history_of(p) if self._memory.history else []


# torch.compile: a compiled function that calls step() runs it eagerly (one graph break,
# hooks included), so that its bookkeeping across the retain and forget sides is never
# split between graphs. Importing torch._dynamo at import time makes gloo process groups
# hang at exit now and then (torch 2.13), so the eager wrapper is made only once dynamo
# is compiling. The function is marked as hooked: Optimizer.__init__ leaves it alone.
_hooked = Optimizer.profile_hook_step(GRUOptimizer.step)
_eager: dict[str, Callable[..., Any]] = {}


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _disabled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if name not in _eager:
        _eager[name] = torch.compiler.disable(fn)  # type: ignore[no-untyped-call]
    return _eager[name]


def _eagerly(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, run eagerly (a graph break) when dynamo is compiling."""
    if torch.compiler.is_compiling():
        return _disabled("call", _call)(fn, *args)
    return fn(*args)


class _EagerContext(contextlib.AbstractContextManager):  # type: ignore[type-arg]
    """The retain and post passes as context managers whose entry and exit always run
    eagerly: inside a compiled function their bookkeeping (the pending retain record,
    the fold) would otherwise be traced and lost across graph breaks, and the next
    ``step()`` would be a plain one."""

    def __init__(self, make: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        self._make = make
        self._cm: contextlib.AbstractContextManager[Any] | None = None

    def __enter__(self) -> Any:
        return _eagerly(self._enter)

    def _enter(self) -> Any:
        self._cm = self._make()
        return self._cm.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return _eagerly(self._exit, *exc)

    def _exit(self, *exc: Any) -> Any:
        cm, self._cm = self._cm, None
        assert cm is not None
        return cm.__exit__(*exc)


def _step(self: GRUOptimizer, *args: Any, **kwargs: Any) -> Any:
    if torch.compiler.is_compiling():
        return _disabled("step", _hooked)(self, *args, **kwargs)
    return _hooked(self, *args, **kwargs)


functools.update_wrapper(_step, GRUOptimizer.step)
_step.hooked = True  # type: ignore[attr-defined]
GRUOptimizer.step = _step  # type: ignore[method-assign]
