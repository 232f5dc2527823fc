"""The keywords every driver shares, validated in one place.

``GRUOptimizer`` and ``GRUDeepSpeed`` take the same GRU keywords (``gamma``,
``retain_weight``, ``granularity``, ``cos_clip``, ``directions``, ``rule``,
``max_grad_norm``, ``ema_dtype``); :func:`settings` checks them and returns what the engine
is built from, raising with a message that names the fix. The CPU/GPU kernel choice for a
torch optimizer's parameters is made once too, in :func:`resolve_fused`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..kernels import Backend, choose_backend
from ..rules import Cone, CosClip, OneDirection, Rule, make_rule
from ._groups import check_gamma, check_retain_weight, real
from ._partition import PARTITIONS
from ._spaces import SPACES

__all__ = [
    "Settings",
    "check_weighted",
    "resolve_fused",
    "settings",
    "takes_device_found_inf",
]

_DEVICE_FOUND_INF = ("Adam", "AdamW", "SGD", "Adagrad")


class Settings(NamedTuple):
    """The validated GRU keywords."""

    gamma: float | None
    """``None``: not given (``GRUOptimizer`` then reads the groups' own values)."""
    retain_weight: float | None
    granularity: str
    space: str
    rule: Rule
    max_grad_norm: float | None
    clip: float | None
    """The norm GRU itself clips to (``None`` where the driver's step already clips)."""
    ema_dtype: torch.dtype | None
    history: int
    """How many recent raw retain gradients the memory keeps (GRU-k: ``directions - 1``)."""


def settings(
    *,
    gamma: Any,
    retain_weight: Any,
    granularity: Any,
    space: Any = "gradient",
    cos_clip: Any,
    directions: Any,
    rule: Any,
    max_grad_norm: Any,
    ema_dtype: Any,
    kept_in_grad: bool = False,
    float16_memory: bool = True,
    driver_clip: float = 0.0,
    skips_after_fold: bool = False,
) -> Settings:
    """The GRU keywords, validated in the order given (raises ``ValueError``/``TypeError``
    naming the fix). What a driver adds: ``kept_in_grad``, a retain-weight part will sit in
    the gradient (no cos clip then); ``float16_memory``, whether it allows a float16
    memory; ``driver_clip``, the norm its own step already clips to (``0``: none; GRU
    then clips only if it is not already done); ``skips_after_fold``, its step may be
    skipped after the fold (it can give the memory back, not GRU-k's history)."""
    gamma = None if gamma is None else check_gamma(gamma)
    retain_weight = None if retain_weight is None else check_retain_weight(retain_weight)
    if granularity not in PARTITIONS:
        raise ValueError(
            f"granularity must be one of {', '.join(map(repr, PARTITIONS))}, got {granularity!r}"
        )
    if space not in SPACES:
        raise ValueError(f"space must be 'gradient' or 'update', got {space!r}")
    rule = make_rule(directions=directions, cos_clip=cos_clip, rule=rule)
    if max_grad_norm is not None:
        max_grad_norm = real("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
    check_weighted(rule, kept_in_grad)
    if not float16_memory and ema_dtype == torch.float16:
        raise ValueError("ema_dtype=torch.float16 can overflow (65504); use float32 or bfloat16")
    history = rule.directions - 1 if isinstance(rule, Cone) else 0
    if history and skips_after_fold:
        raise NotImplementedError(
            "GRU-k (directions > 1) with fp16 loss scaling is not supported: a skipped "
            "step could not give the recent retain gradients back"
        )
    if max_grad_norm is not None and driver_clip > 0.0 and driver_clip != max_grad_norm:
        raise ValueError(
            f"max_grad_norm={max_grad_norm} but the DeepSpeed config clips at "
            f"gradient_clipping={driver_clip}; both clip the rectified gradient before "
            "the step: set one of them (gradient_clipping=0 lets GRU clip)"
        )
    clip = max_grad_norm if driver_clip == 0.0 else None
    return Settings(
        gamma, retain_weight, granularity, space, rule, max_grad_norm, clip, ema_dtype, history
    )


def check_weighted(rule: Rule, weighted: bool) -> None:
    """cos clip cannot be combined with a retain-weight term kept in the gradient."""
    if weighted and isinstance(rule, CosClip):
        raise ValueError(
            "cos_clip needs the norm of the forget gradient alone, which GRU cannot "
            "separate from a retain_weight term kept in .grad: use retain_weight=0 "
            "with cos_clip"
        )


def takes_device_found_inf(optimizer: Optimizer) -> bool:
    """torch's fused optimizers skip a step on the device when ``found_inf`` is set on
    them (as ``GradScaler`` does)."""
    return (
        type(optimizer).__name__ in _DEVICE_FOUND_INF
        and type(optimizer).__module__.startswith("torch.optim")
        and all(bool(g.get("fused")) for g in optimizer.param_groups)
    )


def resolve_fused(fused: Any, params: list[Tensor], rule: Rule, space: str) -> Backend:
    """Where the passes run for ``params``: :func:`gru_optim.kernels.choose_backend`'s
    answer, once (raises for ``fused=True`` where the fused kernels cannot run)."""
    return choose_backend(
        fused,
        {p.device for p in params},
        supported=isinstance(rule, OneDirection) and space == "gradient",
    )
