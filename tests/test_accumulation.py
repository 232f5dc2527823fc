"""Gradient accumulation: the memory update and the rectification happen once per
optimizer step, on the gradient accumulated over all micro-batches.

4 micro-batches of 4 (each loss divided by 4) must give the weights and memory of one
batch of 16, through closures that loop over micro-batches and through the closure-free
path (all retain micro-batches in one ``retain_pass``, then the forget micro-batches).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gru_optim import GRUOptimizer

BATCH, MICRO = 16, 4


class Net(nn.Module):
    """``retain_head`` gets only a retain gradient: it takes its share of the correction."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)
        self.retain_head = nn.Linear(16, 2)
        self.to(dtype)

    def forget_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return -F.cross_entropy(self.head(self.body(x)), y)

    def retain_loss(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.body(x)
        return F.cross_entropy(self.head(h), y) + 0.5 * F.cross_entropy(self.retain_head(h), y % 2)


def batches(n: int, dtype: torch.dtype) -> list[tuple[Tensor, ...]]:
    g = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(BATCH, 8, generator=g).to(dtype),
            torch.randint(0, 4, (BATCH,), generator=g),
            (torch.randn(BATCH, 8, generator=g) + 0.5).to(dtype),
            torch.randint(0, 4, (BATCH,), generator=g),
        )
        for _ in range(n)
    ]


def train(
    micro: int,
    path: str,
    dtype: torch.dtype = torch.float64,
    steps: int = 3,
    post: bool = False,
    **gru: Any,
):
    model = Net(dtype)
    opt = GRUOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), **gru)
    stats = []
    for xf, yf, xr, yr in batches(steps, dtype):

        def forget(xf: Tensor = xf, yf: Tensor = yf) -> Tensor:
            total = torch.zeros((), dtype=dtype)
            for x, y in zip(xf.chunk(micro), yf.chunk(micro)):
                loss = model.forget_loss(x, y) / micro
                loss.backward()
                total += loss.detach()
            return total

        def retain(xr: Tensor = xr, yr: Tensor = yr) -> Tensor:
            total = torch.zeros((), dtype=dtype)
            for x, y in zip(xr.chunk(micro), yr.chunk(micro)):
                loss = model.retain_loss(x, y) / micro
                loss.backward()
                total += loss.detach()
            return total

        def post_gradient(xf: Tensor = xf, yf: Tensor = yf) -> Tensor:
            # A gradient added after rectification (the authors' +KL): here the retain
            # head on the forget inputs, over the micro-batches too.
            total = torch.zeros((), dtype=dtype)
            for x, y in zip(xf.chunk(micro), yf.chunk(micro)):
                loss = 0.3 * F.cross_entropy(model.retain_head(model.body(x)), y % 2) / micro
                loss.backward()
                total += loss.detach()
            return total

        opt.zero_grad()
        if path == "closures":
            opt.step(forget, retain, post_gradient if post else None)
        else:
            with opt.retain_pass():
                retain()
            if post:
                with opt.post_pass():
                    post_gradient()
            forget()
            opt.step()
        stats.append({k: v.clone() for k, v in opt.last_stats.items()})
    params = [p.detach().clone() for p in model.parameters()]
    mems = [opt.retain_memory(p).clone() for p in model.parameters()]  # type: ignore[union-attr]
    return params, mems, stats


def assert_close(a: list[Tensor], b: list[Tensor], dtype: torch.dtype) -> None:
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


CONFIGS = [
    {"gamma": 0.5},
    {"gamma": 0.8, "granularity": "tensor"},
    {"gamma": 0.8, "retain_weight": 0.5},
    {"gamma": 0.8, "space": "update"},
    {"gamma": 0.8, "cos_clip": -0.3},
    {"gamma": 0.8, "post": True, "max_grad_norm": 0.05},
    {"gamma": 0.8, "directions": 4, "retain_weight": 0.5},
]


@pytest.mark.parametrize("path", ["closures", "closure_free"])
@pytest.mark.parametrize(
    "gru",
    CONFIGS,
    ids=["global", "tensor", "retain_weight", "update", "cos_clip", "post_and_clip", "gru_k"],
)
def test_four_micro_batches_of_four_equal_one_batch_of_sixteen(
    path: str, gru: dict[str, Any]
) -> None:
    params, mems, stats = train(MICRO, path, **gru)
    ref_params, ref_mems, ref_stats = train(1, path, **gru)
    assert_close(params, ref_params, torch.float64)
    assert_close(mems, ref_mems, torch.float64)
    for s, r in zip(stats, ref_stats):
        for key in (
            "dot",
            "coef",
            "forget_grad_norm",
            "retain_grad_norm",
            "forget_loss",
            "retain_loss",
        ):
            torch.testing.assert_close(s[key], r[key], rtol=1e-10, atol=1e-12, equal_nan=True)
    assert any(bool(s["conflict"]) for s in ref_stats)  # the projection did happen


def test_float32_accumulation_matches_within_rounding() -> None:
    params, mems, _ = train(MICRO, "closure_free", torch.float32)
    ref_params, ref_mems, _ = train(1, "closure_free", torch.float32)
    assert_close(params, ref_params, torch.float32)
    assert_close(mems, ref_mems, torch.float32)


def test_memory_is_updated_once_per_step_not_per_micro_batch() -> None:
    # One step from m_0 = 0: m_1 = gamma * g_r(batch of 16). Folding each micro-batch's
    # gradient separately would give gamma * sum_k (1 - gamma)^(3 - k) * g_k instead.
    gamma = 0.5
    model = Net(torch.float64)
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), gamma=gamma)
    xf, yf, xr, yr = batches(1, torch.float64)[0]
    micro_grads = []
    opt.zero_grad()
    with opt.retain_pass():
        for x, y in zip(xr.chunk(MICRO), yr.chunk(MICRO)):
            before = [
                torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for p in model.parameters()
            ]
            (model.retain_loss(x, y) / MICRO).backward()
            micro_grads.append([p.grad - b for p, b in zip(model.parameters(), before)])  # type: ignore[operator]
    model.forget_loss(xf, yf).backward()
    opt.step()

    full = Net(torch.float64)
    full.retain_loss(xr, yr).backward()
    for i, (p, q) in enumerate(zip(model.parameters(), full.parameters())):
        m = opt.retain_memory(p)
        torch.testing.assert_close(m, gamma * q.grad, rtol=1e-10, atol=1e-12)  # type: ignore[operator]
        per_micro = torch.zeros_like(m)  # type: ignore[arg-type]
        for g in micro_grads:
            per_micro = gamma * MICRO * g[i] + (1 - gamma) * per_micro
        assert not torch.allclose(m, per_micro)  # type: ignore[arg-type]


def test_second_retain_pass_before_step_is_refused() -> None:
    # Micro-batches of the retain loss belong in one retain_pass.
    model = Net(torch.float64)
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    xf, yf, xr, yr = batches(1, torch.float64)[0]
    with opt.retain_pass():
        model.retain_loss(xr[:4], yr[:4]).backward()
    with pytest.raises(RuntimeError, match="one retain_pass"):
        with opt.retain_pass():
            model.retain_loss(xr[4:], yr[4:]).backward()
