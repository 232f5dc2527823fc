"""The shell's policies around the engine: plain steps, and one live wrapper per inner
optimizer.

- A ``GRUOptimizer.step()`` given no retain gradient is the inner optimizer's plain step:
  reported once (:class:`PlainStepWarning`), refused, or allowed (``plain_steps=``).
- One inner optimizer has at most one live ``GRUOptimizer``: two would fold their retain
  gradients into the same parameter groups and inner state.
"""

from __future__ import annotations

import gc
import numbers
import os
import sys
import weakref
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "PlainStepWarning",
    "PlainSteps",
    "caller_level",
    "check_wrappable",
    "check_plain_steps",
    "frozen_lr",
    "refuse_rewrap",
    "refuse_second_wrapper",
    "register_wrapper",
]

PlainSteps = Literal["warn", "error", "allow"]
_PLAIN_STEPS: tuple[str, ...] = ("warn", "error", "allow")


class PlainStepWarning(UserWarning):
    """A ``GRUOptimizer.step()`` rectified nothing because no retain gradient was given
    (no ``retain_closure``, no ``retain_pass()`` before it): it was the inner optimizer's
    plain step. Issued once per optimizer; ``GRUOptimizer(plain_steps="allow")`` silences
    it for deliberate plain steps, ``plain_steps="error"`` raises instead. Filter it like
    any warning: ``warnings.filterwarnings("ignore", category=PlainStepWarning)``."""


def check_plain_steps(value: Any) -> PlainSteps:
    if not isinstance(value, str) or value not in _PLAIN_STEPS:
        raise ValueError(
            f"plain_steps must be one of {', '.join(map(repr, _PLAIN_STEPS))}, got {value!r}"
        )
    return value  # type: ignore[return-value]


# The live GRUOptimizer around each inner optimizer (weak references both ways: a
# wrapper that was garbage-collected, or an inner optimizer that was, leaves no entry).
_OWNERS: weakref.WeakKeyDictionary[Optimizer, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def refuse_rewrap(optimizer: Any, gru_class: type) -> None:
    """Raise when ``optimizer`` is a ``gru_class`` (a GRUOptimizer) or holds one as its
    ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``, or any such wrapper): GRU
    would rectify twice, the inner one with no retain pass."""
    if isinstance(optimizer, gru_class):
        raise TypeError("the optimizer is already a GRUOptimizer; wrap the inner one once")
    inside = optimizer
    for _ in range(8):
        inside = getattr(inside, "optimizer", None)
        if inside is None:
            return
        if isinstance(inside, gru_class):
            raise TypeError(
                f"the optimizer ({type(optimizer).__name__}) already wraps a GRUOptimizer "
                "(as its .optimizer): GRU would rectify twice, the inner one with no retain "
                "pass; wrap the plain optimizer once and use that GRUOptimizer"
            )


def check_wrappable(optimizer: Any, inner_options: dict[str, Any], gru_class: type) -> None:
    """What ``GRUOptimizer(optimizer, **options)`` refuses before anything else: a
    GRUOptimizer (or one inside), not an optimizer instance, the inner optimizer's options
    given to GRU by mistake (``GRUOptimizer(model.parameters(), lr=1e-3)``), SparseAdam,
    and a second live wrapper."""
    refuse_rewrap(optimizer, gru_class)
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
    refuse_second_wrapper(optimizer)


def refuse_second_wrapper(optimizer: Optimizer) -> None:
    """Raise when a live GRUOptimizer already wraps ``optimizer``.

    Live means still referenced from anywhere: a wrapper dropped with ``del`` (and by
    whatever else held it) does not block, even while it waits in a reference cycle for
    the garbage collector, which runs once here to decide. Rebinding the name,
    ``opt = GRUOptimizer(inner, ...)`` while ``opt`` holds the first wrapper, is refused:
    the first one is still bound while the second is built. So is a wrapper held only by a
    stored traceback (``sys.last_traceback`` in a REPL, after an exception raised while it
    was in scope).
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
        "parameter groups and inner state. Keep using the first one and change its "
        "hyperparameters in place (opt.gamma = 0.3, opt.retain_weight = ..., or "
        "opt.param_groups[i]['gru_gamma']), or drop every reference to it first: del opt "
        "(and any LR scheduler or Trainer holding it), then wrap again. "
        "`opt = GRUOptimizer(inner, ...)` alone does not drop it: the first wrapper is "
        "still bound to `opt` while the second is built"
    )


def register_wrapper(optimizer: Any, wrapper: Any, *, if_free: bool = False) -> None:
    """Record ``wrapper`` as the live wrapper of ``optimizer`` (``if_free``: only where
    none is live, as for a deep copy or an unpickled wrapper of its own inner copy)."""
    if not isinstance(optimizer, Optimizer):
        return
    ref = _OWNERS.get(optimizer)
    if if_free and ref is not None and ref() is not None:
        return
    _OWNERS[optimizer] = weakref.ref(wrapper)


_INTERNAL = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def caller_level() -> int:
    """``stacklevel`` for a warning issued by the caller of this function that names the
    first frame outside gru_optim and torch (the user's ``opt.step()`` line, through
    the step wrappers and LR schedulers' patches)."""
    level = 2
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def frozen_lr(groups: list[dict[str, Any]]) -> bool:
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
