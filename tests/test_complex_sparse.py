"""Complex parameters and sparse gradients (issue 21, items 5-7).

- Complex parameters are rectified with the real inner product ``Re<g, m>``: exactly what
  GRU does on ``torch.view_as_real`` of them. Every path (foreach, compiled C++, Triton
  under the interpreter, GRU-k, update space, each granularity) is checked bitwise
  against the same GRUOptimizer run on real twins of the parameters, and the projection
  against an independent float64 reference on the real views.
- Sparse gradients (``nn.Embedding(sparse=True)``) are densified: a GRU step equals a
  float64 reference on the dense embedding; ``SparseAdam`` (sparse gradients only) is
  refused when the wrapper is built, before anything changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from gru_optim import GRUOptimizer

# ---------------------------------------------------------------- float64 reference


def _flat(ts: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def reference_sgd_gru(
    params: list[Tensor],
    retain: list[list[Tensor]],
    forget: list[list[Tensor]],
    *,
    gamma: float,
    lr: float,
) -> list[Tensor]:
    """GRU (global projection) with plain SGD, in float64, on real tensors: the memory is
    ``gamma g_r + (1 - gamma) m``, the forget gradient is projected when ``<g, m> < 0``."""
    w = _flat([p.to(torch.float64) for p in params]).clone()
    m = torch.zeros_like(w)
    for gr, gf in zip(retain, forget):
        m = gamma * _flat([g.to(torch.float64) for g in gr]) + (1 - gamma) * m
        g = _flat([x.to(torch.float64) for x in gf])
        d = float(g @ m)
        if d < 0:
            g = g - d / float(m @ m) * m
        w = w - lr * g
    out, i = [], 0
    for p in params:
        out.append(w[i : i + p.numel()].reshape(p.shape))
        i += p.numel()
    return out


# ---------------------------------------------------------------- complex parameters


class ComplexNet(nn.Module):
    """A complex weight (or its real twin, shape (..., 2)) and a real bias."""

    def __init__(self, w: Tensor, b: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(b)

    def weight(self) -> Tensor:
        return self.w if self.w.is_complex() else torch.view_as_complex(self.w)

    def loss(self, x: Tensor, forget: bool) -> Tensor:
        y = x @ self.weight()
        if forget:
            return -(3 * y.real.sum() + y.imag.sum()) - self.b.sum()
        return (y.abs() ** 2).sum() + ((self.b - 1) ** 2).sum()


def _pair(dtype: torch.dtype) -> tuple[ComplexNet, ComplexNet]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, dtype=dtype, generator=g)
    b = torch.randn(3, dtype=dtype.to_real(), generator=g)
    return ComplexNet(w.clone(), b.clone()), ComplexNet(torch.view_as_real(w).clone(), b.clone())


def _batches(dtype: torch.dtype, n: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 4, dtype=dtype, generator=g), torch.randn(5, 4, dtype=dtype, generator=g))
        for _ in range(n)
    ]


def _run(net: ComplexNet, opt: GRUOptimizer, batches: list[tuple[Tensor, Tensor]]) -> None:
    for xr, xf in batches:

        def retain(xr: Tensor = xr) -> Tensor:
            loss = net.loss(xr, forget=False)
            loss.backward()
            return loss

        def forget(xf: Tensor = xf) -> Tensor:
            loss = net.loss(xf, forget=True)
            loss.backward()
            return loss

        opt.step(forget, retain)


PATHS = [
    pytest.param({"fused": False}, id="foreach"),
    pytest.param({"fused": None}, id="cpu-kernels"),
    pytest.param({"fused": True}, id="triton"),
    pytest.param({"directions": 3}, id="gru-k"),
    pytest.param({"space": "update"}, id="update-space"),
    pytest.param({"granularity": "tensor", "fused": False}, id="tensor"),
    pytest.param({"granularity": "tensor", "fused": None}, id="tensor-cpu-kernels"),
    pytest.param({"cos_clip": -0.5, "granularity": "group"}, id="cos-clip-group"),
]


@pytest.mark.parametrize("kw", PATHS)
def test_complex_parameters_are_rectified_as_their_real_views(kw, monkeypatch) -> None:
    if kw.get("fused", False) is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cnet, rnet = _pair(torch.complex64)
    copt = GRUOptimizer(torch.optim.Adam(cnet.parameters(), lr=0.05), gamma=0.7, **kw)
    ropt = GRUOptimizer(torch.optim.Adam(rnet.parameters(), lr=0.05), gamma=0.7, **kw)
    assert copt.kernels == ropt.kernels
    batches = _batches(torch.complex64, 4)
    _run(cnet, copt, batches)
    _run(rnet, ropt, batches)
    assert bool(copt.last_stats["rectified"])
    assert torch.equal(torch.view_as_real(cnet.w.detach()), rnet.w.detach())
    assert torch.equal(cnet.b.detach(), rnet.b.detach())
    mem = copt.retain_memory(cnet.w)
    assert mem is not None and mem.dtype == torch.complex64 and mem.shape == cnet.w.shape
    assert torch.equal(torch.view_as_real(mem), ropt.retain_memory(rnet.w))
    for a, b in zip(copt.retain_history(cnet.w), ropt.retain_history(rnet.w)):
        assert a.is_complex() and torch.equal(torch.view_as_real(a), b)
    assert copt.last_stats.keys() == ropt.last_stats.keys()
    for key, value in copt.last_stats.items():
        assert torch.equal(value, ropt.last_stats[key]), key


def test_complex_projection_matches_a_float64_reference_on_the_real_views() -> None:
    cnet, _ = _pair(torch.complex128)
    w0 = torch.view_as_real(cnet.w.detach()).clone()
    b0 = cnet.b.detach().clone()
    opt = GRUOptimizer(torch.optim.SGD(cnet.parameters(), lr=0.1), gamma=0.6)
    retain, forget, conflicts = [], [], 0
    for xr, xf in _batches(torch.complex128, 4):
        net = copy.deepcopy(cnet)
        net.loss(xr, forget=False).backward()
        retain.append([torch.view_as_real(net.w.grad), net.b.grad])
        net.zero_grad()
        net.loss(xf, forget=True).backward()
        forget.append([torch.view_as_real(net.w.grad), net.b.grad])
        _run(cnet, opt, [(xr, xf)])
        conflicts += bool(opt.last_stats["rectified"])
        # The reference replays every step so far from the start (its memory included).
        w, b = reference_sgd_gru([w0, b0], retain, forget, gamma=0.6, lr=0.1)
        torch.testing.assert_close(torch.view_as_real(cnet.w.detach()), w, rtol=0, atol=1e-12)
        torch.testing.assert_close(cnet.b.detach(), b, rtol=0, atol=1e-12)
    assert conflicts > 0  # the projection was exercised
    assert opt.retain_memory(cnet.w).dtype == torch.complex128


def test_complex_memory_round_trips_through_a_checkpoint() -> None:
    cnet, _ = _pair(torch.complex64)
    opt = GRUOptimizer(torch.optim.AdamW(cnet.parameters(), lr=0.05), directions=2)
    _run(cnet, opt, _batches(torch.complex64, 2))
    sd = opt.state_dict()
    twin = copy.deepcopy(cnet)
    opt2 = GRUOptimizer(torch.optim.AdamW(twin.parameters(), lr=0.05), directions=2)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert torch.equal(opt2.retain_memory(twin.w), opt.retain_memory(cnet.w))
    more = _batches(torch.complex64, 5)[2:]
    _run(cnet, opt, more)
    _run(twin, opt2, more)
    assert torch.equal(cnet.w, twin.w) and torch.equal(cnet.b, twin.b)


# ---------------------------------------------------------------- sparse gradients


class Bag(nn.Module):
    def __init__(self, sparse: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.emb = nn.Embedding(10, 4, sparse=sparse, dtype=dtype)
        self.head = nn.Linear(4, 1, dtype=dtype)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(10, 4, generator=g))
            self.head.weight.copy_(torch.randn(1, 4, generator=g))
            self.head.bias.zero_()

    def loss(self, idx: Tensor, sign: float) -> Tensor:
        return sign * self.head(self.emb(idx)).sum() + (self.head.weight**2).sum()


IDX = [
    (torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])),
    (torch.tensor([2, 4, 5]), torch.tensor([4, 6, 7])),
    (torch.tensor([6, 7, 8]), torch.tensor([8, 2, 9])),
]


def _bag_steps(net: Bag, opt: GRUOptimizer, idx, retain_uses_emb: bool = True) -> None:
    for ir, if_ in idx:

        def retain(ir: Tensor = ir) -> Tensor:
            loss = net.loss(ir, 1.0) if retain_uses_emb else (net.head.weight**2).sum()
            loss.backward()
            return loss

        def forget(if_: Tensor = if_) -> Tensor:
            loss = net.loss(if_, -1.0)
            loss.backward()
            return loss

        opt.step(forget, retain)


@pytest.mark.parametrize("retain_uses_emb", [True, False], ids=["both-sparse", "forget-only"])
@pytest.mark.parametrize("fused", [False, None], ids=["foreach", "cpu-kernels"])
def test_sparse_gradients_match_a_float64_dense_reference(
    retain_uses_emb, fused, monkeypatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    net = Bag(sparse=True)
    dense = Bag(sparse=False, dtype=torch.float64)
    params0 = [p.detach().clone() for p in dense.parameters()]
    opt = GRUOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), gamma=0.5, fused=fused)
    retain: list[list[Tensor]] = []
    forget: list[list[Tensor]] = []
    # the reference needs every gradient at the reference's own weights: replay step by step
    ref = [p.clone() for p in params0]
    for k, (ir, if_) in enumerate(IDX):
        _bag_steps(net, opt, [(ir, if_)], retain_uses_emb)
        with torch.no_grad():
            for p, v in zip(dense.parameters(), ref):
                p.copy_(v)
        dense.zero_grad()
        (dense.loss(ir, 1.0) if retain_uses_emb else (dense.head.weight**2).sum()).backward()
        retain.append(
            [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in dense.parameters()]
        )
        dense.zero_grad()
        dense.loss(if_, -1.0).backward()
        forget.append([p.grad.clone() for p in dense.parameters()])
        ref = reference_sgd_gru(params0, retain[: k + 1], forget[: k + 1], gamma=0.5, lr=0.1)
        for p, r in zip(net.parameters(), ref):
            torch.testing.assert_close(p.detach().double(), r, rtol=1e-6, atol=1e-6)
    assert bool(opt.last_stats["rectified"])
    assert net.emb.weight.grad is not None and not net.emb.weight.grad.is_sparse
    memory = opt.retain_memory(net.emb.weight)
    if retain_uses_emb:
        assert memory is not None and memory.layout == torch.strided
    else:  # only the forget pass reached the embedding: rectified, never folded
        assert memory is None


def test_a_sparse_gradient_in_the_closure_free_path_with_adam() -> None:
    # Adam refuses sparse gradients on its own; a GRU step hands it the dense rectified one.
    net = Bag(sparse=True)
    opt = GRUOptimizer(torch.optim.Adam(net.parameters(), lr=0.1))
    for ir, if_ in IDX:
        with opt.retain_pass():
            net.loss(ir, 1.0).backward()
        net.loss(if_, -1.0).backward()
        opt.step()
    assert bool(opt.last_stats["rectified"])
    assert len(opt.state_dict()["state"]) == 3


def test_sparse_adam_is_refused_before_anything_changes() -> None:
    net = Bag(sparse=True)
    inner = torch.optim.SparseAdam([net.emb.weight], lr=0.1)
    before = copy.deepcopy(inner.param_groups[0])
    with pytest.raises(TypeError, match="SparseAdam steps only sparse gradients"):
        GRUOptimizer(inner)
    after = inner.param_groups[0]
    assert set(after) == set(before)  # no gru_* key written into the inner optimizer


def test_complex_parameters_under_a_grad_scaler_are_refused_before_the_fold() -> None:
    # torch's GradScaler cannot unscale complex gradients; a complex gradient from the
    # forget pass alone would otherwise fail after the retain side folded.
    cnet, _ = _pair(torch.complex64)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    opt = GRUOptimizer(torch.optim.Adam(cnet.parameters(), lr=0.05), grad_scaler=scaler)
    xr, xf = _batches(torch.complex64, 1)[0]

    def retain() -> Tensor:
        loss = ((cnet.b - 1) ** 2).sum()  # the real bias only
        scaler.scale(loss).backward()
        return loss

    def forget() -> Tensor:
        loss = cnet.loss(xf, forget=True)
        scaler.scale(loss).backward()
        return loss

    with pytest.raises(RuntimeError, match="does not unscale complex gradients"):
        opt.step(forget, retain)
    assert opt.retain_memory(cnet.b) is None and len(opt.optimizer.state) == 0
