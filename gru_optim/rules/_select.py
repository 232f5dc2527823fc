"""The rule the optimizers' keyword arguments select (one place for both drivers)."""

from __future__ import annotations

from collections.abc import Callable

from ._base import Rule
from ._cone import Cone, check_directions
from ._cos_clip import CosClip
from ._projection import Projection

__all__ = ["RULES", "make_rule"]


def make_rule(
    *, directions: int = 1, cos_clip: float | None = None, rule: Rule | None = None
) -> Rule:
    """The rule the optimizers' keyword arguments select (validated): ``rule`` itself, the
    cone for ``directions > 1``, cos clip for a ``cos_clip`` threshold, else the paper's
    projection."""
    directions = check_directions(directions)
    if directions > 1 and (rule is not None or cos_clip is not None):
        raise ValueError("directions > 1 is the cone rule: give directions, cos_clip or rule")
    if rule is not None and cos_clip is not None:
        raise ValueError("give cos_clip or rule, not both")
    if rule is not None:
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a gru_optim.rules.Rule, got {type(rule).__name__}")
        return rule
    if directions > 1:
        return Cone(directions)
    return CosClip(cos_clip) if cos_clip is not None else Projection()


RULES: dict[str, Callable[..., Rule]] = {
    "projection": Projection,
    "cos_clip": CosClip,
    "cone": Cone,
}
