"""An independent float64 re-derivation of GRU, written from GRU_SPEC.md only.

It deliberately follows the authors' style rather than the package's: per-step dictionaries
of both gradients, flattening with ``torch.cat``, Python floats and a Python ``if`` for the
decision, float64 throughout. It shares no code with ``gru_optim``.

``ReferenceGRU`` drives a plain ``torch.optim`` optimizer on its own model: it computes the
retain gradient, updates the memory, computes the forget gradient, rectifies it (or, with
``space="update"``, the inner optimizer's parameter change) and writes it to ``.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])


def _unflat(vec: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        n = t.numel()
        out.append(vec[i : i + n].reshape(t.shape))
        i += n
    return out


def _grads64(params: list[Tensor]) -> dict[int, Tensor]:
    """A float64 copy of every gradient present, by parameter identity."""
    return {id(p): p.grad.detach().to(torch.float64).clone() for p in params if p.grad is not None}


def project_flat(
    g: Tensor, m: Tensor, cos_clip: float | None = None
) -> tuple[Tensor, float, float]:
    """The closed form of min ||x - g||^2 s.t. <x, m> >= 0, in float64; with ``cos_clip``
    the authors' partial projection (``orthogonal_component_COSCLIP``: when the cosine is
    below the threshold, subtract ``||g|| * threshold / ||m||`` times ``m``).

    Returns (x, d, coefficient) with d = <g, m>.
    """
    g = g.to(torch.float64)
    m = m.to(torch.float64)
    d = float(torch.dot(g, m))
    nm = float(torch.dot(m, m))
    if d < 0.0 and nm > 0.0:
        c = d / nm
        if cos_clip is not None:
            gn, mn = float(g.norm()), math.sqrt(nm)
            cos = d / (gn * mn)
            if cos < cos_clip:
                c = gn * cos_clip / mn
        return g - c * m, d, c
    return g.clone(), d, 0.0


def cone_project(g: Tensor, dirs: list[Tensor]) -> Tensor:
    """The closest point to g with <x, d> >= 0 for every non-zero d (GRU-k), by SciPy's
    non-negative least squares on the dual: x = g + D lambda, lambda = argmin
    ||D lambda + g||, lambda >= 0. float64."""
    import numpy as np
    from scipy.optimize import nnls

    cols = [d.to(torch.float64) for d in dirs if float(d.to(torch.float64).norm()) > 0]
    if not cols:
        return g.to(torch.float64).clone()
    d = torch.stack(cols, 1).numpy()
    lam, _ = nnls(d, -g.to(torch.float64).numpy(), maxiter=100 * d.shape[1])
    return g.to(torch.float64) + torch.from_numpy(d @ np.asarray(lam))


class ReferenceGRU:
    """GRU by the book, around a plain optimizer, in float64 arithmetic.

    ``groups`` lists the parameters of each segment source (the optimizer's param groups).
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        *,
        gamma: float = 0.8,
        granularity: str = "global",
        retain_weight: float = 0.0,
        space: str = "gradient",
        cos_clip: float | None = None,
        max_grad_norm: float | None = None,
        directions: int = 1,
    ) -> None:
        self.inner = inner
        self.directions = directions
        self.raw: dict[int, list[Tensor]] = {}  # recent raw retain gradients, newest last
        self.cos_clip = cos_clip
        self.max_grad_norm = max_grad_norm
        self.gamma = gamma
        self.granularity = granularity
        self.retain_weight = retain_weight
        self.space = space
        self.ema: dict[int, Tensor] = {}  # id(param) -> float64 memory
        self.history: list[dict[str, Any]] = []

    # -- helpers
    def params(self) -> list[Tensor]:
        out, seen = [], set()
        for g in self.inner.param_groups:
            for p in g["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _clip(self, grads: dict[int, Tensor]) -> None:
        """torch.nn.utils.clip_grad_norm_ in float64, on the final gradients."""
        if self.max_grad_norm is None or not grads:
            return
        norm = float(torch.cat([v.reshape(-1) for v in grads.values()]).norm())
        coef = min(1.0, self.max_grad_norm / (norm + 1e-6))
        for k in grads:
            grads[k] = grads[k] * coef

    def _segments(self, paired: list[Tensor]) -> list[list[Tensor]]:
        ids = {id(p) for p in paired}
        if self.granularity == "global":
            return [paired] if paired else []
        if self.granularity == "tensor":
            return [[p] for p in paired]
        segs = []
        for g in self.inner.param_groups:
            seg = [p for p in g["params"] if id(p) in ids]
            if seg:
                segs.append(seg)
        return segs

    def memory(self, p: Tensor) -> Tensor | None:
        return self.ema.get(id(p))

    # -- the two halves of a step
    def fold_retain(self, retain_fn: Callable[[], Any]) -> dict[int, Tensor]:
        """Run the retain closure from clean gradients and update the memory."""
        params = self.params()
        for p in params:
            p.grad = None
        with torch.enable_grad():
            retain_fn()
        g_r = _grads64(params)
        for p in params:
            k = id(p)
            if k in g_r:
                old = self.ema.get(k, torch.zeros_like(g_r[k]))
                self.ema[k] = self.gamma * g_r[k] + (1.0 - self.gamma) * old
            elif k in self.ema:
                self.ema[k] = (1.0 - self.gamma) * self.ema[k]
            if self.directions > 1 and k in self.ema:
                hist = self.raw.setdefault(k, [])
                hist.append(g_r[k].clone() if k in g_r else torch.zeros_like(self.ema[k]))
                del hist[: -(self.directions - 1)]
        for p in params:
            p.grad = None
        return g_r

    def _rectify(
        self, vec: Tensor, seg: list[Tensor], like: dict[int, Tensor]
    ) -> tuple[Tensor, float, float]:
        """Rectify the flat ``vec`` of segment ``seg``: (x, <vec, m>, coefficient of m)."""
        ms = [self.ema.get(id(p), torch.zeros_like(like[id(p)])) for p in seg]
        if self.directions == 1:
            return project_flat(vec, _flat(ms), self.cos_clip)
        dirs = [_flat(ms)]
        for j in range(self.directions - 1):
            col = []
            for p in seg:
                h = self.raw.get(id(p), [])
                # oldest first, padded with zeros before k - 1 folds
                h = [torch.zeros_like(like[id(p)])] * (self.directions - 1 - len(h)) + h
                col.append(h[j])
            dirs.append(_flat(col))
        x = cone_project(vec, dirs)
        d = float(vec.to(torch.float64) @ dirs[0])
        # "coefficient" only marks whether anything was projected
        return x, d, (0.0 if torch.equal(x, vec.to(torch.float64)) else float("nan"))

    def step(
        self,
        forget_fn: Callable[[], Any],
        retain_fn: Callable[[], Any],
        post_fn: Callable[[], Any] | None = None,
    ) -> dict[str, Any]:
        params = self.params()
        g_r = self.fold_retain(retain_fn)
        g_post: dict[int, Tensor] = {}
        if post_fn is not None:
            with torch.enable_grad():
                post_fn()
            g_post = _grads64(params)
            for p in params:
                p.grad = None
        with torch.enable_grad():
            forget_fn()
        g_f = _grads64(params)
        paired = [p for p in params if id(p) in self.ema]
        # Parameters with a memory but no forget gradient: forget gradient zero.
        for p in paired:
            if id(p) not in g_f:
                g_f[id(p)] = torch.zeros(p.shape, dtype=torch.float64)
        info: dict[str, Any] = {"dots": [], "coefs": [], "sq": []}
        all_f = [g_f[id(p)] for p in params if id(p) in g_f]
        info["forget_grad_norm"] = float(_flat(all_f).norm()) if all_f else 0.0
        info["retain_grad_norm"] = float(_flat(list(g_r.values())).norm()) if g_r else 0.0
        if self.space == "gradient":
            new = dict(g_f)
            # Segments over every parameter with a gradient or a memory (a missing memory
            # is zero: it changes no dot product, but counts in ||g|| for cos clip).
            members = [p for p in params if id(p) in g_f]
            for seg in self._segments(members):
                gs = [g_f[id(p)] for p in seg]
                ms = [self.ema.get(id(p), torch.zeros_like(g_f[id(p)])) for p in seg]
                if not any(id(p) in self.ema for p in seg):
                    continue
                x, d, c = self._rectify(_flat(gs), seg, g_f)
                info["dots"].append(d)
                info["coefs"].append(c)
                info["sq"].append(float(_flat(ms).square().sum()))
                for p, v in zip(seg, _unflat(x, gs)):
                    new[id(p)] = v
            final: dict[int, Tensor] = {}
            for p in params:
                k = id(p)
                v = new.get(k)
                if self.retain_weight and k in g_r:
                    v = (v if v is not None else 0.0) + self.retain_weight * g_r[k]
                if k in g_post:
                    v = (v if v is not None else 0.0) + g_post[k]
                if v is not None:
                    final[k] = v
            self._clip(final)
            for p in params:
                p.grad = final[id(p)].to(p.dtype) if id(p) in final else None
            self.inner.step()
        else:
            final = {}
            for p in params:
                k = id(p)
                if k in g_f:
                    v = g_f[k]
                    if self.retain_weight and k in g_r:
                        v = v + self.retain_weight * g_r[k]
                    final[k] = v
            self._clip(final)
            for p in params:
                p.grad = final[id(p)].to(p.dtype) if id(p) in final else None
            old = {id(p): p.detach().to(torch.float64).clone() for p in params}
            self.inner.step()
            with torch.no_grad():
                for seg in self._segments(paired):
                    deltas = [p.detach().to(torch.float64) - old[id(p)] for p in seg]
                    ms = [self.ema[id(p)] for p in seg]
                    # The update must satisfy <delta, m> <= 0: rectify -delta.
                    like = {id(p): dl for p, dl in zip(seg, deltas)}
                    x, d, c = self._rectify(-_flat(deltas), seg, like)
                    info["dots"].append(-d)
                    info["coefs"].append(c)
                    info["sq"].append(float(_flat(ms).square().sum()))
                    for p, v in zip(seg, _unflat(-x, deltas)):
                        p.copy_((old[id(p)] + v).to(p.dtype))
        info["dot"] = sum(info["dots"])
        info["conflict"] = any(c != 0.0 for c in info["coefs"])
        self.history.append(info)
        return info
