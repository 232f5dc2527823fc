"""``GRUOptimizer``'s engine, built: the keywords validated, the kernels chosen, GRU's
values planned for the parameter groups and written only once everything is valid."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.optim import Optimizer

from ..kernels import Backend
from ..rules import COS_CLIP_KEY, CosClip, Rule
from ._amp import AmpBoundary
from ._config import resolve_fused, settings, takes_device_found_inf
from ._engine import Engine
from ._groups import (
    GAMMA_KEY,
    NOT_GIVEN,
    RETAIN_WEIGHT_KEY,
    NotGiven,
    plan_groups,
    unread_rule_keys,
)
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
    cos_clip: float | None | NotGiven,
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
    The same for ``cos_clip`` (:func:`cos_clip_of`): given (a threshold, or ``None`` for
    no cos clip, as is choosing ``rule`` or ``directions``), it wins; not given, the
    groups' ``gru_cos_clip`` selects the cos-clip rule. The groups' keys the rule chosen
    does not read are removed."""
    cos_clip, read = cos_clip_of(optimizer.param_groups, cos_clip, granularity, directions, rule)
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
    given: dict[str, Any] = {} if read else dict(s.rule.defaults())
    for key, value in ((GAMMA_KEY, s.gamma), (RETAIN_WEIGHT_KEY, s.retain_weight)):
        if value is not None:
            given[key] = value
    hdefaults, planned = plan_groups(
        optimizer.param_groups,
        given,
        {GAMMA_KEY: DEFAULT_GAMMA, RETAIN_WEIGHT_KEY: 0.0, **s.rule.defaults()},
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
    with _read_from_groups(cos_clip if read else None):
        sides.install(planned)
    for group in optimizer.param_groups:
        for key in unread_rule_keys(group, s.rule.hyperparameters):
            del group[key]
    return engine, sides


@contextlib.contextmanager
def _read_from_groups(cos_clip: float | None) -> Iterator[None]:
    """A refusal of the combination with a ``cos_clip`` read from the groups says so (its
    value was validated where it was read)."""
    try:
        yield
    except ValueError as e:
        if cos_clip is None:
            raise
        raise ValueError(
            f"{e} (cos_clip={cos_clip} was read from the parameter groups' "
            f"{COS_CLIP_KEY!r}: give cos_clip=None for the paper's projection)"
        ) from e


def cos_clip_of(
    groups: list[dict[str, Any]],
    cos_clip: float | None | NotGiven,
    granularity: str,
    directions: Any,
    rule: Rule | None,
) -> tuple[float | None, bool]:
    """The ``cos_clip`` the rule is built from, and whether it was read from ``groups``.

    Given (a threshold, or ``None``: no cos clip), it is the one; so is ``None`` when
    ``rule`` or ``directions > 1`` choose the rule. Not given, the groups' values under
    ``"gru_cos_clip"`` (an earlier wrapper's, or a loaded GRU checkpoint's) select the
    cos-clip rule: the value they agree on, or the rule's default where they differ under
    ``granularity="group"``/``"tensor"`` (each group keeps its own); different values
    under ``granularity="global"`` are refused. No group holds one: ``None``."""
    if cos_clip is not NOT_GIVEN:
        return cos_clip, False
    if rule is not None or directions != 1:
        return None, False
    found = [(i, g[COS_CLIP_KEY]) for i, g in enumerate(groups) if COS_CLIP_KEY in g]
    if not found:
        return None, False
    values = [CosClip().check(COS_CLIP_KEY, v, f" (param_groups[{i}])") for i, v in found]
    if all(v == values[0] for v in values):
        return values[0], True
    if granularity == "global":
        raise ValueError(
            f"the parameter groups hold different {COS_CLIP_KEY!r} values {values} and "
            "cos_clip was not given: with granularity='global' (one segment) give "
            "cos_clip=... (it is written into every group), cos_clip=None for the paper's "
            "projection, or use granularity='group' to keep each group's threshold"
        )
    return CosClip().threshold, True
