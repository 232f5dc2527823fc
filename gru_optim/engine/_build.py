"""``GRUOptimizer``'s engine, built: the keywords validated, the kernels chosen, GRU's
values planned for the parameter groups and written only once everything is valid."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from ..kernels import Backend
from ..rules import Rule
from ._amp import AmpBoundary
from ._config import resolve_fused, settings, takes_device_found_inf
from ._engine import Engine
from ._groups import GAMMA_KEY, RETAIN_WEIGHT_KEY, plan_groups
from ._inner import needs_closure
from ._memory import RetainMemory
from ._param_sides import ParamSides
from ._policy import PlainSteps, check_plain_steps
from ._sources import ParamSource

__all__ = ["DEFAULT_GAMMA", "param_engine"]

DEFAULT_GAMMA = 0.8
"""The authors' ``gamma``: the value of a group that has none when none is given."""


def param_engine(
    optimizer: Optimizer,
    owner: Any,
    *,
    gamma: float | None,
    granularity: str,
    retain_weight: float | None,
    space: str,
    cos_clip: float | None,
    directions: int,
    rule: Rule | None,
    max_grad_norm: float | None,
    ema_dtype: torch.dtype | None,
    skip_nonfinite: bool,
    foreach: bool | None,
    fused: bool | None,
    grad_scaler: Any,
    plain_steps: PlainSteps,
) -> tuple[Engine, ParamSides]:
    """The engine and its sides for ``GRUOptimizer(optimizer, ...)`` (``owner``: the
    wrapper, for the gradient scaler's bookkeeping). Everything is validated before
    anything is written into the optimizer's groups.

    GRU's values in the groups: a value given here wins in every group; a value not given
    (``None``) is each group's own, and groups without one (and groups added later) take
    the value the others agree on, else the default (``gamma`` 0.8, ``retain_weight`` 0).
    The rule's hyperparameters come with the rule chosen here."""
    s = settings(
        gamma=gamma,
        retain_weight=retain_weight,
        granularity=granularity,
        space=space,
        cos_clip=cos_clip,
        directions=directions,
        rule=rule,
        max_grad_norm=max_grad_norm,
        ema_dtype=ema_dtype,
    )
    check_plain_steps(plain_steps)
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
    memory = RetainMemory(s.ema_dtype, history=s.history)
    amp = AmpBoundary(grad_scaler, owner)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    backend = resolve_fused(fused, params, s.rule, s.space)
    fused = backend is not Backend.FOREACH
    given: dict[str, Any] = dict(s.rule.defaults())
    for key, value in ((GAMMA_KEY, s.gamma), (RETAIN_WEIGHT_KEY, s.retain_weight)):
        if value is not None:
            given[key] = value
    hdefaults, planned = plan_groups(
        optimizer.param_groups, given, {GAMMA_KEY: DEFAULT_GAMMA, RETAIN_WEIGHT_KEY: 0.0}
    )
    engine = Engine(
        rule=s.rule,
        memory=memory,
        amp=amp,
        granularity=s.granularity,
        space=s.space,
        max_grad_norm=s.max_grad_norm,
        skip_nonfinite=skip_nonfinite,
        foreach=foreach,
        fused=fused,
        backend=backend,
        hdefaults=hdefaults,
    )
    source = ParamSource(optimizer, device_skip=fused and takes_device_found_inf(optimizer))
    sides = ParamSides(
        engine, source, closure_driven=needs_closure(optimizer), plain_steps=plain_steps
    )
    sides.install(planned)
    return engine, sides
