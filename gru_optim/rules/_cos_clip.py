"""The authors' partial projection (``cos_clip``)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..functional import SegmentStats, cosclip_coefficients
from ._base import OneDirection, real

__all__ = ["COS_CLIP_KEY", "CosClip"]

COS_CLIP_KEY = "gru_cos_clip"
"""Param-group key of the cos-clip threshold."""


class CosClip(OneDirection):
    """The authors' partial projection: removes only the part of the conflict beyond a
    cosine ``threshold`` (:func:`gru_optim.functional.cosclip_coefficients`)."""

    name = "cos_clip"
    hyperparameters: ClassVar[dict[str, float]] = {COS_CLIP_KEY: -0.5}

    def __init__(self, threshold: float = -0.5) -> None:
        self.threshold = self.check(COS_CLIP_KEY, threshold, "")

    def check(self, key: str, value: Any, where: str) -> float:
        return real(
            "cos_clip",
            value,
            low=-1.0,
            high=0.0,
            what=f" (a cosine threshold; the authors use -0.5){where}",
        )

    def defaults(self) -> dict[str, float]:
        return {COS_CLIP_KEY: self.threshold}

    def coefficients(self, stats: SegmentStats, hyper: list[dict[str, float]]) -> Tensor:
        values = [h[COS_CLIP_KEY] for h in hyper]
        if all(v == values[0] for v in values):
            threshold: float | Tensor = values[0]
        else:
            threshold = torch.tensor(values, dtype=stats.dot.dtype).to(stats.dot.device)
        return cosclip_coefficients(stats.dot, stats.ema_sq_norm, stats.grad_sq_norm, threshold)
