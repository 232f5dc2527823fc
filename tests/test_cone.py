"""GRU-k: the projection onto the cone of several retain directions (issue: "Beyond the
paper"). The solver against SciPy's NNLS on the dual, its KKT properties, and the
optimizer against an independent float64 re-derivation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _reference import ReferenceGRU, cone_project
from conftest import assert_params_close, closures, equal_nested, make_inner, make_net
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gru_optim import GRUOptimizer
from gru_optim.functional import cone_coefficients, conflict_coefficients
from gru_optim.rules import Cone

F64 = torch.float64
METHODS = ["enumerate", "active_set"]


@st.composite
def cones(draw, max_k: int = 8):
    k = draw(st.integers(1, max_k))
    n = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(n, k, generator=gen, dtype=F64) * 10.0 ** draw(st.floats(-3, 3))
    kind = draw(st.sampled_from(["random", "duplicate", "zero", "span", "opposed"]))
    if kind == "duplicate" and k > 1:
        d[:, 1] = d[:, 0] * 3.0
    elif kind == "zero":
        d[:, draw(st.integers(0, k - 1))] = 0.0
    elif kind == "span" and k > 2:
        d[:, 0] = 0.7 * d[:, 1] + 0.2 * d[:, 2]  # the memory in the span of the others
    g = torch.randn(n, generator=gen, dtype=F64) * 10.0 ** draw(st.floats(-3, 3))
    if kind == "opposed":
        g = -d.sum(1) + 0.1 * g
    return d, g


def solve(d, g, method):
    gram = (d.T @ d)[None]
    dots = (d.T @ g)[None]
    sol = cone_coefficients(gram, dots, (g @ g)[None], method=method, precision=F64)
    return g + d @ sol.coef[0], sol


@pytest.mark.parametrize("method", METHODS)
@given(cones())
def test_kkt_feasible_optimal_complementary(method, problem) -> None:
    d, g = problem
    x, sol = solve(d, g, method)
    lam = sol.coef[0]
    norms = d.norm(dim=0)
    scale = float(g.norm()) + 1e-300
    tol = 1e-8 * scale
    slack = (d.T @ x) / torch.where(norms > 0, norms, 1.0)
    assert (lam >= 0).all()
    assert (slack[norms > 0] >= -tol).all()  # feasible
    assert (lam[norms == 0] == 0).all()  # a zero direction is no constraint
    # complementary: a binding multiplier has (rounding-level) zero slack
    assert ((lam * norms).abs() * slack.abs() <= tol * (scale + 1)).all()
    # optimal: equals the float64 reference solver's point
    ref = cone_project(g, list(d.T))
    assert float((x - ref).norm()) <= 1e-7 * scale
    assert int(sol.active[0]) == int((lam > 0).sum())


@given(cones())
def test_both_solvers_agree(problem) -> None:
    d, g = problem
    a, _ = solve(d, g, "enumerate")
    b, _ = solve(d, g, "active_set")
    assert float((a - b).norm()) <= 1e-9 * (float(g.norm()) + 1e-300)


@pytest.mark.parametrize("method", METHODS)
@given(cones())
def test_idempotent_and_invariant_to_scaling_each_direction(method, problem) -> None:
    d, g = problem
    x, _ = solve(d, g, method)
    again, sol = solve(d, x, method)
    scale = float(g.norm()) + 1e-300
    assert float((again - x).norm()) <= 1e-8 * scale
    factors = torch.tensor([10.0 ** ((-1) ** i * (i % 3)) for i in range(d.shape[1])], dtype=F64)
    scaled, _ = solve(d * factors, g, method)
    assert float((scaled - x).norm()) <= 1e-7 * scale


@given(cones(max_k=1))
def test_one_direction_is_the_paper_rule(problem) -> None:
    d, g = problem
    x, _ = solve(d, g, None)
    m = d[:, 0]
    c = conflict_coefficients((g @ m)[None], (m @ m)[None])
    torch.testing.assert_close(x, g - c[0] * m, rtol=1e-10, atol=1e-12 * float(g.norm()))


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_sixteen_directions(seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(40, 16, generator=gen, dtype=F64)
    g = -d.sum(1) + torch.randn(40, generator=gen, dtype=F64)
    for method in METHODS:
        x, sol = solve(d, g, method)
        torch.testing.assert_close(x, cone_project(g, list(d.T)), rtol=1e-7, atol=1e-8)
        assert int(sol.active[0]) > 1


def _violation(d, g, x):
    norms = d.norm(dim=0)
    slack = (d.T @ x) / torch.where(norms > 0, norms, 1.0)
    return float((-slack[norms > 0]).clamp(min=0).max()) / float(g.norm())


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(3, 8), st.integers(1, 2), st.floats(-10, -5))
def test_nearly_dependent_directions_stay_feasible(method, seed, k, rank, log_noise) -> None:
    # Directions close to a 1-2 dimensional subspace (oscillating retain gradients): the
    # Gram matrix is nearly singular and the exact multipliers large. The point returned
    # satisfies the constraints to rounding and is never longer than g (it used to
    # violate them by 1e5 |g| when no candidate met an absolute tolerance).
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(8, rank, generator=gen, dtype=F64)
    d = u @ torch.randn(rank, k, generator=gen, dtype=F64)
    d = d + 10.0**log_noise * torch.randn(8, k, generator=gen, dtype=F64)
    g = -2.0 * u @ torch.randn(rank, generator=gen, dtype=F64) + 0.3 * torch.randn(
        8, generator=gen, dtype=F64
    )
    x, sol = solve(d, g, method)
    # Directions closer than sqrt(64 eps) ~ 1.2e-7 (relative) are one direction to the
    # precision of float64 sums: the documented bound on the violation is that size.
    gn = float(g.norm())
    assert _violation(d, g, x) <= 1e-6
    assert float(x.norm()) <= gn * (1 + 1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("eps", [1e-4, 1e-6, 1e-8])
def test_positively_dependent_directions(method, eps) -> None:
    # d3 = -(d1 + d2) + eps e: a thin cone. A true projection is feasible (the library
    # returned g untouched, violating a constraint by 0.3 |g|).
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(10, 3, generator=gen, dtype=F64)
    d[:, 2] = -(d[:, 0] + d[:, 1]) + eps * torch.randn(10, generator=gen, dtype=F64)
    # Optimal to the conditioning of the Gram matrix G = D^T D: the solve sees only inner
    # products, so x is as exact as cond(G) u allows (u the unit roundoff; cond(G) is about
    # 2e13 at eps = 1e-6, so the bound is 5e-3 there, and past float64's precision at 1e-8,
    # where only feasibility holds). The bound was 1e-3 alone, which one CPU's float64
    # dot products met at eps = 1e-6 and another's (AVX-512) missed by 10%.
    rel = 1e-3 + float(torch.linalg.cond(d.T @ d)) * torch.finfo(F64).eps
    for trial in range(20):
        g = torch.randn(10, generator=gen, dtype=F64)
        x, _ = solve(d, g, method)
        assert _violation(d, g, x) <= 1e-6, trial
        assert float(x.norm()) <= float(g.norm()) * (1 + 1e-9)
        ref = cone_project(g, list(d.T))
        assert float((x - g).norm()) <= float((ref - g).norm()) * (1 + rel) + 1e-9


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="1 to 16"):
        cone_coefficients(torch.eye(17)[None], torch.zeros(1, 17), torch.ones(1))
    with pytest.raises(ValueError, match="directions must be"):
        GRUOptimizer(make_inner("adam", make_net()), directions=0)
    with pytest.raises(ValueError, match="cone rule"):
        GRUOptimizer(make_inner("adam", make_net()), directions=3, cos_clip=-0.5)


# ----------------------------------------------------------------- the optimizer
def _pair(name="adam", **kw):
    model = make_net()
    ref_model = copy.deepcopy(model)
    return (
        model,
        GRUOptimizer(make_inner(name, model), **kw),
        ref_model,
        ReferenceGRU(make_inner(name, ref_model), **{k: v for k, v in kw.items()}),
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"directions": 2},
        {"directions": 4},
        {"directions": 4, "granularity": "tensor"},
        {"directions": 4, "granularity": "group"},
        {"directions": 3, "space": "update"},
        {"directions": 4, "retain_weight": 0.5},
        {"directions": 4, "gamma": 0.5},
        {"directions": 4, "max_grad_norm": 0.05},
    ],
    ids=[
        "k2",
        "k4",
        "k4_tensor",
        "k4_group",
        "k3_update",
        "k4_retain_weight",
        "k4_gamma",
        "k4_clip",
    ],
)
def test_gru_k_matches_float64_reference(kw) -> None:
    model, opt, ref_model, ref = _pair("adamw_foreach", **kw)
    binding = 0
    for t in range(6):
        f, r = closures(model, t)
        opt.zero_grad()
        opt.step(f, r)
        ref.step(*closures(ref_model, t))
        binding = max(binding, int(opt.last_stats["active_directions"]))
        assert float(opt.last_stats["min_slack"]) >= -1e-7 * float(
            opt.last_stats["forget_grad_norm"]
        )
    assert binding >= 2  # several constraints bound at once: not the paper's rule
    assert_params_close(model, ref_model, rtol=1e-7, atol=1e-9)


def test_the_history_is_the_raw_retain_gradient_and_checkpoints_bitwise() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model), directions=3, retain_weight=0.5)
    for t in range(4):
        opt.step(*closures(model, t))
    # The newest history entry is exactly the last retain gradient (before retain_weight).
    twin = copy.deepcopy(model)
    _, r = closures(twin, 4)
    opt.step(*closures(model, 4))
    r()
    for p, q in zip(model.parameters(), twin.parameters()):
        hist = opt.retain_history(p)
        if opt.retain_memory(p) is not None:
            assert len(hist) == 2
            want = q.grad if q.grad is not None else torch.zeros_like(q)
            assert torch.equal(hist[-1], want.to(hist[-1].dtype))
    # Resume: bitwise the uninterrupted run (the ring's order is canonical in the file).
    sd = copy.deepcopy(opt.state_dict())
    assert all(len(e["gru_history"]) == 2 for e in sd["state"].values())
    cont_model = copy.deepcopy(model)
    cont = GRUOptimizer(make_inner("adam", cont_model), directions=3, retain_weight=0.5)
    cont.load_state_dict(copy.deepcopy(sd))
    for t in range(5, 9):
        opt.step(*closures(model, t))
        cont.step(*closures(cont_model, t))
    for p, q in zip(model.parameters(), cont_model.parameters()):
        assert torch.equal(p, q)
    assert equal_nested(opt.state_dict(), cont.state_dict())


def test_history_entries_are_validated_on_load() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model), directions=3)
    opt.step(*closures(model, 0))
    sd = copy.deepcopy(opt.state_dict())
    plain = GRUOptimizer(make_inner("adam", make_net()))
    with pytest.raises(ValueError, match="directions"):
        plain.load_state_dict(copy.deepcopy(sd))
    more = GRUOptimizer(make_inner("adam", make_net()), directions=5)
    with pytest.raises(ValueError, match="directions=5"):
        more.load_state_dict(copy.deepcopy(sd))
    sd["state"][0]["gru_history"][0][0, 0] = math.nan
    with pytest.raises(ValueError, match="not finite"):
        GRUOptimizer(make_inner("adam", make_net()), directions=3).load_state_dict(sd)


def test_memory_holds_k_minus_one_extra_buffers_in_ema_dtype() -> None:
    model = make_net(torch.float32)
    opt = GRUOptimizer(make_inner("adam", model), directions=4, ema_dtype=torch.bfloat16)
    opt.step(*closures(model, 0))
    for p in model.parameters():
        if opt.retain_memory(p) is not None:
            hist = opt.retain_history(p)
            assert len(hist) == 3 and all(h.dtype == torch.bfloat16 for h in hist)
            assert all(h.shape == p.shape for h in hist)


def test_cone_with_one_direction_is_the_projection() -> None:
    a, b = make_net(), make_net()
    oa = GRUOptimizer(make_inner("adam", a))
    ob = GRUOptimizer(make_inner("adam", b), rule=Cone(1))
    for t in range(4):
        oa.step(*closures(a, t))
        ob.step(*closures(b, t))
    assert_params_close(a, b, rtol=1e-10, atol=1e-12)


def test_gram_in_float64_for_float64_parameters_and_float32_otherwise() -> None:
    p64 = nn.Parameter(torch.zeros(5, dtype=F64))
    opt = GRUOptimizer(torch.optim.SGD([p64], lr=0.0), directions=2, gamma=1.0)
    for _ in range(2):
        with opt.retain_pass():
            p64.grad = torch.randn(5, dtype=F64)
        p64.grad = torch.randn(5, dtype=F64)
        opt.step()
    assert opt.last_stats["dot"].dtype == F64
    assert np.isfinite(float(opt.last_stats["min_slack"]))


def test_gamma_one_keeps_the_history_of_a_parameter_without_a_retain_gradient() -> None:
    # gamma = 1 makes the memory of a parameter without a retain gradient exactly zero;
    # its older raw retain gradients still constrain (they were dropped with it).
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(2))
    opt = GRUOptimizer(torch.optim.SGD([a, b], lr=0.0), gamma=1.0, directions=3)
    with opt.retain_pass():
        a.grad, b.grad = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    a.grad, b.grad = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])
    opt.step()
    with opt.retain_pass():
        b.grad = torch.tensor([1.0, 0.0])  # a: no retain gradient this step
    a.grad, b.grad = torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 0.0])
    opt.step()
    assert [h.tolist() for h in opt.retain_history(a)] == [[1.0, 0.0], [0.0, 0.0]]
    g = torch.cat([a.grad, b.grad]).double()
    r1 = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64)
    r2 = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=F64)
    want = cone_project(torch.tensor([-1.0, 0.0, 0.0, 0.0], dtype=F64), [r2, r1, r2])
    torch.testing.assert_close(g, want)
    assert float(g @ r1) >= -1e-7


def test_a_zero_memory_beside_a_live_history_survives_a_checkpoint() -> None:
    # gamma = 0.5 with r1 = 2 e1, r2 = -e1 leaves m = 0 exactly and a non-zero history:
    # loading must keep it (an all-zero memory used to be read as no memory at all).
    def run(resume: bool):
        w = nn.Parameter(torch.zeros(3))
        u = nn.Parameter(torch.zeros(2))

        def make():
            return GRUOptimizer(torch.optim.SGD([w, u], lr=0.1), gamma=0.5, directions=3)

        opt = make()
        for rw, ru in [([2.0, 0, 0], [1.0, 0]), ([-1.0, 0, 0], [0.0, 1])]:
            with opt.retain_pass():
                w.grad, u.grad = torch.tensor(rw), torch.tensor(ru)
            w.grad, u.grad = torch.tensor([0.3, 1.0, 0.0]), torch.tensor([0.5, 0.5])
            opt.step()
        assert torch.equal(opt.retain_memory(w), torch.zeros(3))
        if resume:
            sd = copy.deepcopy(opt.state_dict())
            opt = make()
            opt.load_state_dict(sd)
        hist = [h.tolist() for h in opt.retain_history(w)]
        with opt.retain_pass():
            u.grad = torch.tensor([0.0, 1.0])
        w.grad, u.grad = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0])
        opt.step()
        return w.detach().clone(), u.detach().clone(), hist

    a, b = run(False), run(True)
    assert a[2] == b[2] == [[2.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
