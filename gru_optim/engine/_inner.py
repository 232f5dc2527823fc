"""Stepping the wrapped optimizer as a plain training loop would, once.

``torch.optim.Optimizer.__init__`` wraps every optimizer class's ``step`` so that it runs
the global step hooks (``register_optimizer_step_pre_hook`` / ``_post_hook``) and the
instance's own. The GRU optimizer is an ``Optimizer`` too, so its ``step`` already ran
the global hooks once; the inner optimizer's step must run only its instance hooks, or
every global hook would fire twice per step.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["needs_closure", "step_inner"]


def needs_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` requires a closure (``LBFGS`` and the like)."""
    fn = type(optimizer).step
    fn = getattr(fn, "__wrapped__", fn)
    try:
        param = inspect.signature(fn).parameters.get("closure")
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
    return param is not None and param.default is inspect.Parameter.empty


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
