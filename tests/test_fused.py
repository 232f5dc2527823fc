"""The fused kernels compared with the foreach path on random shapes, dtypes, segment
layouts, and the optimizer end to end, for both implementations of their contract (the
``kernels`` fixture): the Triton kernels a GPU runs, on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``, set by conftest.py), and the CPU's compiled C++
passes (gru_optim/kernels/_native.py; the interpreter flag removed for the test)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import assert_params_close, closures, make_inner, make_net, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gru_optim import GRUOptimizer, SkipReason
from gru_optim.functional import ema_update_, project_, segment_stats, tensor_sq_norms
from gru_optim.kernels import _triton as FU
from gru_optim.kernels import native_reason, triton_reason


def test_the_interpreter_is_available() -> None:
    # make test installs the triton extra and conftest.py sets TRITON_INTERPRET=1: the
    # tests below run the real kernels (they are never skipped).
    assert triton_reason(torch.device("cpu")) is None


def test_the_cpu_kernels_are_built() -> None:
    # make test builds them (g++): the "cpu" cases below run the real C++ passes.
    assert native_reason() is None


@pytest.fixture(params=["triton", "cpu"])
def kernels(request, monkeypatch) -> str:
    """Which implementation the fused passes run: Triton (interpreted) or the C++ passes."""
    if request.param == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


def fused_opt(kernels: str, inner, **kw) -> GRUOptimizer:
    """A GRUOptimizer on the fused path of ``kernels``: ``fused=True`` for Triton (the
    interpreter), the default ``fused=None`` for the CPU's C++ passes."""
    opt = GRUOptimizer(inner, fused=True if kernels == "triton" else None, **kw)
    assert opt.kernels == kernels  # "triton" or "cpu": the fused passes
    return opt


FIXTURE_OK = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float64),
]


def tol(gd: torch.dtype) -> dict:
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-6),
    }.get(gd, dict(rtol=2e-2, atol=2e-2))


@st.composite
def lists(draw):
    gd, md = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 5))
    shapes = [tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3))) for _ in range(n)]
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    g = [torch.randn(s, generator=gen).to(gd) for s in shapes]
    m = [torch.randn(s, generator=gen).to(md) for s in shapes]
    missing = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mem = [None if miss and i > 0 else x for i, (x, miss) in enumerate(zip(m, missing))]
    kind = draw(st.sampled_from(["global", "tensor", "cut"]))
    segments = (
        None
        if kind == "global"
        else [1] * n
        if kind == "tensor"
        else ([1, n - 1] if n > 1 else None)
    )
    return g, m, mem, segments, gd


@FIXTURE_OK
@given(lists())
def test_stats_match_the_foreach_path(kernels, problem) -> None:
    g, _, mem, segments, gd = problem
    a = segment_stats(g, mem, segments, fused=True)
    b = segment_stats(g, mem, segments, fused=False)
    assert a.dot.dtype == torch.float64  # the fused sums are float64
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(x, y.to(x.dtype), rtol=1e-4, atol=1e-4)
    assert bool(a.in_range.all())


@FIXTURE_OK
@given(lists(), st.floats(0.05, 1.0))
def test_fold_and_projection_match_the_foreach_path(kernels, problem, gamma) -> None:
    g, m, _, _, gd = problem
    ma, mb = [x.clone() for x in m], [x.clone() for x in m]
    ema_update_(ma, g, gamma, fused=True)
    ema_update_(mb, g, gamma, fused=False)
    for x, y in zip(ma, mb):
        torch.testing.assert_close(x, y, **tol(x.dtype))
    coefs = torch.linspace(-1.5, 0.0, len(g), dtype=torch.float64)
    ga, gb = [x.clone() for x in g], [x.clone() for x in g]
    project_(ga, m, coefs, fused=True)
    project_(gb, m, coefs, fused=False)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **tol(gd))
    assert tensor_sq_norms(g, fused=True).dtype == torch.float64


@FIXTURE_OK
@given(lists(), st.floats(0.05, 1.0), st.booleans())
def test_a_fold_that_returns_the_norms_returns_the_sum_of_squares_pass(
    kernels, problem, gamma, open_gate
) -> None:
    # The norms come from the fold's own read of the gradients, bit for bit what the
    # separate sum-of-squares pass computes, whether or not the gate lets the fold happen.
    g, m, _, _, gd = problem
    ma, mb = [x.clone() for x in m], [x.clone() for x in m]
    gate = torch.tensor(open_gate)
    got = ema_update_(ma, g, gamma, fused=True, gate=gate, sq_norms=True)
    ema_update_(mb, g, gamma, fused=True, gate=gate)
    assert got is not None and got.dtype == torch.float64
    assert torch.equal(got, tensor_sq_norms(g, fused=True))
    assert all(torch.equal(x, y) for x, y in zip(ma, mb))  # the same fold
    if not open_gate:
        assert all(torch.equal(x, y) for x, y in zip(ma, m))
    ref = ema_update_([x.clone() for x in m], g, gamma, fused=False, sq_norms=True)
    assert ref is not None
    torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["expanded", "strided"])
def test_projection_reads_coefficient_views_correctly(kernels, layout) -> None:
    # A global coefficient reaches the kernel as ``coef.expand(n)`` (stride 0): the kernel
    # must not read past a one-element buffer (it did, and left tensors unprojected).
    g = [torch.randn(30), torch.randn(4, 5), torch.randn(7)]
    m = [torch.randn(30), torch.randn(4, 5), torch.randn(7)]
    if layout == "expanded":
        coefs = torch.tensor(-0.75, dtype=torch.float64).expand(3)
    else:
        coefs = torch.tensor([-0.5, 9.0, -1.25, 9.0, 0.5, 9.0], dtype=torch.float64)[::2]
    ga, gb = [x.clone() for x in g], [x.clone() for x in g]
    project_(ga, m, coefs, fused=True)
    project_(gb, m, coefs.contiguous(), fused=False)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_a_gamma_one_fold_is_a_copy_even_where_g_minus_m_overflows(kernels) -> None:
    big = torch.finfo(torch.float32).max
    m = [torch.tensor([-big, big, 0.5])]
    g = [torch.tensor([big, -big, 1.0])]
    with warnings.catch_warnings():
        # the interpreter evaluates the discarded lerp branch in NumPy, which warns
        warnings.simplefilter("ignore", RuntimeWarning)
        ema_update_(m, g, 1.0, fused=True)
    assert torch.equal(m[0], g[0])  # the lerp formula gave [nan, nan, 1.0]


def test_device_gates_change_nothing(kernels) -> None:
    g = [torch.randn(100), torch.randn(7, 3)]
    m = [torch.randn(100), torch.randn(7, 3)]
    before = [x.clone() for x in m]
    ema_update_(m, g, 0.8, fused=True, gate=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(m, before))
    g_before = [x.clone() for x in g]
    project_(g, m, torch.tensor([0.5, 0.5]), fused=True, skip=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(g, g_before))


def test_one_launch_per_pass_whatever_the_number_of_tensors(monkeypatch) -> None:
    kernels = FU._kernels()
    calls: list[str] = []

    class Count:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            calls.append(self.name)
            return self.kernel[grid]

    for name in ("stats", "sumsq", "fold", "project", "reduce"):
        monkeypatch.setitem(kernels, name, Count(name, kernels[name]))
    for n in (3, 30):
        calls.clear()
        g = [torch.randn(50 + i) for i in range(n)]
        m = [torch.randn(50 + i) for i in range(n)]
        segment_stats(g, m, None, fused=True)
        ema_update_(m, g, 0.8, fused=True)
        project_(g, m, torch.zeros(n), fused=True)
        assert calls == ["stats", "reduce", "fold", "project"], calls
        calls.clear()
        ema_update_(m, g, 0.8, fused=True, sq_norms=True)  # no separate norm pass
        assert calls == ["fold", "reduce"], calls


# ----------------------------------------------------------------- the optimizer
@pytest.mark.parametrize("inner", ["adamw_fused", "sgd_momentum"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"granularity": "tensor"},
        {"retain_weight": 0.5},
        {"cos_clip": -0.5},
        {"max_grad_norm": 0.05},
        {"ema_dtype": torch.bfloat16},
        {"skip_nonfinite": False},
    ],
    ids=["global", "tensor", "retain_weight", "cos_clip", "clip", "bf16", "no_check"],
)
def test_fused_optimizer_matches_the_foreach_path(kernels, inner, kw) -> None:
    a = make_net(torch.float32)
    b = copy.deepcopy(a)
    oa = fused_opt(kernels, make_inner(inner, a), **kw)
    ob = GRUOptimizer(make_inner(inner, b), fused=False, **kw)
    assert ob.kernels == "foreach"
    # A bfloat16 memory rounds differently (one rounding of the fused lerp against two of
    # the foreach path's multiply-add): its 2**-8 precision sets the tolerance.
    rtol, atol = (2e-2, 2e-3) if kw.get("ema_dtype") == torch.bfloat16 else (1e-4, 1e-6)
    for t in range(4):
        oa.step(*closures(a, t))
        ob.step(*closures(b, t))
        for key in ("dot", "coef", "ema_norm", "forget_grad_norm", "retain_grad_norm"):
            torch.testing.assert_close(
                oa.last_stats[key].double(), ob.last_stats[key].double(), rtol=rtol, atol=atol
            )
    assert_params_close(a, b, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("inner", ["adamw_fused", "sgd_momentum"])
@pytest.mark.parametrize("where", ["retain", "forget"])
def test_fused_path_skips_on_the_device(kernels, inner, where) -> None:
    model = make_net(torch.float32)
    opt = fused_opt(kernels, make_inner(inner, model))
    for t in range(2):
        opt.step(*closures(model, t))
    # The source steps a fused torch optimizer with the skip flag on the device.
    assert opt._sides.source.device_skip == (inner == "adamw_fused")
    before = snapshot(model, opt)
    f, r = closures(model, 2)

    def poison(fn):
        def run():
            loss = fn()
            model.body[0].weight.grad[0, 0] = float("inf")
            return loss

        return run

    opt.step(poison(f) if where == "forget" else f, poison(r) if where == "retain" else r)
    want = SkipReason.FORGET_NONFINITE if where == "forget" else SkipReason.RETAIN_NONFINITE
    assert int(opt.last_stats["skip_reason"]) == want
    after = snapshot(model, opt)
    for x, y in zip(before["params"], after["params"]):
        assert torch.equal(x, y)
    from conftest import equal_nested

    assert equal_nested(before["inner"], after["inner"])  # the fused AdamW skipped itself
    if where == "retain":
        assert equal_nested(before["ema"], after["ema"])


def test_fused_true_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="fused=True runs the projection"):
        GRUOptimizer(make_inner("adam", make_net(torch.float32)), fused=True, directions=2)
    with pytest.raises(ValueError, match="fused=True runs the projection"):
        GRUOptimizer(make_inner("adam", make_net(torch.float32)), fused=True, space="update")
    # Without the interpreter, on CPU tensors: a clear error from gru_optim, nothing built.
    code = (
        "import torch\nfrom gru_optim import GRUOptimizer\n"
        "p = torch.nn.Parameter(torch.zeros(3))\n"
        "try:\n    GRUOptimizer(torch.optim.SGD([p], lr=0.1), fused=True)\n"
        "except ValueError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "TRITON_INTERPRET=1" in out


def test_fused_none_on_the_cpu_picks_the_cpu_kernels_but_not_the_interpreter(
    monkeypatch,
) -> None:
    # The interpreter is a test harness: with TRITON_INTERPRET=1 the default stays foreach.
    opt = GRUOptimizer(make_inner("adam", make_net(torch.float32)))
    assert opt.kernels == "foreach"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert GRUOptimizer(make_inner("adam", make_net(torch.float32))).kernels == "cpu"
    # Paths without a fused form, and fused=False, stay on the foreach path.
    for kw in ({"directions": 2}, {"space": "update"}, {"fused": False}):
        opt = GRUOptimizer(make_inner("adam", make_net(torch.float32)), **kw)
        assert opt.kernels == "foreach", kw


def _shared_model() -> torch.nn.Module:
    # Every parameter gets both a forget and a retain gradient, so every parameter has a
    # memory (the global coefficient then reaches the kernel as one expanded value).
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _shared_closures(model, t):
    gen = torch.Generator().manual_seed(t)
    xf, xr = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    yf, yr = torch.randint(0, 3, (8,), generator=gen), torch.randint(0, 3, (8,), generator=gen)
    ce = torch.nn.functional.cross_entropy

    def forget():
        loss = -ce(model(xf), yf)
        loss.backward()
        return loss

    def retain():
        loss = ce(model(xr), yr)
        loss.backward()
        return loss

    return forget, retain


@pytest.mark.parametrize("kw", [{}, {"cos_clip": -0.5}, {"retain_weight": 0.5}])
def test_fused_global_projection_when_every_parameter_has_a_memory(kernels, kw) -> None:
    a = _shared_model()
    b = copy.deepcopy(a)
    oa = fused_opt(kernels, torch.optim.SGD(a.parameters(), lr=0.5), **kw)
    ob = GRUOptimizer(torch.optim.SGD(b.parameters(), lr=0.5), fused=False, **kw)
    conflicts = 0
    for t in range(4):
        oa.step(*_shared_closures(a, t))
        ob.step(*_shared_closures(b, t))
        conflicts += int(ob.last_stats["conflict"])
        torch.testing.assert_close(oa.last_stats["coef"].double(), ob.last_stats["coef"].double())
    assert conflicts > 0  # the projection ran
    assert_params_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),
    ],
    ids=["sgd_fused", "adamw_fused"],
)
def test_a_skipped_first_step_leaves_a_fused_inner_optimizer_empty(kernels, make) -> None:
    # torch's fused optimizers create their state before they read found_inf: the first
    # step of a parameter is skipped on the host, so no uninitialised buffer is left.
    model = _shared_model()
    ref = copy.deepcopy(model)
    opt = fused_opt(kernels, make(list(model.parameters())))
    ref_opt = GRUOptimizer(make(list(ref.parameters())), fused=False)
    before = [p.detach().clone() for p in model.parameters()]

    def poisoned(net):
        f, _ = _shared_closures(net, 0)

        def run():
            loss = f()
            net[0].weight.grad[0, 0] = float("nan")
            return loss

        return run

    opt.step(poisoned(model), _shared_closures(model, 0)[1])
    ref_opt.step(poisoned(ref), _shared_closures(ref, 0)[1])
    assert int(opt.last_stats["skip_reason"]) == SkipReason.FORGET_NONFINITE
    assert len(opt.state) == 0
    assert all(torch.equal(x, p) for x, p in zip(before, model.parameters()))
    for t in range(1, 4):
        opt.step(*_shared_closures(model, t))
        ref_opt.step(*_shared_closures(ref, t))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert_params_close(model, ref, rtol=1e-5, atol=1e-6)
