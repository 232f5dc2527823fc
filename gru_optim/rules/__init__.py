"""Rectification rules for :class:`gru_optim.GRUOptimizer` (``rule=``).

:class:`Projection` is the paper's rule (the default), :class:`CosClip` the authors'
partial projection (``cos_clip=``), :class:`Cone` GRU-k (``directions=k``). One rule per
file; a new rule is one more file here, a subclass of :class:`Rule` (or of
:class:`OneDirection` for a rule against the memory alone), exported below; see
``docs/design.md``.
"""

from ._base import OneDirection, Rule, Solution
from ._cone import Cone
from ._cos_clip import COS_CLIP_KEY, CosClip
from ._projection import Projection
from ._select import make_rule

__all__ = [
    "COS_CLIP_KEY",
    "Cone",
    "CosClip",
    "OneDirection",
    "Projection",
    "Rule",
    "Solution",
    "make_rule",
]
