"""The sums of several directions per segment: Gram matrices for GRU-k's cone projection
(:func:`~gru_optim.functional.cone_coefficients` solves it)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._sums import MAX32_SQ, counts, in_range, segment_sum, segment_sums
from ._tensors import tensor_dots, tensor_sq_norms

__all__ = ["segment_gram"]


def _pair_index(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i, k)]


def segment_gram(
    tensors: list[Tensor],
    directions: list[list[Tensor | None]],
    segments: list[int] | None,
    *,
    dot_offsets: Tensor | None = None,
    all_reduce: Callable[[Tensor], None] | None = None,
    foreach: bool | None = None,
    numels: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per segment, the Gram matrix of the directions, their dot products with the
    tensors and ``|g|^2``, summed across processes with one packed collective.

    ``directions[j][i]`` is direction ``j`` of tensor ``i`` (``None``: zero there). Dot
    products are one ``torch.dot`` per pair and tensor, so each entry is the same
    whatever the order the directions are stored in. ``dot_offsets`` (``(n, k)``) is
    subtracted from the per-tensor ``<g, d_j>``. Accumulated in float32 (float64 for
    float64 inputs); on the CPU a segment outside float32's range is recomputed in float64
    (the recipe of :func:`~gru_optim.functional._sums.segment_sums`, which
    :func:`~gru_optim.functional.segment_stats` shares).

    Returns ``(gram (S, k, k), dots (S, k), grad_sq_norm (S,), in_range (S,))``.
    """
    k = len(directions)
    n = len(tensors)
    pairs = _pair_index(k)
    dev = tensors[0].device
    sizes = numels if numels is not None else [t.numel() for t in tensors]

    def per_dir_dots(
        a: list[Tensor | None], b: list[Tensor | None], dtype: torch.dtype | None
    ) -> Tensor:
        have = [i for i in range(n) if a[i] is not None and b[i] is not None]
        out: list[Tensor | None] = [None] * n
        if have:
            d = tensor_dots([a[i] for i in have], [b[i] for i in have], dtype=dtype)  # type: ignore[misc]
            for pos, i in enumerate(have):
                out[i] = d[pos]
        cd = dtype or torch.float32
        zero = torch.zeros((), dtype=cd if not have else d.dtype, device=dev)
        return torch.stack([zero if v is None else v for v in out])

    def columns(dtype: torch.dtype | None) -> list[Tensor]:
        g_sq = tensor_sq_norms(tensors, foreach=foreach, dtype=dtype)
        cols = [per_dir_dots(list(tensors), directions[j], dtype) for j in range(k)]
        grams = [per_dir_dots(directions[i], directions[j], dtype) for i, j in pairs]
        cdtype = (
            torch.float64
            if any(c.dtype == torch.float64 for c in [g_sq, *cols, *grams])
            else torch.float32
        )
        b = torch.stack([c.to(cdtype) for c in cols], -1)  # (n, k)
        if dot_offsets is not None:
            b = b - dot_offsets.to(b)
        per = torch.cat(
            [torch.stack([g.to(cdtype) for g in grams], -1), b, g_sq.to(cdtype)[:, None]], -1
        )
        return [per[:, c] for c in range(per.shape[1])]

    def unpack(packed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = packed.shape[1]
        gram = torch.zeros((s, k, k), dtype=packed.dtype, device=packed.device)
        for c, (i, j) in enumerate(pairs):
            gram[:, i, j] = packed[c]
            gram[:, j, i] = packed[c]
        m = len(pairs)
        return gram, packed[m : m + k].t(), packed[m + k]

    def check(packed: Tensor, exact: bool) -> Tensor:
        gram, dots, g_sq = unpack(packed)
        cnt = [
            segment_sum(counts(tuple(c), packed.dtype, dev), segments)
            for c in [
                *(
                    [0 if directions[j][i] is None else sizes[i] for i in range(n)]
                    for j in range(k)
                ),
                sizes,
            ]
        ]
        ok = torch.isfinite(gram).flatten(1).all(-1)
        for j in range(k):
            ok = ok & in_range(dots[:, j], gram[:, j, j], g_sq, cnt[j], cnt[k])
        if exact:
            # Exact now; the vectors themselves must still have a float32 norm.
            diag = torch.diagonal(gram, dim1=-2, dim2=-1)
            ok = ok & (g_sq <= MAX32_SQ) & (diag <= MAX32_SQ).all(-1)
        return ok

    packed, ok = segment_sums(columns, segments, all_reduce=all_reduce, in_range=check)
    gram, dots, g_sq = unpack(packed)
    return gram, dots, g_sq, ok
