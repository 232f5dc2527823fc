"""Partitions: which parameters share one dot product (one segment of the rule).

A partition is a function from the participating parameters (in parameter-group order)
and the parameter groups to segment lengths, as :func:`gru_optim.functional.segment_sum`
takes them (``None``: one segment over everything, the paper's rule). A new granularity
is one more function in :data:`PARTITIONS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import Tensor

__all__ = ["PARTITIONS", "Granularity", "Partition", "group_of_segments"]

Granularity = Literal["global", "tensor", "group"]
Partition = Callable[[Sequence[Tensor], Sequence[dict[str, Any]]], "list[int] | None"]


def _global(members: Sequence[Tensor], groups: Sequence[dict[str, Any]]) -> list[int] | None:
    return None


def _tensor(members: Sequence[Tensor], groups: Sequence[dict[str, Any]]) -> list[int] | None:
    return [1] * len(members)


def _group(members: Sequence[Tensor], groups: Sequence[dict[str, Any]]) -> list[int] | None:
    index = {id(p) for p in members}
    sizes = []
    seen: set[int] = set()
    for group in groups:
        n = 0
        for p in group["params"]:
            if id(p) in index and id(p) not in seen:
                seen.add(id(p))
                n += 1
        if n:
            sizes.append(n)
    return sizes


PARTITIONS: dict[str, Partition] = {"global": _global, "tensor": _tensor, "group": _group}
"""The granularities :class:`~gru_optim.GRUOptimizer` accepts, by name."""


def group_of_segments(
    members: Sequence[Tensor], segments: list[int] | None, group_index: dict[int, int]
) -> list[list[int]]:
    """For each segment, the indices of the parameter groups its members belong to."""
    lengths = [len(members)] if segments is None else segments
    out, i = [], 0
    for n in lengths:
        out.append(sorted({group_index[id(p)] for p in members[i : i + n]}))
        i += n
    return out


class Layout:
    """One step's view of the parameters for the rule: the members (trainable parameters
    with a gradient or a memory, in group order), their local vectors and directions, the
    segments of the partition, each segment's rule hyperparameters and the reducer."""

    def __init__(
        self,
        members: list[Tensor],
        directions: list[Tensor | None],
        segments: list[int] | None,
        hyper: list[dict[str, float]],
        reducer: Any,
        history: list[list[Tensor] | None] | None = None,
        numels: Sequence[int] | None = None,
    ) -> None:
        self.members = members
        self.history = history
        self.directions = directions
        self.segments = segments
        self.hyper = hyper
        self.reducer = reducer
        # Real scalars per member (a complex one counts its real view's two per element);
        # a sharded member's full size where the driver gives it (its local vector holds
        # part of it).
        self.numels = (
            list(numels)
            if numels is not None
            else [p.numel() * (2 if p.is_complex() else 1) for p in members]
        )

    def solve(
        self,
        rule: Any,
        vectors: Sequence[Tensor],
        offsets: Tensor | None = None,
        foreach: bool | None = None,
        fused: bool = False,
    ) -> Any:
        """``rule.solve`` over this layout."""
        return rule.solve(
            vectors,
            self.directions,
            self.segments,
            self.reducer,
            hyper=self.hyper,
            offsets=offsets,
            foreach=foreach,
            numels=self.numels,
            history=self.history,
            fused=fused,
        )

    def apply_(
        self,
        rule: Any,
        targets: Sequence[Tensor],
        solution: Any,
        *,
        sign: float = 1.0,
        foreach: bool | None = None,
        fused: bool = False,
        skip: Tensor | None = None,
    ) -> None:
        """``rule.apply_`` over this layout."""
        rule.apply_(
            targets,
            self.directions,
            solution,
            self.segments,
            sign=sign,
            foreach=foreach,
            history=self.history,
            fused=fused,
            skip=skip,
        )
