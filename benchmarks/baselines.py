"""Baselines the benchmarks compare GRUOptimizer against. Written for this benchmark.

Both work on a model's named parameters and follow the same protocol as the harness in
``bench_step.py``: ``post_retain()`` runs after the retain backward (``.grad`` holds the
retain gradient), ``post_forget()`` after the forget backward (``.grad`` holds the forget
gradient) and leaves the rectified gradient in ``.grad``.

- :class:`ReferenceStyleGRU` follows the approach of the GRU authors' trainer: it keeps
  per-step dictionary copies of both gradients, flattens them with ``torch.cat``,
  computes the dot products with one ``.item()`` (a host read) per tensor, projects in
  float64 NumPy on the host, and restores the result into ``.grad`` by name.
- :class:`PCGradStyle` is the usual "flatten and project" implementation (as in PCGrad
  ports): concatenate the gradients into one vector, project it with torch on the
  device against a flattened memory, split it back.

They are baselines for timing and memory, not library code; tests check that they
compute the same rectified gradient as the library, so the comparison is like for like.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


class ReferenceStyleGRU:
    """GRU the way the authors' trainer does it (see the module docstring)."""

    name = "reference-style"

    def __init__(self, named_params: Sequence[tuple[str, Tensor]], gamma: float = 0.8) -> None:
        self.named = list(named_params)
        self.gamma = gamma
        self.ema: Tensor | None = None  # flattened memory on the device
        self.retain: dict[str, Tensor] = {}
        self.last_dot = float("nan")

    def pre_retain(self) -> None:
        pass

    def post_retain(self) -> None:
        # Per-step dictionary copy of the retain gradient, then clear for the forget pass.
        self.retain = {n: p.grad.detach().clone() for n, p in self.named if p.grad is not None}
        for _, p in self.named:
            if p.grad is not None:
                p.grad.zero_()

    def post_forget(self) -> None:
        forget = {n: p.grad.detach().clone() for n, p in self.named if p.grad is not None}
        names = [n for n, _ in self.named if n in forget and n in self.retain]
        g_r = torch.cat([self.retain[n].flatten() for n in names])
        g_u = torch.cat([forget[n].flatten() for n in names])
        # Retain memory: EMA of the flattened retain gradient, kept on the device.
        if self.ema is None:
            self.ema = self.gamma * g_r
        else:
            self.ema = self.gamma * g_r + (1.0 - self.gamma) * self.ema
        m_dev = self.ema
        # One host read per tensor for the dot product and the squared norm.
        dot = 0.0
        sq = 0.0
        offset = 0
        for n in names:
            k = forget[n].numel()
            a = g_u[offset : offset + k]
            b = m_dev[offset : offset + k]
            dot += (a * b).sum().item()
            sq += (b * b).sum().item()
            offset += k
        self.last_dot = dot
        if dot < 0 and sq > 0:
            # Project in float64 NumPy on the host, copy back, restore by name.
            g_host = g_u.cpu().numpy().astype(np.float64)
            m_host = m_dev.cpu().numpy().astype(np.float64)
            g_host = g_host - (dot / sq) * m_host
            g_new = torch.from_numpy(g_host).to(device=g_u.device, dtype=g_u.dtype)
            offset = 0
            params = dict(self.named)
            for n in names:
                p = params[n]
                k = p.grad.numel()
                p.grad.copy_(g_new[offset : offset + k].view_as(p.grad))
                offset += k
        self.retain = {}


class PCGradStyle:
    """Flatten-and-project GRU: one concatenated vector, projected with torch."""

    name = "pcgrad-style"

    def __init__(self, params: Sequence[Tensor], gamma: float = 0.8) -> None:
        self.params = list(params)
        self.gamma = gamma
        self.ema: Tensor | None = None  # flattened memory, float32 on the device

    def pre_retain(self) -> None:
        pass

    def post_retain(self) -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])
        if self.ema is None:
            self.ema = flat.to(torch.float32).mul_(self.gamma)
        else:
            self.ema.lerp_(flat.to(self.ema.dtype), self.gamma)
        for p in self.params:
            p.grad.zero_()

    def post_forget(self) -> None:
        assert self.ema is not None
        flat = torch.cat([p.grad.reshape(-1) for p in self.params]).to(torch.float32)
        dot = torch.dot(flat, self.ema)
        sq = torch.dot(self.ema, self.ema)
        if dot.item() < 0 and sq.item() > 0:
            flat.sub_(self.ema, alpha=(dot / sq).item())
        offset = 0
        for p in self.params:
            k = p.grad.numel()
            p.grad.copy_(flat[offset : offset + k].view_as(p.grad))
            offset += k
