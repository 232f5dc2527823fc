"""Functional core of GRU: pure operations over lists of tensors.

Every function here works on plain lists of tensors (local shards, when the caller
holds distributed tensors) and never synchronises with the host on an accelerator:
decisions stay on the device as 0-dim tensors. Dot products and norms accumulate in
float32 (float64 when an input is float64), whatever the dtype of the gradients.

The mathematics of GRU lives in the coefficient functions (:func:`conflict_coefficients`,
the closed form of the constrained problem; :func:`cosclip_coefficients`, the authors'
partial projection) and :func:`project_` (applying them); :func:`segment_stats` computes
the sums they need, once, for every rule and both spaces of the optimizer.

Dynamic range. Float32 sums of squares are exact to rounding while the elements that
dominate a tensor are between about ``1e-19`` and ``1e19`` in magnitude (their squares
stay normal float32 numbers). :func:`segment_stats` flags a segment outside that range
(``SegmentStats.in_range``): on the CPU it then recomputes the segment in float64, which
is exact for every finite float32 input; on an accelerator the flag stays on the device
for the caller to act on (:class:`~gru_optim.GRUOptimizer` skips such a step, with a
reason).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "RectifyResult",
    "SegmentStats",
    "clip_coefficient",
    "conflict_coefficients",
    "cosclip_coefficients",
    "ema_update_",
    "expand_segments",
    "project_",
    "rectify_",
    "segment_dots",
    "segment_stats",
    "segment_sum",
    "sum_sq",
    "tensor_dots",
    "tensor_sq_norms",
    "total_norm",
]

_Key = tuple[torch.device, torch.dtype, torch.dtype]

# Below this mean square a float32 sum of squares may be made of subnormal products.
_TINY32 = 2.0**-126
_MAX32_SQ = torch.finfo(torch.float32).max ** 2


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _group(a: Sequence[Tensor], b: Sequence[Tensor] | None = None) -> dict[_Key, list[int]]:
    """Indices of ``a`` grouped by (device, dtype of a[i], dtype of b[i])."""
    groups: dict[_Key, list[int]] = {}
    for i, t in enumerate(a):
        key = (t.device, t.dtype, b[i].dtype if b is not None else t.dtype)
        groups.setdefault(key, []).append(i)
    return groups


def _default_foreach(tensors: Sequence[Tensor]) -> bool:
    """The multi-tensor path unless a tensor is a subclass that foreach kernels reject."""
    return all(type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter) for t in tensors)


def _fusable(*lists: Sequence[Tensor | None]) -> bool:
    """The fused kernels take contiguous tensors (anything else uses the foreach path)."""
    return all(t is None or t.is_contiguous() for ts in lists for t in ts)


def ema_update_(
    ema: Sequence[Tensor],
    grads: Sequence[Tensor],
    gamma: float,
    *,
    foreach: bool | None = None,
    fused: bool = False,
    gate: Tensor | None = None,
    sq_norms: bool = False,
) -> Tensor | None:
    """Fold ``grads`` into the retain memory in place.

    Promises ``ema[i] <- gamma * grads[i] + (1 - gamma) * ema[i]`` for every ``i``, in the
    dtype of ``ema[i]`` (the gradients may have another dtype). ``gamma`` weighs the new
    gradient, as in the authors' code; ``gamma = 1`` copies the gradient exactly.

    ``gate`` (a 0-dim tensor): fold only if it is true. The fused path (``fused=True``,
    Triton) reads it on the device; the others read it on the host (one synchronisation).

    ``sq_norms``: also return ``|grads[i]|^2`` for every ``i`` (whatever the gate says), as
    :func:`tensor_sq_norms` with the same ``foreach``/``fused`` computes them; the fused
    path takes them from the fold's own read of the gradients (no second pass). Returns
    ``None`` otherwise.
    """
    if len(ema) != len(grads):
        raise ValueError(f"ema_update_: {len(ema)} buffers but {len(grads)} gradients")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if not grads:
        return torch.zeros(0) if sq_norms else None
    if fused and _fusable(ema, grads):
        from . import _fused

        vals: list[Tensor | None] = [None] * len(grads)
        groups = _group(ema, grads)
        for (dev, _, _), idx in groups.items():
            ms = [ema[i] for i in idx]
            gs = [grads[i] for i in idx]
            g = gate if gate is not None else torch.ones((), dtype=torch.bool, device=dev)
            sq = _fused.fold_(
                ms, gs, _fused.device_floats([gamma] * len(ms), dev), g.to(dev), sq_norms=sq_norms
            )
            if sq is not None:
                if _one_group(groups, len(grads)):
                    return sq
                for i, v in zip(idx, sq.unbind()):
                    vals[i] = v
        return _stack_scalars(vals, grads[0].device) if sq_norms else None
    norms = tensor_sq_norms(grads, foreach=foreach) if sq_norms else None
    if gate is not None and not bool(gate):
        return norms
    use_foreach = _default_foreach(ema) if foreach is None else foreach
    for (_, m_dtype, g_dtype), idx in _group(ema, grads).items():
        ms = [ema[i] for i in idx]
        gs = [grads[i] for i in idx]
        same = m_dtype == g_dtype
        if gamma == 1.0:
            if use_foreach:
                torch._foreach_copy_(ms, gs)
            else:
                for m, g in zip(ms, gs):
                    m.copy_(g)
        elif use_foreach:
            if same:
                torch._foreach_lerp_(ms, gs, gamma)
            else:
                torch._foreach_mul_(ms, 1.0 - gamma)
                torch._foreach_add_(ms, gs, alpha=gamma)
        else:
            for m, g in zip(ms, gs):
                if same:
                    m.lerp_(g, gamma)
                else:
                    m.mul_(1.0 - gamma).add_(g, alpha=gamma)
    return norms


_SUBNORMAL32 = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23


def tensor_sq_norms(
    tensors: Sequence[Tensor],
    *,
    foreach: bool | None = None,
    dtype: torch.dtype | None = None,
    fused: bool = False,
) -> Tensor:
    """Squared L2 norm of every tensor, as one 1-D tensor of length ``len(tensors)``.

    Accumulated in float32 (float64 for float64 inputs, or in ``dtype`` when given) on the
    device of the first tensor; the fused path accumulates in float64.
    """
    if len(tensors) == 0:
        return torch.zeros(0)
    if fused and _fusable(tensors):
        from . import _fused

        vals: list[Tensor | None] = [None] * len(tensors)
        groups = _group(tensors)
        for (_, _, _), idx in groups.items():
            sq = _fused.sum_squares([tensors[i] for i in idx])
            if _one_group(groups, len(tensors)):
                return sq
            for i, v in zip(idx, sq.unbind()):
                vals[i] = v
        return _stack_scalars(vals, tensors[0].device)
    out: list[Tensor | None] = [None] * len(tensors)
    use_foreach = _default_foreach(tensors) if foreach is None else foreach
    for (_, tdtype, _), idx in _group(tensors).items():
        ts = [tensors[i] for i in idx]
        cdtype = dtype or _compute_dtype(tdtype)
        if dtype is not None and dtype != tdtype:
            # The careful path: exact float64 squares (a transient copy per tensor).
            norms = [torch.linalg.vector_norm(t.to(dtype)) for t in ts]
        elif use_foreach:
            norms = list(torch._foreach_norm(ts, 2, dtype=cdtype))
        else:
            norms = [torch.linalg.vector_norm(t, dtype=cdtype) for t in ts]
        for i, n in zip(idx, norms):
            out[i] = n
    sq = _stack_scalars(out, tensors[0].device).square()
    if sq.dtype == torch.float32 and sq.device.type == "cpu":
        # A non-zero tensor whose squares all underflow (elements below ~1e-23) must not
        # read as zero ("no memory"): the smallest subnormal marks it, and the range check
        # then recomputes in float64. Reading the flag is free on the CPU; on accelerators
        # the fused path sums in float64 and the foreach path documents the limit.
        zero = (sq == 0).tolist()
        if any(zero):
            marks = [
                bool(z and tensors[i].numel() > 0 and bool(tensors[i].ne(0).any()))
                for i, z in enumerate(zero)
            ]
            if any(marks):
                sq = torch.where(torch.tensor(marks), torch.full_like(sq, _SUBNORMAL32), sq)
    return sq


def tensor_dots(
    a: Sequence[Tensor], b: Sequence[Tensor], *, dtype: torch.dtype | None = None
) -> Tensor:
    """``<a[i], b[i]>`` for every ``i``, as one 1-D tensor, accumulated in float32 or wider
    (``dtype`` when given).

    Tensors of one pair may differ in dtype; the narrower one is widened for that pair
    only (a transient the size of one tensor).
    """
    if len(a) != len(b):
        raise ValueError(f"tensor_dots: {len(a)} tensors against {len(b)}")
    if len(a) == 0:
        return torch.zeros(0)
    out: list[Tensor | None] = []
    for x, y in zip(a, b):
        cdtype = dtype or _compute_dtype(x.dtype, y.dtype)
        xf = x.reshape(-1)
        yf = y.reshape(-1)
        if xf.dtype != cdtype:
            xf = xf.to(cdtype)
        if yf.dtype != cdtype:
            yf = yf.to(cdtype)
        out.append(torch.dot(xf, yf))
    return _stack_scalars(out, a[0].device)


def _one_group(groups: dict[_Key, list[int]], n: int) -> bool:
    """Whether ``groups`` is a single group holding indices ``0 .. n-1`` in order: then a
    group's result vector is already the result, with no per-tensor work."""
    return len(groups) == 1 and next(iter(groups.values())) == list(range(n))


def _stack_scalars(values: Sequence[Tensor | None], device: torch.device) -> Tensor:
    """Stack 0-dim tensors into one vector on ``device`` (promoting to the widest dtype)."""
    vals = [v for v in values if v is not None]
    assert len(vals) == len(values)
    dtype = _compute_dtype(*(v.dtype for v in vals))
    return torch.stack([v.to(device=device, dtype=dtype) for v in vals])


def segment_sum(values: Tensor, segments: Sequence[int] | None) -> Tensor:
    """Sum consecutive runs of ``values``.

    ``segments`` gives the length of each run (they must add up to ``len(values)``);
    ``None`` means one run over everything. Returns a 1-D tensor with one entry per run.
    """
    if segments is None:
        return values.sum(0, keepdim=True)
    if sum(segments) != values.shape[0]:
        raise ValueError(f"segments add up to {sum(segments)}, expected {values.shape[0]}")
    if len(segments) == values.shape[0]:
        return values
    return torch.stack([v.sum(0) for v in torch.split(values, list(segments))])


def expand_segments(per_segment: Tensor, segments: Sequence[int] | None, n: int) -> Tensor:
    """Inverse of :func:`segment_sum`'s grouping: one entry per tensor, copied from its run."""
    if segments is None:
        return per_segment.expand(n)
    if len(segments) == n:
        return per_segment
    return torch.cat([c.expand(s) for c, s in zip(per_segment.unbind(), segments)])


def conflict_coefficients(dot: Tensor, ema_sq_norm: Tensor) -> Tensor:
    """The multiple of the retain memory to subtract, elementwise over segments.

    For a gradient ``g`` and memory ``m`` with ``dot = <g, m>`` and
    ``ema_sq_norm = ||m||^2``, returns ``c = min(dot, 0) / ||m||^2`` (``0`` where
    ``||m|| = 0``), so that ``g - c * m`` is the closest vector to ``g`` with
    ``<g - c * m, m> >= 0``. Never divides by zero; the result is on the device.
    """
    positive = ema_sq_norm > 0
    safe = torch.where(positive, ema_sq_norm, torch.ones_like(ema_sq_norm))
    return torch.where(positive & (dot < 0), dot / safe, torch.zeros_like(dot))


def cosclip_coefficients(
    dot: Tensor, ema_sq_norm: Tensor, grad_sq_norm: Tensor, threshold: float | Tensor
) -> Tensor:
    """The authors' partial projection ("cos clip"), elementwise over segments.

    With ``cos = dot / (||g|| ||m||)``: where ``cos >= threshold`` (and ``dot < 0``) this
    is the full projection of :func:`conflict_coefficients`; where ``cos < threshold``
    only the part of the conflict beyond the threshold is removed,
    ``c = threshold * ||g|| / ||m||``, which leaves ``<g - c m, m> = ||g|| ||m||
    (cos - threshold) < 0``. In one expression:
    ``c = min(0, max(dot, threshold * ||g|| * ||m||)) / ||m||^2``. ``threshold = -1``
    is the paper's rule, ``threshold = 0`` never projects; the authors use ``-0.5``.
    """
    positive = ema_sq_norm > 0
    safe = torch.where(positive, ema_sq_norm, torch.ones_like(ema_sq_norm))
    floor = (
        torch.as_tensor(threshold, dtype=dot.dtype, device=dot.device)
        * (grad_sq_norm.to(dot.dtype) * ema_sq_norm).sqrt()
    )
    clipped = torch.minimum(torch.maximum(dot, floor), torch.zeros_like(dot))
    return torch.where(positive, clipped / safe, torch.zeros_like(dot))


def sum_sq(
    tensors: Sequence[Tensor],
    *,
    all_reduce: Callable[[Tensor], None] | None = None,
    foreach: bool | None = None,
    fused: bool = False,
) -> Tensor:
    """``sum ||t||^2`` over ``tensors`` as a 0-dim tensor (summed across processes with
    ``all_reduce``). Infinite only if an element is not finite, or, off the CPU, if the
    float32 sum overflows: on the CPU an overflowing float32 sum is recomputed in
    float64 (the fused path always accumulates in float64)."""
    if len(tensors) == 0:
        return torch.zeros(())

    def total(dtype: torch.dtype | None) -> Tensor:
        t = tensor_sq_norms(tensors, foreach=foreach, dtype=dtype, fused=fused).sum().reshape(1)
        if all_reduce is not None:
            all_reduce(t)
        return t[0]

    out = total(None)
    if out.dtype == torch.float32 and out.device.type == "cpu" and not bool(torch.isfinite(out)):
        out = total(torch.float64)
    return out


def clip_coefficient(norm: Tensor, max_norm: float) -> Tensor:
    """The factor that clips a gradient of norm ``norm`` to ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` computes it: ``min(1, max_norm / (norm + 1e-6))``."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def total_norm(
    tensors: Sequence[Tensor],
    *,
    all_reduce: Callable[[Tensor], None] | None = None,
    foreach: bool | None = None,
) -> Tensor:
    """The L2 norm of all ``tensors`` together, as a 0-dim tensor (float32 or wider).

    Without ``all_reduce`` it is computed as ``torch.nn.utils.clip_grad_norm_`` does (the
    norm of the per-tensor norms); with it the squared norms of the local shards are
    summed across processes first.
    """
    if len(tensors) == 0:
        return torch.zeros(())
    sq = tensor_sq_norms(tensors, foreach=foreach)
    if all_reduce is not None:
        total = sq.sum().reshape(1)
        all_reduce(total)
        return total[0].sqrt()
    out: Tensor = torch.linalg.vector_norm(sq.sqrt())
    return out


def project_(
    tensors: Sequence[Tensor],
    ema: Sequence[Tensor],
    coefs: Tensor,
    *,
    foreach: bool | None = None,
    fused: bool = False,
    skip: Tensor | None = None,
) -> None:
    """In place: ``tensors[i] <- tensors[i] - coefs[i] * ema[i]``.

    ``coefs`` is a 1-D tensor with one coefficient per tensor. On accelerators the
    coefficients stay on the device (no host synchronisation); on the CPU, where reading
    a scalar costs nothing, tensors whose coefficient is zero are left untouched.
    ``skip`` (a 0-dim tensor): change nothing if it is true (read on the device by the
    fused path, on the host by the others).
    """
    if len(tensors) != len(ema) or coefs.shape[0] != len(tensors):
        raise ValueError("project_: tensors, ema and coefs must have the same length")
    if len(tensors) == 0:
        return
    if fused and _fusable(tensors, ema):
        from . import _fused

        for (dev, _, _), idx in _group(tensors, ema).items():
            sk = skip if skip is not None else torch.zeros((), dtype=torch.bool, device=dev)
            _fused.project_(
                [tensors[i] for i in idx],
                [ema[i] for i in idx],
                coefs.to(dev)
                if len(idx) == len(tensors)
                else torch.stack([coefs[i] for i in idx]).to(dev),
                sk.to(dev),
            )
        return
    if skip is not None and bool(skip):
        return
    if coefs.device.type == "cpu":
        host = coefs.tolist()
        use_foreach = _default_foreach(tensors) if foreach is None else foreach
        if use_foreach and all(c == host[0] for c in host):
            if host[0] != 0.0:
                for _, idx in _group(tensors, ema).items():
                    torch._foreach_add_(
                        [tensors[i] for i in idx], [ema[i] for i in idx], alpha=-host[0]
                    )
            return
        for t, m, c in zip(tensors, ema, host):
            if c != 0.0:
                t.add_(m, alpha=-c)
        return
    by_device: dict[torch.device, Tensor] = {}
    for t, m, i in zip(tensors, ema, range(len(tensors))):
        c = by_device.get(t.device)
        if c is None:
            c = by_device[t.device] = coefs.to(t.device, non_blocking=True)
        t.addcmul_(m, c[i], value=-1)


class SegmentStats(NamedTuple):
    """Per-segment sums of one rectification (1-D tensors, one entry per segment), summed
    across processes when the tensors are shards."""

    dot: Tensor
    """``<g, m>`` (less the caller's ``dot_offsets``)."""
    ema_sq_norm: Tensor
    """``||m||^2``."""
    grad_sq_norm: Tensor
    """``||g||^2``, over every tensor of the segment (those without a memory too)."""
    in_range: Tensor
    """``True`` where the sums are finite and inside float32's dynamic range (see the
    module's docstring); always ``True`` for float64 sums."""


_COUNTS: dict[tuple[torch.device, torch.dtype, tuple[int, ...]], Tensor] = {}


def _counts(numels: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Element counts as a tensor on ``device``, made once per layout (no host-to-device
    copy on later steps)."""
    key = (device, dtype, numels)
    t = _COUNTS.get(key)
    if t is None:
        if len(_COUNTS) > 256:
            _COUNTS.clear()
        t = _COUNTS[key] = torch.tensor([float(n) for n in numels], dtype=dtype, device=device)
    return t


def _per_tensor(
    tensors: Sequence[Tensor],
    ema: Sequence[Tensor | None],
    dtype: torch.dtype | None,
    foreach: bool | None,
    numels: Sequence[int] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per tensor: ``<g, m>``, ``||m||^2``, ``||g||^2`` and the element counts of ``m``
    and ``g`` (zeros where a tensor has no memory)."""
    have = [i for i, m in enumerate(ema) if m is not None]
    g_sq = tensor_sq_norms(tensors, foreach=foreach, dtype=dtype)
    dev = tensors[0].device
    if have:
        pm = [ema[i] for i in have]
        d = tensor_dots([tensors[i] for i in have], pm, dtype=dtype)  # type: ignore[arg-type]
        s = tensor_sq_norms(pm, foreach=foreach, dtype=dtype)  # type: ignore[arg-type]
        cdtype = _compute_dtype(g_sq.dtype, d.dtype, s.dtype)
        g_sq, d, s = g_sq.to(cdtype), d.to(cdtype), s.to(cdtype)
        if len(have) == len(tensors):
            dots, m_sq = d, s
        else:
            zero = g_sq.new_zeros(())
            dl: list[Tensor] = [zero] * len(tensors)
            sl: list[Tensor] = [zero] * len(tensors)
            for j, i in enumerate(have):
                dl[i], sl[i] = d[j], s[j]
            dots, m_sq = torch.stack(dl), torch.stack(sl)
    else:
        dots = m_sq = torch.zeros_like(g_sq)
    cdtype = g_sq.dtype
    sizes = tuple(numels) if numels is not None else tuple(t.numel() for t in tensors)
    n_g = _counts(sizes, cdtype, dev)
    n_m = _counts(tuple(0 if m is None else n for m, n in zip(ema, sizes)), cdtype, dev)
    return dots, m_sq, g_sq, n_m, n_g


def _in_range(dot: Tensor, m_sq: Tensor, g_sq: Tensor, n_m: Tensor, n_g: Tensor) -> Tensor:
    """Where float32 sums can be trusted: finite, and no sum made of subnormal squares."""
    finite = torch.isfinite(dot) & torch.isfinite(m_sq) & torch.isfinite(g_sq)
    if dot.dtype == torch.float64:
        return finite
    # A non-zero sum below n * FLT_MIN may be made of subnormal products; a zero sum with
    # a non-zero dot product means every square underflowed.
    m_ok = torch.where(m_sq == 0, dot == 0, m_sq >= n_m * _TINY32)
    g_ok = torch.where(g_sq == 0, dot == 0, g_sq >= n_g * _TINY32)
    return finite & m_ok & g_ok


def _fused_per_tensor(
    tensors: Sequence[Tensor], ema: Sequence[Tensor | None]
) -> tuple[Tensor, Tensor, Tensor]:
    """Per tensor ``<g, m>``, ``|m|^2``, ``|g|^2`` by the fused kernels (float64, one pass
    over each pair)."""
    from . import _fused

    n = len(tensors)
    out: list[Tensor | None] = [None] * n
    paired = [i for i in range(n) if ema[i] is not None]
    alone = [i for i in range(n) if ema[i] is None]
    groups = _group([tensors[i] for i in paired], [ema[i] for i in paired])  # type: ignore[misc]
    for (_, _, _), idx in groups.items():
        rows = _fused.stats([tensors[paired[j]] for j in idx], [ema[paired[j]] for j in idx])  # type: ignore[misc]
        if not alone and _one_group(groups, n):
            return rows[:, 0], rows[:, 2], rows[:, 1]
        for j, row in zip(idx, rows.unbind()):
            out[paired[j]] = row
    for (_, _, _), idx in _group([tensors[i] for i in alone]).items():
        sq = _fused.sum_squares([tensors[alone[j]] for j in idx])
        for j, v in zip(idx, sq.unbind()):
            out[alone[j]] = torch.stack([v.new_zeros(()), v, v.new_zeros(())])
    rows = torch.stack(out)  # type: ignore[arg-type]
    return rows[:, 0], rows[:, 2], rows[:, 1]


def segment_stats(
    tensors: Sequence[Tensor],
    ema: Sequence[Tensor | None],
    segments: Sequence[int] | None,
    *,
    dot_offsets: Tensor | None = None,
    all_reduce: Callable[[Tensor], None] | None = None,
    foreach: bool | None = None,
    numels: Sequence[int] | None = None,
    fused: bool = False,
) -> SegmentStats:
    """The sums every rule needs, per segment (``segments`` as in :func:`segment_sum`).

    ``ema[i]`` may be ``None`` (a tensor without a memory: it adds to ``||g||^2`` only).
    ``dot_offsets`` (one entry per tensor) is subtracted from the dot products. With
    ``all_reduce`` the partial sums of every process are added with one collective on
    one packed tensor (``[dot, ||m||^2, ||g||^2]`` per segment; a second one on the CPU
    when a segment needs the float64 recomputation). ``numels`` gives each tensor's
    element count when the tensors are shards of larger ones (the range check uses it).
    """
    if len(tensors) != len(ema):
        raise ValueError(f"segment_stats: {len(tensors)} tensors but {len(ema)} buffers")
    if fused and tensors and _fusable(tensors, ema):
        # float64 sums over float32 (or narrower) elements: exact, no range check needed
        dots, m_sq, g_sq = _fused_per_tensor(tensors, ema)
        if dot_offsets is not None:
            dots = dots - dot_offsets.to(dots)
        packed = torch.stack([segment_sum(v, segments) for v in (dots, m_sq, g_sq)])
        if all_reduce is not None:
            all_reduce(packed)
        return SegmentStats(packed[0], packed[1], packed[2], torch.isfinite(packed).all(0))

    def sums(dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        dots, m_sq, g_sq, n_m, n_g = _per_tensor(tensors, ema, dtype, foreach, numels)
        if dot_offsets is not None:
            dots = dots - dot_offsets.to(dots)
        packed = torch.stack([segment_sum(v, segments) for v in (dots, m_sq, g_sq)])
        if all_reduce is not None:
            all_reduce(packed)
        counts = torch.stack([segment_sum(n_m, segments), segment_sum(n_g, segments)])
        return packed, counts

    packed, counts = sums(None)
    ok = _in_range(*packed.unbind(), *counts.unbind())
    if packed.dtype == torch.float32 and packed.device.type == "cpu" and not bool(ok.all()):
        # Reading a flag costs nothing on the CPU: recompute exactly instead of skipping.
        # Every process sees the same reduced flags, so all take this branch together.
        packed, _ = sums(torch.float64)
        # Exact now; the vectors themselves must still have a float32 norm.
        ok = torch.isfinite(packed).all(0) & (packed[1:] <= _MAX32_SQ).all(0)
    return SegmentStats(packed[0], packed[1], packed[2], ok)


def segment_dots(
    tensors: Sequence[Tensor],
    ema: Sequence[Tensor],
    segments: Sequence[int] | None,
    *,
    dot_offsets: Tensor | None = None,
    extra: Tensor | None = None,
    all_reduce: Callable[[Tensor], None] | None = None,
    foreach: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per segment, ``<tensors, ema>`` (less the per-tensor ``dot_offsets``) and
    ``||ema||^2``, as two 1-D tensors (segments as in :func:`segment_sum`).

    With ``all_reduce`` the partial sums of every process are added with one collective
    on one packed tensor, which also carries ``extra`` (any 1-D tensor of values to sum
    across processes, returned as the third element; ``None`` when not given).
    """
    dots = tensor_dots(tensors, ema)
    if dot_offsets is not None:
        dots = dots - dot_offsets.to(dots)
    sq = tensor_sq_norms(ema, foreach=foreach).to(dots.dtype)
    seg_dot = segment_sum(dots, segments)
    seg_sq = segment_sum(sq, segments)
    if all_reduce is not None:
        k = seg_dot.shape[0]
        parts = [seg_dot, seg_sq] + ([extra.to(seg_dot)] if extra is not None else [])
        packed = torch.cat(parts)
        all_reduce(packed)
        seg_dot, seg_sq = packed[:k], packed[k : 2 * k]
        if extra is not None:
            extra = packed[2 * k :]
    return seg_dot, seg_sq, extra


class RectifyResult(NamedTuple):
    """Per-segment quantities of one rectification (1-D tensors, one entry per segment)."""

    dot: Tensor
    """``<g, m>`` before rectification."""
    ema_sq_norm: Tensor
    """``||m||^2``."""
    coef: Tensor
    """The multiple of ``m`` that was subtracted (``0`` where there was no conflict)."""


def rectify_(
    grads: Sequence[Tensor],
    ema: Sequence[Tensor],
    *,
    segments: Sequence[int] | None = None,
    dot_offsets: Tensor | None = None,
    all_reduce: Callable[[Tensor], None] | None = None,
    foreach: bool | None = None,
) -> RectifyResult:
    """Rectify ``grads`` against the retain memory ``ema`` in place (the GRU rule).

    Per segment (``segments`` as in :func:`segment_sum`; ``None`` is one global segment,
    the paper's rule), with ``d = <g, m>``: if ``d < 0`` and ``m != 0`` the gradient
    becomes ``g - d / ||m||^2 * m``, otherwise it is left exactly as it was. Afterwards
    ``<g, m> >= 0`` per segment up to rounding.

    ``dot_offsets`` (one entry per tensor) is subtracted from the per-tensor dot products
    before the decision: it lets a caller rectify the part ``g - r`` of a gradient while
    ``r`` (whose dots with ``m`` it already knows) stays in place. ``all_reduce``, when
    given, sums a packed 1-D tensor across processes in place (for sharded tensors whose
    dot products are partial sums).
    """
    n = len(grads)
    if n != len(ema):
        raise ValueError(f"rectify_: {n} gradients but {len(ema)} buffers")
    if n == 0:
        z = torch.zeros(0)
        return RectifyResult(z, z, z)
    stats = segment_stats(
        grads, ema, segments, dot_offsets=dot_offsets, all_reduce=all_reduce, foreach=foreach
    )
    coef = conflict_coefficients(stats.dot, stats.ema_sq_norm)
    project_(grads, ema, expand_segments(coef, segments, n), foreach=foreach)
    return RectifyResult(stats.dot, stats.ema_sq_norm, coef)
