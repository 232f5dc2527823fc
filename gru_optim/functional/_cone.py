"""The projection onto a polyhedral cone, from Gram matrices: GRU with several retain
directions (GRU-k).

With directions ``d_1 .. d_k`` (the memory and recent raw retain gradients) and a
gradient ``g``, the rectified gradient is the closest point to ``g`` with
``<x, d_i> >= 0`` for every direction of non-zero norm. Its solution is
``x = g + sum_i lambda_i d_i`` with ``lambda >= 0`` minimising

    0.5 lambda^T G lambda + lambda^T b,    G_ij = <d_i, d_j>,  b_i = <g, d_i>,

a ``k``-dimensional non-negative least-squares problem; KKT: the slacks
``s = G lambda + b = D^T x`` are ``>= 0``, ``lambda >= 0``, ``lambda_i s_i = 0``. For
``k = 1`` it is GRU's closed form.

Everything here works on the tiny per-segment matrices only (``k <= 16``), in float64,
on the device of the inputs:

- **Normalisation.** The cone does not change when a direction is scaled, so the problem
  is solved on the correlation matrix ``G_ij / (|d_i| |d_j|)`` and ``b_i / |d_i|``; the
  multipliers are scaled back. A direction of zero norm is no constraint.
- **Exact solvers.** :func:`cone_coefficients` enumerates every active set (``2^k``
  small systems, batched, with no host synchronisation: the default off the CPU) or runs
  the Lawson-Hanson active-set method (a few ``k x k`` solves with data-dependent control
  flow: the default on the CPU, where reading a flag costs nothing). Both return a point
  that satisfies the KKT conditions to rounding; the tests check they agree.
- **Rounding-level slack.** Near-redundant directions (the memory lies in the span of the
  recent gradients during the first ``k`` steps; oscillating retain gradients) make ``G``
  (nearly) singular, and the multipliers of the exact solution can be large while
  ``x`` itself stays short. A candidate's normalised slacks ``s_i / |d_i|`` and
  multipliers are accepted down to ``-tol``, with the backward-error tolerance
  ``tol = 64 eps (|g| + sum_j mu_j)`` (``eps`` the precision of the sums, float32 or
  float64; ``mu`` the normalised multipliers: every term of a slack is at most that
  large, so this is what its rounding can reach). Among the active sets that satisfy the
  KKT conditions to that tolerance the smallest is taken (then the one of least
  objective), which is the best conditioned: a singular subsystem (a pivot below
  ``64 eps``) is never used, its direction being, to the precision of the sums, in the
  span of the others. A multiplier below ``tol`` is zero and its direction not active.
  Should rounding leave no candidate inside the tolerance, the candidate whose returned
  point violates the constraints least is taken (the empty set, ``x = g``, is one of
  them, so the result never violates more than ``g`` did); ``min_slack`` then shows it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ConeSolution", "cone_coefficients"]

_CHUNK = 4096  # active sets per batched solve (bounds the transient memory)


class ConeSolution(NamedTuple):
    """The multipliers of the cone projection, per segment (``S`` segments, ``k``
    directions), and its KKT quality."""

    coef: Tensor
    """``(S, k)``: ``lambda >= 0`` with ``x = g + sum_i lambda_i d_i``."""
    slack: Tensor
    """``(S, k)``: ``<x, d_i> / |d_i|`` at the solution (``+inf`` for zero directions)."""
    active: Tensor
    """``(S,)``: how many constraints bind (``lambda_i > 0``)."""


def _normalise(gram: Tensor, dots: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = gram.to(torch.float64)
    b = dots.to(torch.float64)
    norms = torch.diagonal(g, dim1=-2, dim2=-1).clamp(min=0).sqrt()
    valid = norms > 0
    safe = torch.where(valid, norms, torch.ones_like(norms))
    c = g / (safe[..., :, None] * safe[..., None, :])
    eye = torch.eye(g.shape[-1], dtype=torch.float64, device=g.device)
    pair = valid[..., :, None] & valid[..., None, :]
    c = torch.where(pair, c, eye.expand_as(c))
    bn = torch.where(valid, b / safe, torch.zeros_like(b))
    return c, bn, valid, safe


def _rel(dtype: torch.dtype) -> float:
    """``64 eps`` of the precision the sums were accumulated in."""
    return 64.0 * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _tolerance(grad_sq_norm: Tensor, dtype: torch.dtype) -> Tensor:
    """``64 eps |g|``: the part of the tolerance that does not depend on the solution."""
    return _rel(dtype) * grad_sq_norm.to(torch.float64).clamp(min=0).sqrt()


def _kkt_tol(tol: Tensor, mu: Tensor, rel: float) -> Tensor:
    """``64 eps (|g| + sum_j |mu_j|)`` per candidate (see the module docstring)."""
    return tol + rel * mu.abs().sum(-1)


def _spd_solve(
    a: Tensor, rhs: Tensor, active: Tensor, pivot_tol: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """Solve ``a[S, S] x_S = rhs_S`` for the ``active`` set ``S``, batched over leading
    dimensions, by Gauss-Jordan elimination without pivoting (``a`` is a correlation
    matrix: symmetric positive semi-definite with unit diagonal). A pivot below
    ``pivot_tol`` (its direction is, to the precision of the sums, in the span of the
    earlier ones) is dropped: its unknown is zero. Elementwise operations only: the result
    does not depend on memory layout or threads (LAPACK's can), so resuming is bitwise.

    Returns ``(x, kept)``: ``x`` zero outside ``S`` and on dropped pivots."""
    a = torch.where(active[..., :, None] & active[..., None, :], a, torch.zeros_like(a))
    x = torch.where(active, rhs, torch.zeros_like(rhs))
    kept = active.clone()
    k = a.shape[-1]
    for j in range(k):
        piv = a[..., j, j]
        ok = kept[..., j] & (piv > pivot_tol)
        kept[..., j] = ok
        safe = torch.where(ok, piv, torch.ones_like(piv))
        f = torch.where(
            ok[..., None], a[..., :, j] / safe[..., None], torch.zeros_like(a[..., :, j])
        )
        f[..., j] = 0.0
        a = a - f[..., :, None] * a[..., None, j, :]
        x = x - f * x[..., j : j + 1]
    diag = torch.diagonal(a, dim1=-2, dim2=-1)
    safe = torch.where(kept, diag, torch.ones_like(diag))
    return torch.where(kept, x / safe, torch.zeros_like(x)), kept


def _slack(c: Tensor, mu: Tensor, b: Tensor) -> Tensor:
    """``c mu + b`` with an elementwise product and a sum (layout-independent)."""
    return (c * mu[..., None, :]).sum(-1) + b


def _enumerate(
    c: Tensor, b: Tensor, valid: Tensor, tol: Tensor, pivot_tol: float, rel: float
) -> Tensor:
    """Normalised multipliers by enumeration of the active sets (no host reads)."""
    s_count, k = b.shape
    device = b.device
    best_mu = torch.zeros_like(b)
    best_key = torch.full((s_count,), float("inf"), dtype=torch.float64, device=device)
    fallback_mu = torch.zeros_like(b)
    fallback_key = torch.full((s_count,), float("inf"), dtype=torch.float64, device=device)
    bits = torch.arange(k, device=device)
    for start in range(0, 1 << k, _CHUNK):
        ids = torch.arange(start, min(start + _CHUNK, 1 << k), device=device)
        m = ((ids[:, None] >> bits) & 1).to(torch.bool)  # (C, k)
        mm = m[None] & valid[:, None, :]  # (S, C, k): a zero direction is never active
        mu, kept = _spd_solve(
            c[:, None].expand(-1, mm.shape[1], -1, -1),
            -b[:, None, :].expand_as(mm).to(c),
            mm,
            pivot_tol,
        )
        info = (kept != mm).any(-1).to(torch.int64)  # a dependent set: singular
        slack = _slack(c[:, None], mu, b[:, None, :])
        t = _kkt_tol(tol[:, None], mu, rel)[..., None]
        ok_mu = torch.where(mm, mu >= -t, torch.ones_like(mm))
        ok_s = torch.where(valid[:, None, :], slack >= -t, torch.ones_like(mm))
        duplicate = (m[None] & ~valid[:, None, :]).any(-1)  # same set as one without them
        regular = (info == 0) & ~duplicate
        good = regular & ok_mu.all(-1) & ok_s.all(-1)
        mu = torch.where(mm, mu.clamp(min=0), torch.zeros_like(mu))
        slack = _slack(c[:, None], mu, b[:, None, :])  # of the point actually returned
        obj = 0.5 * (mu * (slack - b[:, None, :])).sum(-1) + (mu * b[:, None, :]).sum(-1)
        size = mm.sum(-1).to(torch.float64)
        # Smallest active set first, then the least objective.
        key = torch.where(good, size * 1e30 + obj, torch.full_like(obj, float("inf")))
        k_min, idx = key.min(-1)
        better = k_min < best_key
        best_key = torch.where(better, k_min, best_key)
        best_mu = torch.where(better[:, None], mu[torch.arange(s_count), idx], best_mu)
        # If rounding leaves no candidate exact to tol: the returned point that violates
        # the constraints least (the empty set, x = g, is a candidate).
        viol = torch.where(valid[:, None, :], (-slack).clamp(min=0), torch.zeros_like(slack))
        viol = torch.where(regular, viol.amax(-1), torch.full_like(size, float("inf")))
        v_min, v_idx = viol.min(-1)
        fb_better = v_min < fallback_key
        fallback_key = torch.where(fb_better, v_min, fallback_key)
        fallback_mu = torch.where(fb_better[:, None], mu[torch.arange(s_count), v_idx], fallback_mu)
    found = torch.isfinite(best_key)
    return torch.where(found[:, None], best_mu, fallback_mu)


def _active_set(
    c: Tensor, b: Tensor, valid: Tensor, tol: Tensor, pivot_tol: float, rel: float
) -> Tensor:
    """Normalised multipliers by the Lawson-Hanson active-set method (host control flow:
    for the CPU)."""
    out = torch.zeros_like(b)
    k = b.shape[-1]
    for s in range(b.shape[0]):
        cs, bs, vs, t = c[s], b[s], valid[s], float(tol[s])
        mu = torch.zeros(k, dtype=torch.float64)
        passive = torch.zeros(k, dtype=torch.bool)
        for _ in range(3 * k + 10):
            w = -_slack(cs, mu, bs)  # minus the slack: positive where a constraint is violated
            w = torch.where(vs & ~passive, w, torch.full_like(w, -float("inf")))
            j = int(torch.argmax(w))
            if not float(w[j]) > t + rel * float(mu.abs().sum()):
                break
            passive[j] = True
            for _ in range(3 * k + 10):
                z, _ = _spd_solve(cs, -bs, passive, pivot_tol)
                if bool((z[passive] > 0).all()):
                    mu = z
                    break
                neg = passive & (z <= 0)
                ratio = torch.where(
                    neg, mu / (mu - z).clamp(min=1e-300), torch.full_like(mu, float("inf"))
                )
                i = int(torch.argmin(ratio))
                mu = mu + ratio[i] * (z - mu)
                # The blocking index leaves exactly (rounding would keep it at 1e-17 and
                # stall the method), and so does every multiplier at rounding level.
                passive[i] = False
                passive &= mu > t
                mu = torch.where(passive, mu, torch.zeros_like(mu))
        out[s] = mu.clamp(min=0)
    return out


def cone_coefficients(
    gram: Tensor,
    dots: Tensor,
    grad_sq_norm: Tensor,
    *,
    method: str | None = None,
    precision: torch.dtype = torch.float32,
) -> ConeSolution:
    """The multipliers of the projection of ``g`` onto the cone ``{x : <x, d_i> >= 0}``.

    Args:
        gram: ``(S, k, k)`` Gram matrices ``<d_i, d_j>`` of each segment.
        dots: ``(S, k)`` ``<g, d_i>``.
        grad_sq_norm: ``(S,)`` ``|g|^2`` (sets the rounding tolerance).
        method: ``"enumerate"``, ``"active_set"`` or ``None`` (active set on the CPU,
            enumeration elsewhere).
        precision: the dtype the sums were accumulated in (float32 or float64): the
            tolerance is ``64 eps |g|`` of that dtype.

    Returns the multipliers (``x = g + sum_i coef_i d_i``), the normalised slacks at the
    solution and the number of binding constraints, all on the inputs' device.
    """
    if gram.dim() != 3 or gram.shape[-1] != gram.shape[-2] or dots.shape != gram.shape[:2]:
        raise ValueError(
            f"cone_coefficients: gram {tuple(gram.shape)} and dots {tuple(dots.shape)}"
        )
    k = gram.shape[-1]
    if not 1 <= k <= 16:
        raise ValueError(f"cone_coefficients supports 1 to 16 directions, got {k}")
    c, b, valid, norms = _normalise(gram, dots)
    tol = _tolerance(grad_sq_norm, precision)
    rel = pivot_tol = _rel(precision)
    if method is None:
        method = "active_set" if gram.device.type == "cpu" else "enumerate"
    if method == "enumerate":
        mu = _enumerate(c, b, valid, tol, pivot_tol, rel)
    elif method == "active_set":
        mu = _active_set(c.cpu(), b.cpu(), valid.cpu(), tol.cpu(), pivot_tol, rel).to(b.device)
        # Insurance: a segment the active-set method left outside the KKT conditions
        # (rounding in a nearly singular system can stall it) is solved by enumeration.
        slack = _slack(c, mu, b)
        bad = (valid & (slack < -_kkt_tol(tol, mu, rel)[:, None])).any(-1)
        if bool(bad.any()):
            redo = _enumerate(c[bad], b[bad], valid[bad], tol[bad], pivot_tol, rel)
            mu = mu.clone()
            mu[bad] = redo
    else:
        raise ValueError(f"method must be 'enumerate' or 'active_set', got {method!r}")
    mu = torch.where(mu > tol[:, None], mu, torch.zeros_like(mu))
    slack = _slack(c, mu, b)
    slack = torch.where(valid, slack, torch.full_like(slack, float("inf")))
    coef = mu / norms
    return ConeSolution(coef, slack, (mu > 0).sum(-1))
