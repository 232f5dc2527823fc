"""``GRUOptimizer``: the public API of GRU around a torch optimizer (a thin shell).

It delegates ``param_groups``, ``state`` and ``defaults`` to the inner optimizer, and
everything GRU does to an :class:`~gru_optim.engine._engine.Engine` (the memory, the rule,
the partition, the AMP boundary, the statistics) driven over the inner optimizer's
parameters by :class:`~gru_optim.engine._param_sides.ParamSides`. ``docs/design.md``
draws it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .engine._build import param_engine
from .engine._engine import Closure
from .engine._groups import (
    GAMMA_KEY,
    NOT_GIVEN,
    RETAIN_WEIGHT_KEY,
    Hyper,
    NotGiven,
    check_gamma,
    check_retain_weight,
)
from .engine._memory import EMA_KEY
from .engine._partition import Granularity
from .engine._pending import RetainPass
from .engine._policy import (
    PlainSteps,
    PlainStepWarning,
    check_plain_steps,
    check_wrappable,
    register_wrapper,
)
from .engine._state_dict import load_state, save_state
from .rules import Rule

__all__ = ["EMA_KEY", "GRUOptimizer", "PlainStepWarning", "RetainPass"]

# torch.compile: a compiled function that calls step() runs it eagerly (one graph break,
# hooks included), so that its bookkeeping across the retain and forget sides is never
# split between graphs. Importing torch._dynamo at import time makes gloo process groups
# hang at exit now and then (torch 2.13), so the eager wrapper is made only once dynamo
# is compiling.
_eager: dict[str, Callable[..., Any]] = {}


def _disabled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if name not in _eager:
        _eager[name] = torch.compiler.disable(fn)  # type: ignore[no-untyped-call]
    return _eager[name]


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _eagerly(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, run eagerly (a graph break) when dynamo is compiling."""
    if torch.compiler.is_compiling():
        return _disabled("call", _call)(fn, *args)
    return fn(*args)


def _hooked_eager_step(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` as ``Optimizer.__init__`` would wrap it (profiling, the global and the
    instance's step hooks), run eagerly under ``torch.compile``; marked as hooked, so that
    ``Optimizer`` leaves it alone and an LR scheduler wraps this one."""
    hooked = Optimizer.profile_hook_step(fn)

    @functools.wraps(fn)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return _disabled("step", hooked)(self, *args, **kwargs)
        return hooked(self, *args, **kwargs)

    step.hooked = True  # type: ignore[attr-defined]
    return step


def _inner_attr(name: str) -> Any:
    """A property of the inner optimizer's: ``Optimizer.__init__``'s own writes to it,
    while the shell is built, are ignored."""

    def get(self: Any) -> Any:
        return getattr(self._inner, name)

    def set_(self: Any, value: Any) -> None:
        if not self.__dict__.get("_initializing", False):
            setattr(self._inner, name, value)

    return property(get, set_, doc=f"The inner optimizer's ``{name}``.")


def _engine_attr(
    name: str, doc: str, part: str = "_engine", check: Callable[[Any], Any] | None = None
) -> Any:
    """A setting the engine (or its ``part``) reads at each step, settable between steps
    (validated by ``check``)."""

    def set_(self: Any, value: Any) -> None:
        setattr(getattr(self, part), name, value if check is None else check(value))

    return property(lambda self: getattr(getattr(self, part), name), set_, doc=doc)


def _group_setting(key: str, check: Callable[[Any], float], what: str) -> Any:
    """A hyperparameter kept in every parameter group: reads the common value (raises if
    the groups differ), sets all of them (validated first)."""

    def get(self: Any) -> float:
        values = [g.get(key, self._engine.hdefaults[key]) for g in self.param_groups]
        if any(v != values[0] for v in values):
            raise ValueError(
                f"{key} differs between parameter groups; read param_groups[i][{key!r}]"
            )
        return float(values[0])

    def set_(self: Any, value: float) -> None:
        value = check(value)
        if key == RETAIN_WEIGHT_KEY:
            self._sides.check_combinations([Hyper(1.0, value, {})])
        for g in self.param_groups:
            g[key] = value

    return property(get, set_, doc=f"{what} of every parameter group (set: all of them).")


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


class GRUOptimizer(Optimizer):
    r"""Gradient Rectified Unlearning around any ``torch.optim`` optimizer.

    Keeps ``m_t = gamma * g_r + (1 - gamma) * m_{t-1}`` (``m_0 = 0``) of the retain
    gradient, and before each inner step replaces the forget gradient ``g`` by the closest
    vector not in conflict with ``m``: ``g - min(<g, m>, 0) / ||m||^2 * m``.

    Args:
        optimizer: the optimizer to wrap (an instance); ``param_groups``, ``state`` and
            ``defaults`` are its own objects.
        gamma: weight of the new retain gradient in the memory, in ``(0, 1]`` (the
            authors' ``0.8``); per group under ``"gru_gamma"``.
        granularity: ``"global"`` (the paper: one dot product), ``"group"`` or ``"tensor"``.
        retain_weight: add this multiple of the retain gradient after rectification (the
            authors' ``+ce``); per group under ``"gru_retain_weight"``.
        space: ``"gradient"`` (the paper) or ``"update"`` (rectify the inner optimizer's
            actual parameter change; one extra parameter-sized buffer).
        cos_clip: ``None`` (the projection) or a cosine threshold in ``[-1, 0]`` (partial
            projection; per group under ``"gru_cos_clip"``). Not given: the groups' own.
        directions: ``k`` from 1 to 16 (GRU-k, :class:`~gru_optim.rules.Cone`).
        rule: a :class:`~gru_optim.rules.Rule` instance instead of the three above.
        max_grad_norm: clip the final gradient to this norm right before the inner step.
        ema_dtype: dtype of the memory (``None``: float32, or float64 for float64 weights).
        skip_nonfinite: skip a step when anything it computes is not finite; ``False``
            makes a step free of host synchronisation.
        foreach: torch's multi-tensor kernels (``None``: wherever the tensors allow).
        fused: the compiled passes (``None``: chosen for the tensors; :attr:`kernels`).
        grad_scaler: the ``torch.amp.GradScaler`` that scaled the losses (fp16): GRU
            unscales each gradient once and skips a step on overflow.
        plain_steps: a step given no retain gradient is the inner optimizer's plain step:
            ``"warn"`` once (:class:`~gru_optim.PlainStepWarning`), ``"error"`` or ``"allow"``.

    Arguments given win over the groups' ``gru_*`` values; those not given are read from
    them, else defaults (``docs/guides/checkpoints.md``). All is validated first. Change
    values in place (``opt.gamma = 0.3``); ``del opt`` before wrapping ``inner`` again.

    ``docs/api/optimizer.md`` says more about each option. Use it with closures,
    ``opt.step(forget_closure, retain_closure)``, or without::

        with opt.retain_pass():
            retain_loss.backward()
        forget_loss.backward()
        opt.step()
    """

    # GradScaler.step(opt, ...) hands the step to an optimizer with this flag instead of
    # unscaling first; GRU unscales itself, after its closures ran (engine/_amp.py).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        gamma: float | None = None,
        granularity: Granularity = "global",
        retain_weight: float | None = None,
        space: str = "gradient",
        cos_clip: float | None | NotGiven = NOT_GIVEN,
        directions: int = 1,
        rule: Rule | None = None,
        max_grad_norm: float | None = None,
        ema_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        grad_scaler: Any = None,
        plain_steps: PlainSteps = "warn",
        **inner_options: Any,  # only to say where an inner optimizer's option goes
    ) -> None:
        check_wrappable(optimizer, inner_options, GRUOptimizer)
        self._inner = optimizer
        self._engine, self._sides = param_engine(
            optimizer,
            self,
            gamma=gamma,
            granularity=granularity,
            retain_weight=retain_weight,
            space=space,
            cos_clip=cos_clip,
            directions=directions,
            rule=rule,
            max_grad_norm=max_grad_norm,
            ema_dtype=ema_dtype,
            skip_nonfinite=skip_nonfinite,
            foreach=foreach,
            fused=fused,
            grad_scaler=grad_scaler,
            plain_steps=plain_steps,
        )
        # Optimizer.__init__ installs the hook dictionaries; while it runs, its writes to
        # param_groups/state/defaults are ignored (they belong to the inner optimizer).
        self._initializing = True
        try:
            super().__init__(optimizer.param_groups, optimizer.defaults)
        finally:
            self._initializing = False
        register_wrapper(optimizer, self)

    def _real(self) -> GRUOptimizer:
        """This optimizer, also through a wrapper that copied its ``__dict__`` (Lightning's
        ``LightningOptimizer`` keeps the original as ``_optimizer``)."""
        inner = self.__dict__.get("_optimizer")
        return inner if isinstance(inner, GRUOptimizer) and inner is not self else self

    # ------------------------------------------------------------------ delegation
    def __getattr__(self, name: str) -> Any:
        """Public attributes of the inner optimizer that this class does not define
        (schedule-free's ``train()`` / ``eval()``, Lookahead's ...), for training loops
        that look for them on the optimizer. Private names are never delegated; a
        delegated method that steps bypasses GRU (``step`` is GRU's own)."""
        inner = self._real().__dict__.get("_inner")
        if name.startswith("_") or inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._inner

    param_groups = _inner_attr("param_groups")
    state = _inner_attr("state")
    defaults = _inner_attr("defaults")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the inner optimizer (GRU's keys default to the values
        this optimizer was built with), validated first; refused between a retain side
        and its ``step()``."""
        if not self.__dict__.get("_initializing", False):
            self._sides.add_group(param_group)

    # ------------------------------------------------------------------ settings
    gamma = _group_setting(GAMMA_KEY, check_gamma, "``gamma``")
    retain_weight = _group_setting(RETAIN_WEIGHT_KEY, check_retain_weight, "``retain_weight``")
    max_grad_norm = _engine_attr("max_grad_norm", "Clip to this norm (``None``: no clip).")
    skip_nonfinite = _engine_attr("skip_nonfinite", "Skip a step when anything is not finite.")
    foreach = _engine_attr("foreach", "Use the multi-tensor kernels (``None``: when possible).")

    plain_steps = _engine_attr(
        "plain_steps",
        "A step given no retain gradient: warn, error or allow.",
        "_sides",
        check_plain_steps,
    )

    granularity = property(lambda self: self._engine.granularity, doc="The partition.")
    space = property(lambda self: self._engine.space, doc="``gradient`` or ``update``.")
    rule = property(lambda self: self._engine.rule, doc="The rectification rule.")
    ema_dtype = property(lambda self: self._engine.memory.dtype, doc="The memory's dtype.")
    grad_scaler = property(lambda self: self._engine.amp.scaler, doc="The gradient scaler.")

    last_stats = _engine_attr("last_stats", "What the last step did, as 0-dim tensors (_stats).")

    @property
    def kernels(self) -> str:
        """Which path the projection's passes run: ``"triton"`` (GPU, or Triton's
        interpreter), ``"cpu"`` (compiled C++) or ``"foreach"``."""
        return str(self._engine.backend.value)

    # ------------------------------------------------------------------ zero_grad, pickling
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``; also discards a retain pass not yet used
        (with a warning, once), except inside the forget closure before its backward,
        where the gradients hold what the retain side left for the step."""
        if self._sides.before_zero_grad():
            self._inner.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        # As torch's Optimizer: no hooks, nor what an LR scheduler attaches (``step``
        # wrapped with a weak reference to *this* optimizer): a copy steps itself. The
        # engine refuses to be copied with a retain pass pending.
        return {
            k: v
            for k, v in self.__dict__.items()
            if not k.startswith("_optimizer_") and k not in ("step", "_opt_called")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["_initializing"] = False
        super().__setstate__(state)
        # A deep copy or an unpickled optimizer wraps its own copy of the inner one.
        register_wrapper(state.get("_inner"), self, if_free=True)

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self._inner).splitlines())
        return (
            f"GRUOptimizer(rule={self.rule.name}, granularity={self.granularity!r}, "
            f"space={self.space!r}, max_grad_norm={self.max_grad_norm},\n{inner}\n)"
        )

    # ------------------------------------------------------------------ the passes, step
    def retain_pass(
        self, loss: Tensor | None = None
    ) -> contextlib.AbstractContextManager[RetainPass]:
        """Context in which the retain loss is back-propagated (the closure-free path):
        on entry the gradients are cleared, on exit everything accumulated inside is
        folded into the memory and the gradients are set to ``None``, ready for the forget
        backward and :meth:`step`. ``loss``, or the handle's :meth:`RetainPass.record`,
        only feed :attr:`last_stats`."""
        return _EagerContext(lambda: self._sides.retain_pass(loss))

    def post_pass(self) -> contextlib.AbstractContextManager[None]:
        """Context for a gradient added after rectification, unprojected (the authors'
        ``+KL``), between :meth:`retain_pass` and the forget backward. It stays in
        ``.grad`` (no buffer); the memory keeps only the retain pass's gradient. An
        exception inside discards the retain pass."""
        return _EagerContext(self._sides.post_pass)

    @_hooked_eager_step
    def step(
        self,
        closure: Closure | None = None,
        retain_closure: Closure | None = None,
        post_closure: Closure | None = None,
    ) -> Any:
        """One optimizer step.

        - ``step(forget_closure, retain_closure, post_closure=None)``: runs the retain
          closure and folds its gradient into the memory, runs ``post_closure`` (kept
          unprojected), then the forget closure, rectifies, clips (``max_grad_norm``) and
          steps the inner optimizer. Each closure calls ``backward`` and returns its loss;
          returns the forget loss.
        - ``step()`` (or ``step(forget_closure)``) after a :meth:`retain_pass`: rectifies
          the gradients present now and steps.
        - otherwise exactly the inner optimizer's step.

        A step is skipped (``skip_nonfinite``, or under a gradient scaler) when anything it
        computes is not finite or out of range: weights and inner state are then untouched
        and ``last_stats["skip_reason"]`` says why. Errors are raised before the weights or
        the inner state change (a fold already made stays in the memory).
        """
        real = self._real()
        if real is not self:
            return real.step(closure, retain_closure, post_closure)
        self._engine.amp.reject_scaler_step(self)
        return self._sides.run(closure, retain_closure, post_closure)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, each trainable parameter's entry holding its
        memory under :data:`EMA_KEY` (zeros before the first fold), GRU's hyperparameters
        in the parameter groups. Raises between a retain side and its ``step()``."""
        if self._engine.pending is not None:
            raise RuntimeError(
                "state_dict() between retain_pass() and step(): the memory is one fold ahead "
                "of the weights and the step's gradients are not in a checkpoint; save after "
                "step() (or before the retain pass)"
            )
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        out = save_state(self._engine, self._sides.source)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` or from the plain inner optimizer
        (the memory then starts empty). Everything is validated first: on any error
        nothing has changed."""
        if self._engine.pending is not None or self._sides.in_retain_pass:
            raise RuntimeError(
                "load_state_dict() between retain_pass() and step(): the retain pass would "
                "be lost silently; load before the retain pass (or after step())"
            )
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        load_state(self._engine, self._sides.source, state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------ introspection
    def retain_memory(self, p: Tensor) -> Tensor | None:
        """The retain memory ``m`` of parameter ``p`` (``None`` before its first retain
        gradient). The tensor is the live buffer: do not modify it."""
        return self._engine.memory.get(p)

    def retain_history(self, p: Tensor) -> list[Tensor]:
        """The ``directions - 1`` most recent raw retain gradients of ``p`` (GRU-k), oldest
        first (zeros before they exist; ``[]`` with ``directions=1``). Views of the live
        buffers: do not modify them."""
        memory = self._engine.memory
        return memory.history_of(p) if memory.history else []
