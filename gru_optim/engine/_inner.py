"""Stepping the wrapped optimizer as a plain training loop would, once.

``torch.optim.Optimizer.__init__`` wraps every optimizer class's ``step`` so that it runs
the global step hooks (``register_optimizer_step_pre_hook`` / ``_post_hook``) and the
instance's own. The GRU optimizer is an ``Optimizer`` too, so its ``step`` already ran
the global hooks once; the inner optimizer's step must run only its instance hooks, or
every global hook would fire twice per step.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["gradient_first", "needs_closure", "not_ready", "step_inner"]


# ``if closure is None: raise ...`` as the first thing a step does with its closure.
_REFUSES_NO_CLOSURE = re.compile(
    r"if\s+(?:closure\s+is\s+None|not\s+closure)\s*:\s*(?:#[^\n]*)?\n\s*raise\b"
)


def needs_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` requires a closure: ``LBFGS`` and the like (no default
    for ``closure``), or a step that has a default but refuses to run without one
    (:func:`gradient_first`)."""
    fn = type(optimizer).step
    fn = getattr(fn, "__wrapped__", fn)
    try:
        param = inspect.signature(fn).parameters.get("closure")
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
    if param is None:
        return False
    return param.default is inspect.Parameter.empty or gradient_first(optimizer)


_REFUSES: dict[type[Optimizer], bool] = {}


def _refuses_no_closure(cls: type[Optimizer]) -> bool:
    if cls not in _REFUSES:
        try:
            source = inspect.getsource(inspect.unwrap(cls.step))
        except (OSError, TypeError):  # no source (a compiled or generated step)
            source = ""
        _REFUSES[cls] = _REFUSES_NO_CLOSURE.search(source) is not None
    return _REFUSES[cls]


def gradient_first(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step(closure=None)`` keeps the default only in its signature:
    its code refuses to run without a closure (``if closure is None: raise``), as the
    sharpness-aware optimizers (``pytorch_optimizer.SAM`` and its family) do. Such a step
    uses the gradient present when it is called (SAM perturbs the weights along it) and
    then re-evaluates the closure: GRU evaluates the forget closure once before the
    step, and rectifies every evaluation against the one fold. Decided from the step's
    code, once per class."""
    return _refuses_no_closure(type(optimizer))


def not_ready(optimizer: Optimizer) -> str | None:
    """Why ``optimizer.step()`` would refuse to run now, where that can be read from the
    optimizer without stepping it (``None`` when nothing is known to stop it): a
    schedule-free optimizer (``schedulefree``; ``train_mode`` in its groups) in eval
    mode. GRU checks this before the retain side folds."""
    if any(g.get("train_mode") is False for g in optimizer.param_groups):
        return (
            f"{type(optimizer).__name__} is in eval mode (train_mode=False in its parameter "
            "groups): call opt.train() before training steps (and opt.eval() before "
            "evaluation), as schedule-free optimizers require"
        )
    return None


def step_inner(optimizer: Optimizer, closure: Any = None) -> Any:
    """``optimizer.step(closure)`` with the instance's step hooks and profiling, without
    the global step hooks (the GRU optimizer's own step ran those)."""
    fn = type(optimizer).step
    raw = getattr(fn, "__wrapped__", None)
    if raw is None or not getattr(fn, "hooked", False):
        return optimizer.step(closure) if closure is not None else optimizer.step()
    if "_opt_called" in optimizer.__dict__ or hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        optimizer._opt_called = True  # type: ignore[attr-defined]  # what an LR scheduler's patch records
    args: tuple[Any, ...] = (optimizer,) if closure is None else (optimizer, closure)
    kwargs: dict[str, Any] = {}
    name = f"Optimizer.step#{type(optimizer).__name__}.step"
    with torch.autograd.profiler.record_function(name):
        for pre_hook in list(optimizer._optimizer_step_pre_hooks.values()):
            result = pre_hook(optimizer, args, kwargs)
            if result is not None:
                if isinstance(result, tuple) and len(result) == 2:
                    args, kwargs = result
                else:
                    raise RuntimeError(
                        f"{fn} must return None or a tuple of (new_args, new_kwargs), but got "
                        f"{result}."
                    )
        out = raw(*args, **kwargs)
        optimizer._optimizer_step_code()
        for post_hook in list(optimizer._optimizer_step_post_hooks.values()):
            post_hook(optimizer, args, kwargs)
    return out
