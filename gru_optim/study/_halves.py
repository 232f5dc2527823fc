"""Validation and held-out halves of the evaluation sets: every set's rows are cut in two
by a seeded shuffle; the learning rate and stopping step are chosen on one half
(validation) and the other half (held out) is reported. A model is evaluated once on
every row; :func:`take` cuts its per-row results."""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import Any

import numpy as np
import torch

__all__ = ["halves", "take"]


def halves(sizes: dict[str, int], seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Per evaluation set of ``sizes`` (rows per set), ``{"val": rows, "test": rows}``:
    a seeded permutation cut in two, the validation half the smaller when the count is
    odd. A set of one row goes to the held-out half alone (nothing to validate on)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, n in sizes.items():
        perm = torch.randperm(n, generator=gen).numpy()
        cut = n // 2
        out[name] = {"val": np.sort(perm[:cut]), "test": np.sort(perm[cut:])}
    return out


def _cut(value: Any, idx: np.ndarray) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _cut(getattr(value, f.name), idx) for f in fields(value)})
    if isinstance(value, np.ndarray):
        return value[idx]
    if isinstance(value, list):
        return [value[i] for i in idx]
    raise TypeError(f"cannot cut a {type(value).__name__} by rows")


def take(raw: dict[str, Any], parts: dict[str, dict[str, np.ndarray]], half: str) -> dict[str, Any]:
    """The ``half`` (``"val"`` or ``"test"``) of a model's per-row results
    (:meth:`~._metrics.Evaluator.raw`); a set whose half is empty is left out (the
    holdout of a tiny folder: no membership inference on that half)."""
    out = {}
    for name, sets in raw.items():
        idx = parts[name][half]
        if len(idx):
            out[name] = {k: _cut(v, idx) for k, v in sets.items()}
    return out
