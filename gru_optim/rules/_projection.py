"""The paper's rule: the projection that removes the conflict with the memory."""

from __future__ import annotations

from torch import Tensor

from ..functional import SegmentStats, conflict_coefficients
from ._base import OneDirection

__all__ = ["Projection"]


class Projection(OneDirection):
    """The paper's rule: ``g - min(<g, m>, 0) / ||m||^2 * m``, the closest vector to ``g``
    that does not conflict with ``m``."""

    name = "projection"

    def coefficients(self, stats: SegmentStats, hyper: list[dict[str, float]]) -> Tensor:
        return conflict_coefficients(stats.dot, stats.ema_sq_norm)
