"""The Triton kernels of the fused path (imported only when a fused pass runs: importing
this module imports Triton). See :mod:`gru_optim._fused` for what they compute."""

# mypy: ignore-errors
# Triton's JIT reads these functions' source; they are not typed Python.

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _loc(tids, starts, sizes, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(tids + pid)
    offs = tl.load(starts + pid) + tl.arange(0, BLOCK)
    return pid, t, offs, offs < tl.load(sizes + t)


@triton.jit
def sumsq(ptrs, sizes, tids, starts, out, X: tl.constexpr, BLOCK: tl.constexpr):
    pid, t, offs, mask = _loc(tids, starts, sizes, BLOCK)
    p = tl.load(ptrs + t).to(tl.pointer_type(X))
    x = tl.load(p + offs, mask=mask, other=0.0).to(tl.float64)
    tl.store(out + pid, tl.sum(x * x, axis=0))


@triton.jit
def fold(
    g_ptrs,
    m_ptrs,
    sizes,
    tids,
    starts,
    gammas,
    gate,
    out,
    G: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    SUMSQ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # SUMSQ: also each block's |g|^2 into out (as sumsq does), whatever the gate says.
    pid, t, offs, mask = _loc(tids, starts, sizes, BLOCK)
    on = tl.load(gate) != 0
    if on | SUMSQ:
        gp = tl.load(g_ptrs + t).to(tl.pointer_type(G))
        graw = tl.load(gp + offs, mask=mask, other=0.0)
        if SUMSQ:
            x = graw.to(tl.float64)
            tl.store(out + pid, tl.sum(x * x, axis=0))
        if on:
            mp = tl.load(m_ptrs + t).to(tl.pointer_type(M))
            w = tl.load(gammas + t).to(C)
            g = graw.to(C)
            m = tl.load(mp + offs, mask=mask, other=0.0).to(C)
            # torch.lerp's formula, so that the fused and foreach paths round alike;
            # gamma = 1 is a copy, as on the foreach path (g - m may overflow, and
            # inf * 0 is NaN)
            new = tl.where(w < 0.5, m + w * (g - m), g - (g - m) * (1.0 - w))
            new = tl.where(w == 1.0, g, new)
            tl.store(mp + offs, new.to(M), mask=mask)


@triton.jit
def stats(
    g_ptrs, m_ptrs, sizes, tids, starts, out, G: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr
):
    pid, t, offs, mask = _loc(tids, starts, sizes, BLOCK)
    gp = tl.load(g_ptrs + t).to(tl.pointer_type(G))
    mp = tl.load(m_ptrs + t).to(tl.pointer_type(M))
    g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float64)
    m = tl.load(mp + offs, mask=mask, other=0.0).to(tl.float64)
    tl.store(out + 3 * pid, tl.sum(g * m, axis=0))
    tl.store(out + 3 * pid + 1, tl.sum(g * g, axis=0))
    tl.store(out + 3 * pid + 2, tl.sum(m * m, axis=0))


@triton.jit
def project(
    g_ptrs,
    m_ptrs,
    sizes,
    tids,
    starts,
    coefs,
    skip,
    G: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid, t, offs, mask = _loc(tids, starts, sizes, BLOCK)
    c = tl.load(coefs + t).to(C)
    if (tl.load(skip) == 0) & (c != 0):
        gp = tl.load(g_ptrs + t).to(tl.pointer_type(G))
        mp = tl.load(m_ptrs + t).to(tl.pointer_type(M))
        g = tl.load(gp + offs, mask=mask, other=0.0).to(C)
        m = tl.load(mp + offs, mask=mask, other=0.0).to(C)
        tl.store(gp + offs, (g - c * m).to(G), mask=mask)


@triton.jit
def reduce(partials, first, count, out, NCOL: tl.constexpr, CHUNK: tl.constexpr):
    # Per tensor: the sum of its blocks' partials, in a fixed order.
    t = tl.program_id(0)
    start = tl.load(first + t)
    n = tl.load(count + t)
    for c in tl.static_range(NCOL):
        acc = tl.zeros((CHUNK,), dtype=tl.float64)
        for i in range(0, n, CHUNK):
            idx = i + tl.arange(0, CHUNK)
            acc += tl.load(partials + (start + idx) * NCOL + c, mask=idx < n, other=0.0)
        tl.store(out + t * NCOL + c, tl.sum(acc, axis=0))


DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}
