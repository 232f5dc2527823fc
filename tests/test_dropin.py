"""Drop-in exactness: every path a real training loop takes is exact, or refused clearly
with nothing changed (the numbered cases of the correctness issue)."""

from __future__ import annotations

import copy
import importlib
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _reference import ReferenceGRU
from conftest import (
    assert_params_close,
    assert_unchanged,
    batch,
    closures,
    make_inner,
    make_net,
    snapshot,
)
from torch import Tensor, nn

from gru_optim import EMA_KEY, GRUOptimizer, SkipReason


def _pair(name: str = "adamw_foreach", **kw):
    model = make_net()
    ref_model = copy.deepcopy(model)
    return (
        model,
        GRUOptimizer(make_inner(name, model), **kw),
        ref_model,
        ReferenceGRU(make_inner(name, ref_model), **kw),
    )


# ----------------------------------------------------------------- 1. clipping
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"retain_weight": 0.5},
        {"granularity": "tensor"},
        {"space": "update"},
        {"cos_clip": -0.5},
    ],
    ids=["plain", "retain_weight", "tensor", "update", "cos_clip"],
)
def test_max_grad_norm_clips_the_rectified_gradient_like_the_authors(kw: dict) -> None:
    model, opt, ref_model, ref = _pair(max_grad_norm=0.05, **kw)
    clipped = 0
    for t in range(4):
        f, r = closures(model, t)
        opt.step(f, r)
        ref.step(*closures(ref_model, t))
        clipped += int(float(opt.last_stats["clip_coef"]) < 1.0)
        assert float(opt.last_stats["grad_norm"]) > 0
    assert clipped >= 3  # the bound is active
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)


def test_max_grad_norm_bounds_the_final_gradient() -> None:
    model = make_net()
    opt = GRUOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), retain_weight=2.0, max_grad_norm=0.27
    )
    for t in range(3):
        opt.step(*closures(model, t))
        total = math.sqrt(
            sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None)
        )
        assert total <= 0.27 * (1 + 1e-9)
        assert math.isclose(total, 0.27, rel_tol=1e-6)  # it was above: clipped to the bound


@pytest.mark.parametrize("where", ["closure_free", "inside_forget_closure"])
def test_clipping_between_retain_side_and_step_with_retain_weight_is_refused(where: str) -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model), retain_weight=0.5)
    opt.step(*closures(model, 0))
    before = snapshot(model, opt)
    xf, yf = batch(1, "forget")
    xr, yr = batch(1, "retain")
    with pytest.raises(RuntimeError, match="max_grad_norm"):
        if where == "closure_free":
            with opt.retain_pass():
                model.retain_loss(xr, yr).backward()
            model.forget_loss(xf, yf).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
        else:
            # As PyTorch Lightning does: it clips inside the closure, after backward.
            def forget() -> Tensor:
                loss = model.forget_loss(xf, yf)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                return loss

            opt.step(forget, closures(model, 1)[1])
    after = snapshot(model, opt)
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    # Without retain_weight the same clipping is a pre-rectification clip, accepted.
    opt2 = GRUOptimizer(make_inner("adam", model))
    with opt2.retain_pass():
        model.retain_loss(xr, yr).backward()
    model.forget_loss(xf, yf).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    opt2.step()
    assert bool(opt2.last_stats["rectified"])


@pytest.mark.parametrize("how", ["reassigned", "module_zero_grad"])
def test_replaced_gradients_with_retain_weight_are_refused(how: str) -> None:
    # A new .grad tensor starts at version 0: the version counters alone missed it and the
    # retain_weight part was silently lost.
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model), retain_weight=0.5)
    opt.step(*closures(model, 0))
    before = snapshot(model, opt)
    xf, yf = batch(1, "forget")

    def forget() -> Tensor:
        if how == "module_zero_grad":
            model.zero_grad()  # drops the retain part kept in .grad
        loss = model.forget_loss(xf, yf)
        loss.backward()
        if how == "reassigned":
            for p in model.parameters():
                if p.grad is not None:
                    p.grad = p.grad * 0.1
        return loss

    with pytest.raises(RuntimeError, match="replaced"):
        opt.step(forget, closures(model, 1)[1])
    after = snapshot(model, opt)
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)


def test_zero_grad_inside_the_forget_closure_after_backward_is_refused() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("sgd_momentum", model), retain_weight=0.5)
    opt.step(*closures(model, 0))
    before = snapshot(model, opt)
    f, r = closures(model, 1)

    def forget() -> Tensor:
        loss = f()
        opt.zero_grad()
        return loss

    with pytest.raises(RuntimeError, match="after its backward"):
        opt.step(forget, r)
    after = snapshot(model, opt)
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    opt.step(*closures(model, 1))  # and the optimizer goes on
    assert bool(opt.last_stats["rectified"])


def test_micro_batches_and_ddp_style_writes_are_not_mistaken_for_clipping() -> None:
    """Several forget backwards accumulate in place: that is not an in-place change."""
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model), retain_weight=0.5)
    xf, yf = batch(1, "forget")
    with opt.retain_pass():
        model.retain_loss(*batch(1, "retain")).backward()
    for xb, yb in zip(xf.chunk(4), yf.chunk(4)):
        (model.forget_loss(xb, yb) / 4).backward()
    opt.step()
    assert bool(opt.last_stats["rectified"]) and not bool(opt.last_stats["skipped"])


# ----------------------------------------------------------------- 2. frozen parameters
def test_a_parameter_frozen_mid_run_never_moves_and_gets_no_gradient() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adamw_foreach", model))
    for t in range(2):
        opt.step(*closures(model, t))
    assert opt.retain_memory(model.retain_head.weight) is not None
    model.retain_head.requires_grad_(False)
    frozen = [p.detach().clone() for p in model.retain_head.parameters()]
    for t in range(2, 5):
        opt.zero_grad()
        opt.step(*closures(model, t))
        for p, q in zip(model.retain_head.parameters(), frozen):
            assert p.grad is None
            assert torch.equal(p, q)


def test_a_frozen_parameter_never_moves_even_without_zero_grad() -> None:
    # The rectified forget gradient GRU wrote before freezing stayed in .grad and was
    # stepped again every step (2.7e-2 over 3 SGD steps) when nobody called zero_grad.
    model = make_net()
    opt = GRUOptimizer(make_inner("sgd_momentum", model))
    for t in range(2):
        opt.step(*closures(model, t))
    model.retain_head.requires_grad_(False)
    frozen = [p.detach().clone() for p in model.retain_head.parameters()]
    for t in range(2, 5):
        opt.step(*closures(model, t))  # no zero_grad at all
        for p, q in zip(model.retain_head.parameters(), frozen):
            assert p.grad is None
            assert torch.equal(p, q)


# ----------------------------------------------------------------- 3. torch.compile
@pytest.mark.parametrize("path", ["closures", "retain_pass"])
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_training_step_gives_the_eager_result(backend: str, path: str) -> None:
    # Both paths: the closure-free one (retain_pass() inside the compiled function) used
    # to give plain, unrectified steps (its bookkeeping was traced and lost).
    def run(compiled: bool) -> tuple[list[Tensor], Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), retain_weight=0.5)
        x = torch.randn(8, 4)
        y = torch.randint(0, 3, (8,))

        def forget() -> Tensor:
            loss = -F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        def retain() -> Tensor:
            loss = F.cross_entropy(model(x[:4]), y[:4])
            loss.backward()
            return loss

        def train_step() -> Tensor:
            opt.zero_grad()
            if path == "closures":
                return opt.step(forget, retain)
            with opt.retain_pass():
                retain()
            loss = forget()
            opt.step()
            return loss

        fn = torch.compile(train_step, backend=backend) if compiled else train_step
        with warnings.catch_warnings():
            # dynamo itself reads .grad of a non-leaf while resuming after the graph break
            # at the retain pass's backward (a torch-internal warning)
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor")
            for _ in range(3):
                fn()
        return [p.detach().clone() for p in model.parameters()], opt.last_stats["coef"]

    if backend == "inductor":
        # torch 2.13's own inductor import (torch/utils/mkldnn.py) warns about
        # torch.jit.script_method; import it once with that warning silenced.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module("torch._inductor.compile_fx")
    torch._dynamo.reset()
    eager, coef = run(False)
    compiled, ccoef = run(True)
    assert float(coef) != 0.0  # the run rectifies
    # inductor compiles the forward and backward inside the passes: rounding may differ
    torch.testing.assert_close(coef, ccoef, rtol=1e-5, atol=1e-7)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------- 4. global hooks
def test_global_step_hooks_fire_once_per_step_and_inner_hooks_still_work() -> None:
    calls: list[str] = []
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    pre = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(f"pre:{type(o).__name__}"))
    post = register_optimizer_step_post_hook(
        lambda o, a, k: calls.append(f"post:{type(o).__name__}")
    )
    try:
        model = make_net()
        inner = make_inner("adam", model)
        inner.register_step_pre_hook(lambda o, a, k: calls.append("inner-pre"))
        inner.register_step_post_hook(lambda o, a, k: calls.append("inner-post"))
        opt = GRUOptimizer(inner, plain_steps="allow")
        opt.step(*closures(model, 0))
        assert calls == ["pre:GRUOptimizer", "inner-pre", "inner-post", "post:GRUOptimizer"]
        calls.clear()
        f, _ = closures(model, 1)
        opt.zero_grad()
        f()
        opt.step()  # a plain step: the same, once
        assert calls == ["pre:GRUOptimizer", "inner-pre", "inner-post", "post:GRUOptimizer"]
    finally:
        pre.remove()
        post.remove()


# ----------------------------------------------------------------- 5. non-finite memory
def test_float16_memory_overflow_skips_the_step_and_never_gives_nan_weights() -> None:
    model = make_net(torch.float32)
    opt = GRUOptimizer(make_inner("adamw_foreach", model), ema_dtype=torch.float16)
    opt.step(*closures(model, 0))
    before = snapshot(model, opt)
    xr, yr = batch(1, "retain", torch.float32)

    def huge_retain() -> Tensor:
        loss = 1e7 * model.retain_loss(xr, yr)  # gradient elements beyond float16's 65504
        loss.backward()
        return loss

    opt.step(closures(model, 1)[0], huge_retain)
    assert bool(opt.last_stats["skipped"])
    assert int(opt.last_stats["skip_reason"]) == SkipReason.MEMORY_OVERFLOW
    assert_unchanged(before, model, opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_memory_in_a_checkpoint_is_refused() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model))
    opt.step(*closures(model, 0))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0][EMA_KEY][0, 0] = float("nan")
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="not finite"):
        opt.load_state_dict(sd)
    assert_unchanged(before, model, opt)


def _scaled_problem(scale: float) -> tuple[list[Tensor], list[Tensor]]:
    gen = torch.Generator().manual_seed(3)
    shapes = [(40, 30), (30,), (7, 5)]
    m = [torch.randn(s, generator=gen) for s in shapes]
    g = [-0.8 * mi + 0.5 * torch.randn(mi.shape, generator=gen) for mi in m]
    return [x * scale for x in g], [x * scale for x in m]


def _rectified(scale: float, **kw) -> tuple[list[Tensor], GRUOptimizer]:
    g, m = _scaled_problem(scale)
    params = [nn.Parameter(torch.zeros_like(x)) for x in g]
    opt = GRUOptimizer(torch.optim.SGD(params, lr=0.0), gamma=1.0, **kw)
    with opt.retain_pass():
        for p, mi in zip(params, m):
            p.grad = mi.clone()
    for p, gi in zip(params, g):
        p.grad = gi.clone()
    opt.step()
    return [p.grad.clone() for p in params], opt


@pytest.mark.parametrize("scale", [1e-30, 1e-25, 1e-23, 1e-15, 1e-8, 1.0, 1e8, 1e15, 1e18])
def test_exact_for_gradients_scaled_across_the_float32_range(scale: float) -> None:
    """GRU is scale-equivariant: rectify(s g, s m) = s rectify(g, m). Inside float32's
    range of squares directly, outside it (1e-23, 1e18) through the float64 recomputation
    on the CPU; below ~1e-23 every square underflows to zero, and such a memory used to
    read as none (a silent unrectified step)."""
    want, _ = _rectified(1.0)
    got, opt = _rectified(scale)
    assert not bool(opt.last_stats["skipped"]) and bool(opt.last_stats["conflict"])
    g64 = [w.double() * scale for w in want]
    for a, b in zip(got, g64):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=scale * 1e-6)


def test_out_of_float32_range_skips_with_a_reason_never_nan() -> None:
    # A coefficient that does not fit float32 (|g| / |m| ~ 1e45): skipped, not NaN.
    g, m = _scaled_problem(1.0)
    params = [nn.Parameter(torch.zeros_like(x)) for x in g]
    opt = GRUOptimizer(torch.optim.SGD(params, lr=1.0), gamma=1.0)
    with opt.retain_pass():
        for p, mi in zip(params, m):
            p.grad = mi * 1e-30
    for p, gi in zip(params, g):
        p.grad = gi * 1e15
    opt.step()
    assert bool(opt.last_stats["skipped"])
    assert int(opt.last_stats["skip_reason"]) == SkipReason.OUT_OF_RANGE
    assert all(torch.equal(p, torch.zeros_like(p)) for p in params)
    # A genuinely infinite forget gradient: skipped, with its reason.
    with opt.retain_pass():
        for p, mi in zip(params, m):
            p.grad = mi.clone()
    for p, gi in zip(params, g):
        p.grad = gi.clone()
    params[0].grad[0, 0] = float("inf")
    opt.step()
    assert int(opt.last_stats["skip_reason"]) == SkipReason.FORGET_NONFINITE
    assert all(torch.isfinite(p).all() for p in params)


# ----------------------------------------------------------------- 6. stale gradients
def test_step_twice_without_zero_grad_equals_the_reference() -> None:
    model, opt, ref_model, ref = _pair("adam")
    for t in range(4):
        opt.step(*closures(model, t))  # no zero_grad: the previous gradients are stale
        ref.step(*closures(ref_model, t))
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        m, mr = opt.retain_memory(p), ref.memory(q)
        assert (m is None) == (mr is None)
        if m is not None:
            torch.testing.assert_close(m, mr, rtol=1e-9, atol=1e-12)


def test_lightning_style_closure_that_zeroes_inside() -> None:
    """Lightning's automatic optimization: zero_grad + backward inside the (forget)
    closure, nothing zeroed before GRU's retain closure."""
    model, opt, ref_model, ref = _pair("adam")
    for t in range(5):
        f, r = closures(model, t)

        def lightning_closure(f=f) -> Tensor:
            opt.zero_grad()
            return f()

        opt.step(closure=lightning_closure, retain_closure=r)
        ref.step(*closures(ref_model, t))
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        m, mr = opt.retain_memory(p), ref.memory(q)
        if m is not None:
            torch.testing.assert_close(m, mr, rtol=1e-9, atol=1e-12)


def test_forget_backward_before_the_retain_side_is_stale_and_the_error_says_the_order() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model))
    f, r = closures(model, 0)
    f()  # too early: before the retain side
    with pytest.raises(RuntimeError, match="retain closure or retain_pass\\(\\) first"):
        opt.step(retain_closure=r)
    # The memory only ever received the retain gradient.
    ref_model = copy.deepcopy(model)
    ref = ReferenceGRU(make_inner("adam", ref_model))
    ref.fold_retain(closures(ref_model, 0)[1])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        m, mr = opt.retain_memory(p), ref.memory(q)
        assert (m is None) == (mr is None)
        if m is not None:
            torch.testing.assert_close(m, mr, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------- 7. dropped retain pass
def test_a_retain_pass_dropped_by_zero_grad_warns_once_and_stats_say_plain() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model))
    opt.step(*closures(model, 0))
    assert bool(opt.last_stats["rectified"])
    for t in (1, 2):
        with opt.retain_pass():
            model.retain_loss(*batch(t, "retain")).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.zero_grad()
        assert len(caught) == (1 if t == 1 else 0)  # once
        model.forget_loss(*batch(t, "forget")).backward()
        opt.step()
        s = opt.last_stats
        assert not bool(s["rectified"]) and not bool(s["skipped"])
        assert math.isnan(float(s["dot"])) and math.isnan(float(s["retain_loss"]))
        assert set(s) == set(opt.last_stats)


# ----------------------------------------------------------------- 8. LBFGS
def _lbfgs_closures(model, t, opt_like):
    f, r = closures(model, t)

    def forget() -> Tensor:
        opt_like.zero_grad()
        return f()

    return forget, r


def test_lbfgs_rectifies_every_evaluation_against_one_fold() -> None:
    model = make_net()
    ref_model = copy.deepcopy(model)
    opt = GRUOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4))
    ref_inner = torch.optim.LBFGS(ref_model.parameters(), lr=0.5, max_iter=4)
    ref = ReferenceGRU(ref_inner)
    evaluations = 0
    for t in range(3):
        forget, retain = _lbfgs_closures(model, t, opt)
        opt.step(forget, retain)
        # The reference: fold once, then every evaluation is projected by hand.
        ref.fold_retain(closures(ref_model, t)[1])
        rf, _ = closures(ref_model, t)
        params = [p for g in ref_inner.param_groups for p in g["params"]]

        def ref_closure(rf=rf, params=params) -> Tensor:
            nonlocal evaluations
            evaluations += 1
            ref_inner.zero_grad()
            loss = rf()
            from _reference import _flat, _unflat, project_flat

            gs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            ms = [
                ref.memory(p) if ref.memory(p) is not None else torch.zeros_like(p) for p in params
            ]
            x, _, _ = project_flat(_flat(gs), _flat(ms))
            for p, v in zip(params, _unflat(x, gs)):
                if p.grad is not None or ref.memory(p) is not None:
                    p.grad = v.to(p.dtype).clone()
            return loss

        ref_inner.step(ref_closure)
    assert evaluations > 3  # LBFGS re-evaluated the closure
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)


def test_lbfgs_refuses_what_it_cannot_do_before_anything_changes() -> None:
    model = make_net()
    opt = GRUOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5), plain_steps="allow")
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="needs closures"):
        with opt.retain_pass():
            pass
    with pytest.raises(ValueError, match="retain_weight=0"):
        GRUOptimizer(torch.optim.LBFGS(model.parameters()), retain_weight=0.5)
    assert_unchanged(before, model, opt)
    # The plain pass-through keeps working.
    f, _ = closures(model, 0)
    opt.step(lambda: (opt.zero_grad(), f())[1])
    assert not bool(opt.last_stats["rectified"])


def test_lbfgs_refuses_a_post_closure_and_a_missing_forget_closure_before_folding() -> None:
    model = make_net()
    opt = GRUOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5))
    before = snapshot(model, opt)
    f, r = closures(model, 0)
    with pytest.raises(ValueError, match="post_closure"):
        opt.step(f, r, r)  # it used to be ignored silently
    with pytest.raises(RuntimeError, match="needs the forget closure"):
        opt.step(None, r)  # it used to fold the memory first
    assert_unchanged(before, model, opt)


def test_an_early_lbfgs_checkpoint_loads_into_a_later_optimizer() -> None:
    # LBFGS adds "al" to its state once it has a history: a checkpoint from its first
    # step lacks it and was refused as "from another optimizer"; bare LBFGS loads it.
    def make():
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, 2))]
        return ps, GRUOptimizer(torch.optim.LBFGS(ps, max_iter=1))

    def run(ps, opt, steps):
        for _ in range(steps):

            def forget(ps=ps, opt=opt) -> Tensor:
                opt.zero_grad()
                loss = sum(p.sin().sum() for p in ps)
                loss.backward()
                return loss

            def retain(ps=ps) -> Tensor:
                loss = ((ps[0] - 1) ** 2).sum()
                loss.backward()
                return loss

            opt.step(forget, retain)

    pa, a = make()
    run(pa, a, 1)
    early = copy.deepcopy(a.state_dict())
    pc, c = make()
    run(pc, c, 3)
    assert "al" in c.state_dict()["state"][0] and "al" not in early["state"][0]
    c.load_state_dict(early)
    with torch.no_grad():
        for p, q in zip(pc, pa):
            p.copy_(q)
    run(pa, a, 2)
    run(pc, c, 2)
    for p, q in zip(pc, pa):
        assert torch.equal(p, q)
    truncated = copy.deepcopy(early)
    del truncated["state"][0]["n_iter"]
    with pytest.raises(ValueError, match="another optimizer"):
        c.load_state_dict(truncated)


def test_lbfgs_state_dict_round_trips_with_a_one_dimensional_first_parameter() -> None:
    torch.manual_seed(0)
    bias = nn.Parameter(torch.randn(3))
    weight = nn.Parameter(torch.randn(3, 4))
    opt = GRUOptimizer(torch.optim.LBFGS([bias, weight], lr=0.1), plain_steps="allow")
    x = torch.randn(5, 4)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (x @ weight.t() + bias).square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = GRUOptimizer(
        torch.optim.LBFGS(
            [nn.Parameter(bias.detach().clone()), nn.Parameter(weight.detach().clone())], lr=0.1
        )
    )
    opt2.load_state_dict(sd)
    assert set(opt2.optimizer.state_dict()["state"][0]) == set(
        opt.optimizer.state_dict()["state"][0]
    )


def _db_params(two_d_only: bool) -> list[nn.Parameter]:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    return [w] if two_d_only else [w, nn.Parameter(torch.randn(3))]


def _optim_db_cases() -> list:
    """Every optimizer of torch's own test database and each of its CPU sample
    configurations, with each implementation (for-loop, foreach, fused) it supports on the
    CPU. SparseAdam is left out: it steps only sparse gradients, and GRU refuses it (the
    rectified gradient is dense)."""
    from torch.testing._internal.common_optimizers import optim_db

    cases = []
    for info in optim_db:
        if info.only_supports_sparse_grads:
            continue
        impls = [None] + [
            i
            for i in ("foreach", "fused")
            if i in info.supported_impls and (i != "fused" or "cpu" in info.supports_fused_on)
        ]
        for k, inp in enumerate(info.optim_inputs_func(device="cpu")):
            for impl in impls:
                kwargs = dict(inp.kwargs)
                if impl is not None:
                    if kwargs.get("foreach") or kwargs.get("fused") or kwargs.get("differentiable"):
                        continue
                    kwargs[impl] = True
                for two_d in (False, True):
                    try:
                        info.optim_cls(_db_params(two_d), **kwargs)
                    except (ValueError, RuntimeError, TypeError):
                        continue
                    name = f"{info.optim_cls.__name__}-{k}-{impl or 'for'}"
                    cases.append(pytest.param(info.optim_cls, kwargs, two_d, id=name))
                    break
    return cases


_DB = _optim_db_cases()


def test_the_optimizer_database_is_covered() -> None:
    assert len(_DB) >= 150
    assert {c.values[0].__name__ for c in _DB} >= {
        "Adadelta",
        "Adafactor",
        "Adagrad",
        "Adam",
        "Adamax",
        "AdamW",
        "ASGD",
        "LBFGS",
        "NAdam",
        "RAdam",
        "RMSprop",
        "Rprop",
        "SGD",
    }


@pytest.mark.parametrize(("cls", "kwargs", "two_d"), _DB)
def test_optim_db_pass_through_is_bitwise_and_state_dicts_round_trip(cls, kwargs, two_d) -> None:
    def loss_of(params):
        return sum(
            (p * torch.linspace(-1, 1, p.numel()).reshape(p.shape)).sin().sum() for p in params
        )

    def closure_for(o, params):
        def closure():
            o.zero_grad()
            loss = loss_of(params)
            loss.backward()
            return loss

        return closure

    # Plain steps through the wrapper are bitwise the inner optimizer's (deliberate ones:
    # plain_steps="allow" says so, and they do not warn).
    pa, pb = _db_params(two_d), _db_params(two_d)
    plain = cls(pa, **kwargs)
    wrapped = GRUOptimizer(cls(pb, **kwargs), plain_steps="allow")
    for _ in range(2):
        plain.step(closure_for(plain, pa))
        wrapped.step(closure_for(wrapped, pb))
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)

    # A GRU step (a retain side, then the forget closure) runs on every configuration.
    def retain():
        loss = (pb[0] - 1.0).square().sum()
        loss.backward()
        return loss

    def forget():
        wrapped.zero_grad()
        loss = -loss_of(pb)
        loss.backward()
        return loss

    wrapped.step(forget, retain)
    assert bool(wrapped.last_stats["rectified"])
    assert all(torch.isfinite(p).all() for p in pb)
    # Its state dict, and the plain optimizer's own, load back through the wrapper.
    sd = copy.deepcopy(wrapped.state_dict())
    fresh = GRUOptimizer(cls(_db_params(two_d), **kwargs))
    fresh.load_state_dict(sd)
    from conftest import equal_nested

    assert equal_nested(fresh.state_dict()["state"], wrapped.state_dict()["state"])
    other = GRUOptimizer(cls(_db_params(two_d), **kwargs))
    other.load_state_dict(copy.deepcopy(plain.state_dict()))


# ----------------------------------------------------------------- 9. atomic load
def _trained(name: str = "adamw_foreach"):
    model = make_net()
    opt = GRUOptimizer(make_inner(name, model))
    for t in range(2):
        opt.step(*closures(model, t))
    return model, opt


@pytest.mark.parametrize(
    "case",
    ["memory_not_a_tensor", "sgd_state_into_adamw", "truncated", "entry_not_a_dict", "bad_gamma"],
)
def test_load_state_dict_is_atomic(case: str) -> None:
    model, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    if case == "memory_not_a_tensor":
        sd["state"][3][EMA_KEY] = [1.0, 2.0]
    elif case == "sgd_state_into_adamw":
        other = make_net()
        sgd = GRUOptimizer(make_inner("sgd_momentum", other))
        for t in range(2):
            sgd.step(*closures(other, t))
        sd = copy.deepcopy(sgd.state_dict())
    elif case == "truncated":
        keys = sorted(sd["state"])
        sd["state"] = {k: sd["state"][k] for k in keys[:2]}
    elif case == "entry_not_a_dict":
        sd["state"][1] = torch.zeros(3)
    else:
        sd["param_groups"][1]["gru_gamma"] = 1.5
    before = snapshot(model, opt)
    groups_before = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    )
    with pytest.raises((ValueError, TypeError)):
        opt.load_state_dict(sd)
    assert_unchanged(before, model, opt)
    assert [
        {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
    ] == groups_before


def test_sgd_state_into_a_fresh_adamw_is_refused() -> None:
    """With an empty inner state nothing can be compared per entry: the group's
    hyperparameters show the other optimizer class."""
    other = make_net()
    sgd = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    loss = other.forget_loss(*batch(0, "forget"))
    loss.backward()
    sgd.step()
    fresh = GRUOptimizer(torch.optim.AdamW(make_net().parameters()))
    with pytest.raises(ValueError, match="another optimizer class"):
        fresh.load_state_dict(copy.deepcopy(sgd.state_dict()))
    assert len(fresh.optimizer.state) == 0


# ----------------------------------------------------------------- 10. checkpoint mid-step
def test_state_dict_between_retain_pass_and_step_is_refused() -> None:
    model, opt = _trained()
    with opt.retain_pass():
        model.retain_loss(*batch(3, "retain")).backward()
    with pytest.raises(RuntimeError, match="save after"):
        opt.state_dict()
    model.forget_loss(*batch(3, "forget")).backward()
    opt.step()
    opt.state_dict()  # fine after the step


def test_copy_pickle_or_load_between_retain_pass_and_step_is_refused() -> None:
    import pickle

    model, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    with opt.retain_pass():
        model.retain_loss(*batch(3, "retain")).backward()
    with pytest.raises(RuntimeError, match="between retain_pass"):
        copy.deepcopy(opt)  # the copy's next step would be a plain one
    with pytest.raises(RuntimeError, match="between retain_pass"):
        pickle.dumps(opt)
    with pytest.raises(RuntimeError, match="between retain_pass"):
        opt.load_state_dict(sd)  # the pass would be lost silently
    model.forget_loss(*batch(3, "forget")).backward()
    opt.step()
    assert bool(opt.last_stats["rectified"])
    copy.deepcopy(opt)  # fine after the step


# ----------------------------------------------------------------- 11. retry after an error
def test_the_same_call_can_be_retried_after_a_forget_closure_raises() -> None:
    model, opt, ref_model, ref = _pair("adam")
    opt.step(*closures(model, 0))
    ref.step(*closures(ref_model, 0))
    f, r = closures(model, 1)
    calls = {"n": 0}

    def flaky() -> Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("data loader hiccup")
        return f()

    with pytest.raises(KeyError):
        opt.step(flaky, r)
    opt.step(flaky, r)  # the same call again: no "retain_closure after retain_pass"
    assert bool(opt.last_stats["rectified"])
    # Documented: the memory then holds the retain gradient of these weights folded twice.
    ref.fold_retain(closures(ref_model, 1)[1])
    ref.step(*closures(ref_model, 1))
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------- 12. validation
@pytest.mark.parametrize(
    "kw",
    [
        {"retain_weight": math.inf},
        {"retain_weight": True},
        {"gamma": True},
        {"gamma": "0.8"},
        {"max_grad_norm": 0.0},
        {"max_grad_norm": math.nan},
        {"cos_clip": 0.5},
        {"gamma": torch.tensor([0.8, 0.8])},
    ],
    ids=[
        "rw_inf",
        "rw_bool",
        "gamma_bool",
        "gamma_str",
        "clip_zero",
        "clip_nan",
        "cosclip_positive",
        "gamma_vector",
    ],
)
def test_nonsense_is_refused_at_construction(kw: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        GRUOptimizer(make_inner("adam", make_net()), **kw)


@pytest.mark.parametrize(
    "value",
    [np.float32(0.8), np.float64(0.8), torch.tensor(0.8), np.array(0.8), 4 / 5],
    ids=["np_float32", "np_float64", "tensor0d", "array0d", "float"],
)
def test_real_numbers_of_any_type_are_accepted(value) -> None:
    model = make_net()
    opt = GRUOptimizer(
        make_inner("adam", model),
        gamma=value,
        retain_weight=np.float32(0.5),
        max_grad_norm=np.int64(3),
    )
    assert opt.gamma == pytest.approx(0.8) and isinstance(opt.gamma, float)
    opt.step(*closures(model, 0))


def test_a_closure_returning_a_non_scalar_loss_is_refused_before_the_memory_changes() -> None:
    model, opt = _trained()
    before = snapshot(model, opt)
    xr, yr = batch(4, "retain")

    def retain_vector() -> Tensor:
        loss = F.cross_entropy(model.head(model.body(xr)), yr, reduction="none")
        loss.mean().backward()
        return loss

    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(closures(model, 4)[0], retain_vector)
    assert_unchanged(before, model, opt)


def test_a_plain_pass_through_closure_may_return_anything() -> None:
    # Bare SGD accepts a closure returning a vector; the pass-through stepped and then
    # raised from its statistics. Now it steps exactly as SGD and records NaN.
    model = make_net()
    ref = copy.deepcopy(model)
    opt = GRUOptimizer(make_inner("sgd_momentum", model), plain_steps="allow")
    bare = make_inner("sgd_momentum", ref)
    for net, o in ((model, opt), (ref, bare)):
        xf, yf = batch(0, "forget")

        def closure(net=net, o=o, xf=xf, yf=yf) -> Tensor:
            o.zero_grad()
            loss = F.cross_entropy(net.head(net.body(xf)), yf, reduction="none")
            loss.mean().backward()
            return loss

        out = o.step(closure)
        assert out.shape == (16,)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert math.isnan(float(opt.last_stats["forget_loss"]))
    # numpy scalars are real numbers
    f, r = closures(model, 1)
    seen = []

    def numpy_loss() -> np.float32:
        seen.append(np.float32(f().item()))
        return seen[-1]

    opt.step(numpy_loss, r)
    assert float(opt.last_stats["forget_loss"]) == pytest.approx(float(seen[0]))
    assert GRUOptimizer(make_inner("adam", make_net()), directions=np.int64(2)) is not None


def test_combinations_refused_before_the_retain_side_folds() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model), cos_clip=-0.5)
    opt.step(*closures(model, 0))
    before = snapshot(model, opt)
    f, r = closures(model, 1)
    with pytest.raises(ValueError, match="cos_clip"):
        opt.step(f, r, r)  # a post closure: cos_clip cannot separate it
    assert_unchanged(before, model, opt)
    opt.param_groups[1]["gru_cos_clip"] = -0.2  # one global segment, two thresholds
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="granularity='group'"):
        opt.step(f, r)
    assert_unchanged(before, model, opt)


def test_hyperparameters_changed_in_the_groups_are_validated_before_anything_changes() -> None:
    model, opt = _trained()
    opt.param_groups[0]["gru_gamma"] = 0.0
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="param_groups\\[0\\]"):
        opt.step(*closures(model, 3))
    assert_unchanged(before, model, opt)


# ----------------------------------------------------------------- 13. the hf extra
def test_import_hf_without_transformers_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "try:\n    import gru_optim.hf\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    # the package is on no registry: the message says how to install it from a checkout
    assert "the 'hf' extra" in out and 'pip install "./gru-optim[hf]"' in out
