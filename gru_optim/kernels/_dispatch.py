"""The one place that chooses where GRU's passes run.

Three backends implement the same four passes (:mod:`gru_optim.kernels`):

- :attr:`Backend.CPU`: compiled C++ over CPU tensors (:mod:`._native`), built on first
  use with the system compiler;
- :attr:`Backend.TRITON`: multi-tensor Triton kernels on CUDA tensors (:mod:`._triton`),
  and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``: the tests);
- :attr:`Backend.FOREACH`: torch's multi-tensor operations (:mod:`._foreach`), for every
  device, layout and rule.

:func:`fused_backend` decides C++ or Triton for one device; :func:`choose_backend`
decides, once per optimizer, between the compiled passes and foreach (and says why
``fused=True`` cannot run, or warns when ``fused=None`` expected the C++ passes and they
cannot be built).
"""

from __future__ import annotations

import enum
import importlib.util
import os
import sys
import warnings
from collections.abc import Collection

import torch

from . import _native

__all__ = [
    "Backend",
    "KernelFallbackWarning",
    "choose_backend",
    "fused_backend",
    "interpreting",
    "native_reason",
    "triton_reason",
]

native_reason = _native.native_reason


class Backend(enum.Enum):
    """Where the passes run (the value is what ``GRUOptimizer.kernels`` reports)."""

    FOREACH = "foreach"
    CPU = "cpu"
    TRITON = "triton"


class KernelFallbackWarning(UserWarning):
    """The compiled CPU kernels were expected (``fused=None`` on CPU tensors) but cannot be
    built or loaded: the foreach path runs instead (correct, slower). Issued once per
    process and reason; ``gru_optim.kernels.native_reason()`` gives the reason too."""


def interpreting() -> bool:
    """Whether Triton's interpreter is asked for (Triton's own reading of the flag, its
    ``knobs.env_bool``): then CPU tensors run the Triton kernels, else the C++ ones."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


def fused_backend(device: torch.device) -> Backend:
    """Which compiled passes run on ``device``'s tensors: C++ on the CPU unless Triton's
    interpreter is asked for, Triton elsewhere."""
    return Backend.CPU if device.type == "cpu" and not interpreting() else Backend.TRITON


def triton_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (``None``: they can): what
    ``fused=True`` needs."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'gru-optim[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        return (
            "fused=True on CPU tensors runs Triton's interpreter, which needs "
            "TRITON_INTERPRET=1 in the environment before Triton is imported"
        )
    return f"no fused kernels for {device.type} tensors"


_WARNED: set[str] = set()


def _fallback_warning(reason: str) -> None:
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(
        f"the compiled CPU kernels are unavailable: {reason}; GRU's passes run on the "
        "(slower) foreach path. Pass fused=False to choose it explicitly, or fix the "
        "build (gru_optim.kernels.native_reason() says why).",
        KernelFallbackWarning,
        stacklevel=_caller_level(),
    )


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside ``gru_optim`` (the user's line that
    built the optimizer), counted from :func:`warnings.warn`'s caller."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE + os.sep):
        frame = frame.f_back
        level += 1
    return level


def choose_backend(
    fused: bool | None, devices: Collection[torch.device], *, supported: bool
) -> Backend:
    """The backend of an optimizer over parameters on ``devices``, decided once.

    ``fused``: ``False`` is foreach; ``None`` the compiled passes where they exist and
    run (C++ on the CPU, Triton on CUDA), foreach otherwise, with a
    :class:`KernelFallbackWarning` when the C++ passes were expected but cannot be built;
    ``True`` the Triton kernels (C++ on the CPU is not what ``True`` asks for: it needs
    Triton's interpreter there), refused with a ``ValueError`` naming the reason where
    they cannot run. ``supported``: whether the rule and space have a fused form (one
    direction, gradient space).
    """
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")
    if fused is False:
        return Backend.FOREACH
    several = len(devices) != 1
    if fused is None:
        if several or not supported:
            return Backend.FOREACH
        device = next(iter(devices))
        if device.type == "cpu":
            if interpreting():
                # Triton's interpreter is a test harness, not a fast path.
                return Backend.FOREACH
            reason = native_reason()
            if reason is None:
                return Backend.CPU
            if not _native.turned_off():
                _fallback_warning(reason)
            return Backend.FOREACH
        if device.type == "cuda" and triton_reason(device) is None:
            return Backend.TRITON
        return Backend.FOREACH
    why = "the parameters are on several devices" if several else None
    why = why or triton_reason(next(iter(devices)))
    if not supported:
        raise ValueError(
            "fused=True runs the projection and cos clip in gradient space; GRU-k "
            "(directions > 1), space='update' and custom rules use the foreach path"
        )
    if why is not None:
        raise ValueError(f"fused=True: {why}")
    return fused_backend(next(iter(devices)))
