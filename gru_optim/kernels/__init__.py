"""GRU's passes and where they run: one set of operations, three backends, one choice.

The four passes of a step (retain norm :func:`sum_squares`, fold :func:`fold_`, forget
statistics :func:`stats`, projection :func:`project_`) each have three implementations:
compiled C++ for CPU tensors (``csrc/gru_cpu.cpp``, loaded by :mod:`._native`), Triton
kernels for CUDA tensors (and CPU tensors under Triton's interpreter: :mod:`._triton`),
and torch's multi-tensor operations for everything else (:mod:`._foreach`). The compiled
ones read the same tables (:mod:`._plan`). :mod:`._dispatch` is the one place that
chooses: :func:`choose_backend` once per optimizer, :func:`fused_backend` per device.

Layers import downward only: ``functional`` -> ``kernels``; nothing here imports the rest
of ``gru_optim``.
"""

from ._dispatch import (
    Backend,
    KernelFallbackWarning,
    choose_backend,
    fused_backend,
    interpreting,
    native_reason,
    triton_reason,
)
from ._foreach import tensor_dots
from ._lists import stack_scalars
from ._native import build
from ._ops import fold_, project_, stats, sum_squares
from ._plan import device_floats

__all__ = [
    "Backend",
    "KernelFallbackWarning",
    "build",
    "choose_backend",
    "device_floats",
    "fold_",
    "fused_backend",
    "interpreting",
    "native_reason",
    "project_",
    "stack_scalars",
    "stats",
    "sum_squares",
    "tensor_dots",
    "triton_reason",
]
