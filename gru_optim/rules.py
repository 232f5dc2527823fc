"""Rectification rules for :class:`gru_optim.GRUOptimizer` (``rule=``).

:class:`Projection` is the paper's rule (the default), :class:`CosClip` the authors'
partial projection (``cos_clip=``). A new rule subclasses :class:`Rule` (or
:class:`OneDirection` for a rule against the memory alone); see ``docs/design.md``.
"""

from ._rules import CosClip, OneDirection, Projection, Rule, Solution

__all__ = ["CosClip", "OneDirection", "Projection", "Rule", "Solution"]
