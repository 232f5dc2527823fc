"""Rectification rules for :class:`gru_optim.GRUOptimizer` (``rule=``).

:class:`Projection` is the paper's rule (the default), :class:`CosClip` the authors'
partial projection (``cos_clip=``), :class:`Cone` GRU-k (``directions=k``). A new rule
subclasses :class:`Rule` (or :class:`OneDirection` for a rule against the memory alone);
see ``docs/design.md``.
"""

from ._rules import Cone, CosClip, OneDirection, Projection, Rule, Solution

__all__ = ["Cone", "CosClip", "OneDirection", "Projection", "Rule", "Solution"]
