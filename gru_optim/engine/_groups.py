"""GRU's hyperparameters in the inner optimizer's parameter groups, and number validation.

Each hyperparameter lives in every parameter group under a namespaced key
(``"gru_gamma"``, ...), next to ``lr``: it is saved in ``state_dict()["param_groups"]``,
can differ per group, and can be changed between steps the way schedulers change ``lr``.
A group without the key (an older checkpoint, a group added to the inner optimizer
directly) takes the value given to :class:`~gru_optim.GRUOptimizer`; a value given to it
overrides the groups' own, a value not given is read from them (:func:`plan_groups`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from ..rules._base import real
from ..rules._cos_clip import COS_CLIP_KEY

__all__ = [
    "GAMMA_KEY",
    "NOT_GIVEN",
    "RETAIN_WEIGHT_KEY",
    "RULE_KEYS",
    "Hyper",
    "NotGiven",
    "check_values",
    "fill_groups",
    "group_values",
    "plan_groups",
    "read_groups",
    "real",
    "unread_rule_keys",
]

GAMMA_KEY = "gru_gamma"
"""Parameter-group key of ``gamma``, the weight of the new retain gradient in the memory."""
RETAIN_WEIGHT_KEY = "gru_retain_weight"
"""Parameter-group key of ``retain_weight``, the multiple of the retain gradient added
after rectification."""
RULE_KEYS = (COS_CLIP_KEY,)
"""Parameter-group keys of the library's rules' hyperparameters."""


class NotGiven(enum.Enum):
    """A keyword argument left out, where ``None`` is a value of its own (``cos_clip=None``:
    no cos clip)."""

    NOT_GIVEN = "not given"

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = NotGiven.NOT_GIVEN


def unread_rule_keys(values: dict[str, Any], rule_keys: Iterable[str]) -> list[str]:
    """The rule keys (:data:`RULE_KEYS`) in ``values`` that a rule reading ``rule_keys``
    would ignore: refused where they come in (a value kept and ignored is silently wrong)."""
    keys = set(rule_keys)
    return [k for k in RULE_KEYS if k in values and k not in keys]


def check_gamma(value: Any, where: str = "") -> float:
    return real(
        "gamma",
        value,
        low=0.0,
        high=1.0,
        low_open=True,
        what=f" (it weighs the new retain gradient){where}",
    )


def check_retain_weight(value: Any, where: str = "") -> float:
    return real("retain_weight", value, low=0.0, what=where)


class Hyper:
    """The validated hyperparameters of one parameter group for one step."""

    __slots__ = ("gamma", "retain_weight", "rule")

    def __init__(self, gamma: float, retain_weight: float, rule: dict[str, float]) -> None:
        self.gamma = gamma
        self.retain_weight = retain_weight
        self.rule = rule


def fill_groups(groups: Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
    """Give every group the keys it lacks, from ``defaults`` (never overwrites)."""
    for group in groups:
        for k, v in defaults.items():
            group.setdefault(k, v)


def plan_groups(
    groups: list[dict[str, Any]], given: dict[str, Any], defaults: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """GRU's keys for an optimizer built around ``groups``, without writing anything.

    The rule: a value ``given`` to the constructor wins in every group; a value not given
    is each group's own (a re-wrapped optimizer, or one that loaded a GRU checkpoint),
    and a group without it takes the value all groups that carry it agree on, else
    ``defaults``. Returns the defaults for groups added later (same rule) and, per group,
    the values it is to hold.
    """
    base = dict(defaults)
    for k in defaults:
        found = [g[k] for g in groups if k in g]
        if k not in given and found and all(_same(v, found[0]) for v in found):
            base[k] = found[0]
    base.update(given)
    planned = [{k: (v if k in given else g.get(k, v)) for k, v in base.items()} for g in groups]
    return base, planned


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, RuntimeError, ValueError):
        return a is b


def check_values(
    values: list[dict[str, Any]], rule_checks: dict[str, Any], where: list[str]
) -> list[Hyper]:
    """Validate each group's GRU values (``where[i]`` names it in errors); writes nothing."""
    out = []
    for v, w in zip(values, where):
        rule = {k: check(v[k], w) for k, check in rule_checks.items()}
        out.append(
            Hyper(check_gamma(v[GAMMA_KEY], w), check_retain_weight(v[RETAIN_WEIGHT_KEY], w), rule)
        )
    return out


def group_values(groups: list[dict[str, Any]], defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Each group's GRU values, ``defaults`` where a group lacks one (writes nothing)."""
    return [{k: g.get(k, v) for k, v in defaults.items()} for g in groups]


def read_groups(
    groups: list[dict[str, Any]],
    defaults: dict[str, Any],
    rule_checks: dict[str, Any],
) -> list[Hyper]:
    """Validate and read each group's hyperparameters (raises before anything changes;
    a group lacking a key is then given the default)."""
    out = check_values(
        group_values(groups, defaults),
        rule_checks,
        [f" (param_groups[{i}])" for i in range(len(groups))],
    )
    fill_groups(groups, defaults)
    return out
