"""GRUOptimizer against the independent float64 reference, and as a torch.optim citizen."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from _reference import ReferenceGRU
from conftest import (
    OPTIMIZERS,
    Net,
    assert_params_close,
    assert_params_equal,
    batch,
    closures,
    make_inner,
    make_net,
)
from torch import Tensor, nn

from gru_optim import GRUOptimizer, PlainStepWarning

STEPS = 4


def _pair(name: str, dtype: torch.dtype = torch.float64, **kw):
    model = make_net(dtype)
    ref_model = copy.deepcopy(model).to(torch.float64)
    opt = GRUOptimizer(make_inner(name, model), **kw)
    ref = ReferenceGRU(make_inner(name, ref_model), **kw)
    return model, opt, ref_model, ref


def _check_stats(opt: GRUOptimizer, info: dict, rtol: float, granularity: str) -> None:
    s = opt.last_stats
    for k, v in s.items():
        assert isinstance(v, Tensor) and v.dim() == 0, k
    assert not bool(s["skipped"])
    assert bool(s["conflict"]) == info["conflict"]
    scale = max(1.0, abs(info["dot"]))
    assert math.isclose(float(s["dot"]), info["dot"], rel_tol=rtol, abs_tol=rtol * scale)
    assert math.isclose(float(s["forget_grad_norm"]), info["forget_grad_norm"], rel_tol=rtol)
    assert math.isclose(float(s["retain_grad_norm"]), info["retain_grad_norm"], rel_tol=rtol)
    assert math.isclose(float(s["ema_norm"]), math.sqrt(sum(info["sq"])), rel_tol=rtol)
    if granularity == "global":
        coef = info["coefs"][0]
        assert math.isclose(float(s["coef"]), coef, rel_tol=rtol, abs_tol=1e-12)
        cos = info["dot"] / (info["forget_grad_norm"] * math.sqrt(info["sq"][0]))
        assert math.isclose(float(s["cosine"]), cos, rel_tol=rtol, abs_tol=1e-9)
        assert -1.0 - 1e-6 <= float(s["cosine"]) <= 1.0 + 1e-6
    else:
        frac = sum(c != 0.0 for c in info["coefs"]) / len(info["coefs"])
        assert math.isclose(float(s["conflict_fraction"]), frac, abs_tol=1e-6)


def _train(
    model, opt, ref_model, ref, steps=STEPS, granularity="global", rtol=1e-9, check_stats=True
):
    for t in range(steps):
        f, r = closures(model, t)
        opt.zero_grad()
        loss = opt.step(f, r)
        info = ref.step(*closures(ref_model, t))
        assert isinstance(loss, Tensor)
        if check_stats:
            _check_stats(opt, info, rtol, granularity)
    assert any(h["conflict"] for h in ref.history), "the run never exercised a conflict"


# ----------------------------------------------------------------- against the reference
@pytest.mark.parametrize("granularity", ["global", "tensor", "group"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_matches_float64_reference(name: str, granularity: str) -> None:
    model, opt, ref_model, ref = _pair(name, granularity=granularity)
    _train(model, opt, ref_model, ref, granularity=granularity)
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        m, mr = opt.retain_memory(p), ref.memory(q)
        assert (m is None) == (mr is None)
        if m is not None:
            assert m.dtype == torch.float64  # float64 parameters keep a float64 memory
            torch.testing.assert_close(m, mr, rtol=1e-9, atol=1e-12)
    # A parameter with neither gradient keeps grad None and never moves.
    assert model.unused.grad is None
    assert torch.equal(model.unused, ref_model.unused)
    assert opt.retain_memory(model.unused) is None
    assert opt.retain_memory(model.forget_bias) is None


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_foreach", "adamw_fused", "adafactor"])
def test_float32_model_matches_float64_reference(name: str) -> None:
    model, opt, ref_model, ref = _pair(name, dtype=torch.float32)
    _train(model, opt, ref_model, ref, rtol=1e-4)
    for p in model.parameters():
        m = opt.retain_memory(p)
        assert m is None or m.dtype == torch.float32
    assert_params_close(model, ref_model, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_retain_weight_matches_reference(name: str, granularity: str) -> None:
    model, opt, ref_model, ref = _pair(name, granularity=granularity, retain_weight=0.7)
    _train(model, opt, ref_model, ref, granularity=granularity, check_stats=False)
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_gamma_matches_reference(gamma: float) -> None:
    model, opt, ref_model, ref = _pair("adam", gamma=gamma)
    _train(model, opt, ref_model, ref)
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)


def test_retain_only_parameter_takes_its_share() -> None:
    """retain_head has no forget gradient; under the global rule it still moves by -c*m."""
    model, opt, ref_model, ref = _pair("sgd_momentum")
    before = model.retain_head.weight.detach().clone()
    _train(model, opt, ref_model, ref)
    assert not torch.equal(before, model.retain_head.weight)
    torch.testing.assert_close(
        model.retain_head.weight, ref_model.retain_head.weight, rtol=1e-9, atol=1e-12
    )
    # Its gradient was the correction alone: -coef * m, pointing along the memory.
    g = model.retain_head.weight.grad
    m = opt.retain_memory(model.retain_head.weight)
    coef = float(opt.last_stats["coef"])
    assert coef < 0.0
    torch.testing.assert_close(g, -coef * m, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------- space="update"
def _delta_dot(new: list[Tensor], old: list[Tensor], mem: list[Tensor | None]) -> float:
    return sum(
        float(torch.dot((n - o).reshape(-1), m.reshape(-1).to(n.dtype)))
        for n, o, m in zip(new, old, mem)
        if m is not None
    )


@pytest.mark.parametrize("name", ["adam", "adamw_foreach", "rmsprop", "sgd_momentum"])
def test_update_space_never_ascends_the_memory(name: str) -> None:
    model, opt, ref_model, ref = _pair(name, space="update")
    params = list(model.parameters())
    for t in range(6):
        old = [p.detach().clone() for p in params]
        f, r = closures(model, t)
        opt.zero_grad()
        opt.step(f, r)
        ref.step(*closures(ref_model, t))
        mem = [opt.retain_memory(p) for p in params]
        d = _delta_dot([p.detach() for p in params], old, mem)
        scale = sum(
            float((p.detach() - o).norm() * m.norm())
            for p, o, m in zip(params, old, mem)
            if m is not None
        )
        assert d <= 1e-10 * max(scale, 1e-30)
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)


def test_update_space_matters_for_adam() -> None:
    """In gradient space Adam's preconditioning can bring the conflict back; update space
    removes it (the property above is not vacuous)."""
    model = make_net()
    opt = GRUOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
    params = list(model.parameters())
    worst = -math.inf
    for t in range(8):
        old = [p.detach().clone() for p in params]
        f, r = closures(model, t)
        opt.zero_grad()
        opt.step(f, r)
        worst = max(
            worst,
            _delta_dot([p.detach() for p in params], old, [opt.retain_memory(p) for p in params]),
        )
    assert worst > 0.0


@pytest.mark.parametrize("granularity", ["tensor", "group"])
def test_update_space_granularities(granularity: str) -> None:
    model, opt, ref_model, ref = _pair("adam", space="update", granularity=granularity)
    _train(model, opt, ref_model, ref, check_stats=False)
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------- closure-free path
def _closure_free_step(opt: GRUOptimizer, model: Net, t: int, micro: int = 1) -> None:
    dtype = next(model.parameters()).dtype
    xf, yf = batch(t, "forget", dtype)
    xr, yr = batch(t, "retain", dtype)
    opt.zero_grad()
    with opt.retain_pass():
        for _ in range(micro):
            model.retain_loss(xr, yr).backward()
    model.forget_loss(xf, yf).backward()
    opt.step()


@pytest.mark.parametrize(
    "kw",
    [{}, {"granularity": "tensor"}, {"retain_weight": 0.5}, {"space": "update"}],
    ids=["global", "tensor", "retain_weight", "update"],
)
def test_closure_free_path_is_identical(kw: dict) -> None:
    a, b = make_net(), make_net()
    oa = GRUOptimizer(make_inner("adamw_foreach", a), **kw)
    ob = GRUOptimizer(make_inner("adamw_foreach", b), **kw)
    for t in range(STEPS):
        f, r = closures(a, t)
        oa.zero_grad()
        oa.step(f, r)
        _closure_free_step(ob, b, t)
        for k in ("dot", "coef", "forget_grad_norm", "retain_grad_norm"):
            assert torch.equal(oa.last_stats[k], ob.last_stats[k]), k
    assert_params_equal(a, b)
    for p, q in zip(a.parameters(), b.parameters()):
        ma, mb = oa.retain_memory(p), ob.retain_memory(q)
        assert (ma is None and mb is None) or torch.equal(ma, mb)


def test_retain_micro_batches_accumulate_in_one_pass() -> None:
    a, b = make_net(), make_net()
    oa = GRUOptimizer(make_inner("adam", a))
    ob = GRUOptimizer(make_inner("adam", b))
    for t in range(3):
        xr, yr = batch(t, "retain")
        f, _ = closures(a, t)

        def retain_twice(xr: Tensor = xr, yr: Tensor = yr) -> Tensor:
            loss = a.retain_loss(xr, yr)
            loss.backward()
            a.retain_loss(xr, yr).backward()
            return loss

        oa.zero_grad()
        oa.step(f, retain_twice)
        _closure_free_step(ob, b, t, micro=2)
    assert_params_equal(a, b)


@pytest.mark.parametrize("retain_weight", [0.0, 0.5])
def test_closures_that_zero_grad_first(retain_weight: float) -> None:
    """Closures written the torch way (``opt.zero_grad()`` first) give the same result."""
    a, b = make_net(), make_net()
    oa = GRUOptimizer(make_inner("adam", a), retain_weight=retain_weight)
    ob = GRUOptimizer(make_inner("adam", b), retain_weight=retain_weight)
    for t in range(STEPS):
        f, r = closures(a, t)
        oa.zero_grad()
        oa.step(f, r)
        f2, r2 = closures(b, t)

        def forget_z(f2=f2) -> Tensor:
            ob.zero_grad()
            return f2()

        def retain_z(r2=r2) -> Tensor:
            ob.zero_grad()
            return r2()

        ob.step(forget_z, retain_z)
    assert_params_equal(a, b)


# ----------------------------------------------------------------- plain steps
@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "adafactor"])
def test_plain_step_is_the_inner_step(name: str) -> None:
    a, b = make_net(), make_net()
    opt = GRUOptimizer(make_inner(name, a), plain_steps="allow")
    inner = make_inner(name, b)
    for t in range(3):
        xf, yf = batch(t, "forget")
        opt.zero_grad()
        inner.zero_grad()
        a.forget_loss(xf, yf).backward()
        b.forget_loss(xf, yf).backward()
        if t == 0:
            assert opt.step() is None
        else:
            opt.step(closure=None)
        inner.step()
        assert_params_equal(a, b)
    for t in range(3, 5):
        xf, yf = batch(t, "forget")

        def ca(xf: Tensor = xf, yf: Tensor = yf) -> Tensor:
            opt.zero_grad()
            loss = a.forget_loss(xf, yf)
            loss.backward()
            return loss

        def cb(xf: Tensor = xf, yf: Tensor = yf) -> Tensor:
            inner.zero_grad()
            loss = b.forget_loss(xf, yf)
            loss.backward()
            return loss

        la = opt.step(closure=ca) if t == 3 else opt.step(ca)
        lb = inner.step(cb)
        assert torch.equal(la, lb)
        assert_params_equal(a, b)
    # Plain steps never touch the memory.
    assert all(opt.retain_memory(p) is None for p in a.parameters())


def test_mixing_gru_and_plain_steps() -> None:
    model, opt, ref_model, ref = _pair("adam")
    _train(model, opt, ref_model, ref, steps=2)
    for m in (model, ref_model):
        xf, yf = batch(9, "forget")
        m.zero_grad()
        m.forget_loss(xf, yf).backward()
    with pytest.warns(PlainStepWarning, match="rectified nothing"):
        opt.step()
    ref.inner.step()
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)


def test_step_returns_the_forget_loss_and_records_both() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("sgd_momentum", model))
    f, r = closures(model, 0)
    with torch.no_grad():
        xf, yf = batch(0, "forget")
        xr, yr = batch(0, "retain")
        expected_f = model.forget_loss(xf, yf)
        expected_r = model.retain_loss(xr, yr)
    opt.zero_grad()
    loss = opt.step(f, r)
    assert torch.equal(loss.detach(), expected_f)
    assert torch.equal(opt.last_stats["forget_loss"], expected_f)
    assert torch.equal(opt.last_stats["retain_loss"], expected_r)


# ----------------------------------------------------------------- schedulers
def _sched_run(make_sched, name: str, steps: int = 6, metric: bool = False):
    model, opt, ref_model, ref = _pair(name)
    s1, s2 = make_sched(opt), make_sched(ref.inner)
    lrs = []
    for t in range(steps):
        f, r = closures(model, t)
        opt.zero_grad()
        loss = opt.step(f, r)
        ref.step(*closures(ref_model, t))
        if metric:
            s1.step(1.0)
            s2.step(1.0)
        else:
            s1.step()
            s2.step()
        lrs.append([g["lr"] for g in opt.param_groups])
        assert lrs[-1] == [g["lr"] for g in ref.inner.param_groups]
        assert opt.optimizer.param_groups is opt.param_groups
        assert isinstance(loss, Tensor)
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)
    return lrs


def test_step_lr() -> None:
    lrs = _sched_run(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5), "adam")
    assert lrs[0][0] == 1e-2 and lrs[-1][0] == pytest.approx(1e-2 / 8)


def test_one_cycle_lr() -> None:
    lrs = _sched_run(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[2e-2, 1e-2], total_steps=7),
        "adamw_foreach",
    )
    assert len({round(x[0], 12) for x in lrs}) == len(lrs)


def test_reduce_lr_on_plateau() -> None:
    lrs = _sched_run(
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
        "sgd_momentum",
        metric=True,
    )
    assert lrs[-1][0] < lrs[0][0]


# ----------------------------------------------------------------- hooks
def test_step_hooks_and_logging_from_a_post_hook() -> None:
    model, opt, ref_model, ref = _pair("adam")
    calls: list[str] = []
    logged: list[dict[str, float]] = []
    seen_before: list[Tensor] = []

    def pre(o, args, kwargs):
        assert o is opt
        calls.append("pre")
        seen_before.append(model.head.weight.detach().clone())

    def post(o, args, kwargs):
        calls.append("post")
        logged.append({k: float(v) for k, v in o.last_stats.items()})

    h1 = opt.register_step_pre_hook(pre)
    h2 = opt.register_step_post_hook(post)
    inner_calls: list[int] = []
    opt.optimizer.register_step_post_hook(lambda o, a, k: inner_calls.append(1))
    for t in range(3):
        before = model.head.weight.detach().clone()
        f, r = closures(model, t)
        opt.zero_grad()
        opt.step(f, r)
        info = ref.step(*closures(ref_model, t))
        assert torch.equal(seen_before[-1], before)
        assert logged[-1]["dot"] == pytest.approx(info["dot"], rel=1e-9)
        assert logged[-1]["skipped"] == 0.0
    assert calls == ["pre", "post"] * 3
    assert len(inner_calls) == 3
    h1.remove()
    h2.remove()
    f, r = closures(model, 3)
    opt.zero_grad()
    opt.step(f, r)
    assert len(calls) == 6 and len(logged) == 3


# ----------------------------------------------------------------- torch.optim citizenship
def test_is_an_optimizer_and_delegates() -> None:
    model = make_net()
    inner = make_inner("adam", model)
    opt = GRUOptimizer(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.optimizer is inner
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    opt.param_groups[0]["lr"] = 0.123
    assert inner.param_groups[0]["lr"] == 0.123
    # Loading a state dict replaces the inner lists; the wrapper still sees them.
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert "GRUOptimizer" in repr(opt) and "Adam" in repr(opt)


def test_add_param_group() -> None:
    model = make_net()
    ref_model = copy.deepcopy(model)

    def rest(m: nn.Module) -> list[Tensor]:
        return [
            m.head.weight,
            m.head.bias,
            m.retain_head.weight,
            m.retain_head.bias,
            m.forget_bias,
            m.unused,
        ]

    opt = GRUOptimizer(torch.optim.Adam(model.body.parameters(), lr=1e-2), granularity="group")
    ref = ReferenceGRU(torch.optim.Adam(ref_model.body.parameters(), lr=1e-2), granularity="group")
    for t in range(5):
        if t == 2:
            opt.add_param_group({"params": rest(model), "lr": 5e-3})
            ref.inner.add_param_group({"params": rest(ref_model), "lr": 5e-3})
            assert len(opt.param_groups) == 2 and opt.param_groups is opt.optimizer.param_groups
        f, r = closures(model, t)
        opt.zero_grad()
        opt.step(f, r)
        ref.step(*closures(ref_model, t))
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)
    assert opt.retain_memory(model.head.weight) is not None


def test_zero_grad() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("sgd_momentum", model))
    f, r = closures(model, 0)
    f()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert model.head.weight.grad is not None
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_zero_grad_discards_a_pending_retain_pass() -> None:
    a, b = make_net(), make_net()
    opt = GRUOptimizer(make_inner("adam", a))
    inner = make_inner("adam", b)
    xr, yr = batch(0, "retain")
    xf, yf = batch(0, "forget")
    with opt.retain_pass():
        a.retain_loss(xr, yr).backward()
    with pytest.warns(UserWarning, match="discarded a retain pass"):
        opt.zero_grad()
    a.forget_loss(xf, yf).backward()
    b.forget_loss(xf, yf).backward()
    opt.step()
    inner.step()
    assert_params_equal(a, b)


def _copy_then_train(copier, with_scheduler: bool = False) -> None:
    model, opt, _, _ = _pair("adamw_foreach", granularity="tensor")
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9) if with_scheduler else None
    for t in range(2):
        f, r = closures(model, t)
        opt.zero_grad()
        opt.step(f, r)
        if sched is not None:
            sched.step()
    model2, opt2 = copier((model, opt))
    assert isinstance(opt2, GRUOptimizer) and opt2.optimizer is not opt.optimizer
    assert opt2.param_groups[0]["params"][0] is model2.body[0].weight
    originals = {id(q) for q in model.parameters()}
    assert not any(id(p) in originals for p in model2.parameters())
    assert all(opt2.retain_memory(p) is not None for p in model2.body.parameters())
    for t in range(2, 5):
        for m, o in ((model, opt), (model2, opt2)):
            f, r = closures(m, t)
            o.zero_grad()
            o.step(f, r)
    assert_params_equal(model, model2)
    for p, q in zip(model.parameters(), model2.parameters()):
        mp, mq = opt.retain_memory(p), opt2.retain_memory(q)
        assert (mp is None and mq is None) or torch.equal(mp, mq)
    assert equal_inner(opt, opt2)


def equal_inner(a: GRUOptimizer, b: GRUOptimizer) -> bool:
    from conftest import equal_nested

    return equal_nested(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("with_scheduler", [False, True])
def test_deepcopy_then_keep_training(with_scheduler: bool) -> None:
    _copy_then_train(copy.deepcopy, with_scheduler)


@pytest.mark.parametrize("with_scheduler", [False, True])
def test_pickle_then_keep_training(with_scheduler: bool) -> None:
    _copy_then_train(lambda x: pickle.loads(pickle.dumps(x)), with_scheduler)


def test_pickled_copy_keeps_step_hooks_working() -> None:
    model, opt, _, _ = _pair("sgd_momentum")
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    calls = []
    opt2.register_step_post_hook(lambda o, a, k: calls.append(o))
    f, r = closures(model2, 0)
    opt2.zero_grad()
    opt2.step(f, r)
    assert calls == [opt2]


def test_retain_pass_then_forget_closure_in_step() -> None:
    """``step(forget_closure)`` after a retain_pass is the same as the closure pair."""
    a, b = make_net(), make_net()
    oa = GRUOptimizer(make_inner("rmsprop", a))
    ob = GRUOptimizer(make_inner("rmsprop", b))
    for t in range(3):
        f, r = closures(a, t)
        oa.zero_grad()
        la = oa.step(f, r)
        f2, r2 = closures(b, t)
        ob.zero_grad()
        with ob.retain_pass():
            r2()
        lb = ob.step(f2)
        assert torch.equal(la, lb)
    assert_params_equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rectified_gradient_left_in_grad_does_not_conflict(dtype: torch.dtype) -> None:
    """After a gradient-space step .grad holds g~ (SGD leaves it there): <g~, m> >= 0 over
    all parameters up to rounding, in low precision too, with a float32 memory."""
    model = make_net(dtype)
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=0.05))
    conflicts = 0
    for t in range(5):
        f, r = closures(model, t)
        opt.zero_grad()
        opt.step(f, r)
        conflicts += int(bool(opt.last_stats["conflict"]))
        pairs = [
            (p.grad.double(), opt.retain_memory(p))
            for p in model.parameters()
            if opt.retain_memory(p) is not None
        ]
        assert all(m.dtype == torch.float32 for _, m in pairs)
        dot = sum(float((g * m.double()).sum()) for g, m in pairs)
        gn = math.sqrt(sum(float(g.square().sum()) for g, _ in pairs))
        mn = math.sqrt(sum(float(m.double().square().sum()) for _, m in pairs))
        eps = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
        assert dot >= -eps * gn * mn
        for k, v in opt.last_stats.items():
            assert not v.is_floating_point() or bool(torch.isfinite(v)), k
    assert conflicts > 0


@pytest.mark.parametrize(
    "kw",
    [{}, {"granularity": "tensor"}, {"space": "update"}, {"retain_weight": 0.5}],
    ids=["global", "tensor", "update", "retain_weight"],
)
def test_foreach_and_per_tensor_kernels_agree(kw: dict) -> None:
    a, b = make_net(torch.float32), make_net(torch.float32)
    oa = GRUOptimizer(make_inner("adam", a), foreach=True, **kw)
    ob = GRUOptimizer(make_inner("adam", b), foreach=False, **kw)
    for t in range(3):
        for m, o in ((a, oa), (b, ob)):
            f, r = closures(m, t)
            o.zero_grad()
            o.step(f, r)
    assert_params_close(a, b, rtol=1e-6, atol=1e-7)
    for p, q in zip(a.parameters(), b.parameters()):
        mp, mq = oa.retain_memory(p), ob.retain_memory(q)
        assert (mp is None) == (mq is None)
        if mp is not None:
            torch.testing.assert_close(mp, mq, rtol=1e-6, atol=1e-8)


def test_retain_pass_handle_records_the_retain_loss() -> None:
    """The closure-free path reports the retain loss (summed over micro-batches) in
    last_stats when it is recorded on the handle; without it the entry is NaN."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(4, 3)
    opt.zero_grad()
    with opt.retain_pass() as rp:
        total = torch.zeros(())
        for chunk in x.split(2):
            loss = model(chunk).square().mean()
            loss.backward()
            rp.record(loss)
            total = total + loss.detach()
    (-model(x).sum()).backward()
    opt.step()
    assert torch.equal(opt.last_stats["retain_loss"], total)
    opt.zero_grad()
    with opt.retain_pass():
        model(x).square().mean().backward()
    (-model(x).sum()).backward()
    opt.step()
    assert torch.isnan(opt.last_stats["retain_loss"])


# ----------------------------------------------------------------- the authors' variants
@pytest.mark.parametrize("granularity", ["global", "tensor", "group"])
@pytest.mark.parametrize("threshold", [-0.5, -0.05])
def test_cos_clip_matches_float64_reference(granularity: str, threshold: float) -> None:
    model, opt, ref_model, ref = _pair("adam", granularity=granularity, cos_clip=threshold)
    for t in range(STEPS + 2):
        f, r = closures(model, t)
        opt.zero_grad()
        opt.step(f, r)
        ref.step(*closures(ref_model, t))
    assert any(h["conflict"] for h in ref.history)
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)


def test_cos_clip_is_a_partial_projection() -> None:
    """Below the threshold the result still conflicts, at exactly the threshold cosine;
    above it (and -1) cos clip is the paper's projection."""
    g = torch.tensor([-1.0, 0.2, 0.0], dtype=torch.float64)
    m = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    for threshold, expect in ((-0.5, None), (-1.0, "full")):
        p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = GRUOptimizer(torch.optim.SGD([p], lr=0.0), gamma=1.0, cos_clip=threshold)
        with opt.retain_pass():
            p.grad = m.clone()
        p.grad = g.clone()
        opt.step()
        out = p.grad
        if expect == "full":
            assert float(out @ m) == pytest.approx(0.0, abs=1e-15)
        else:
            # ||g|| ||m|| (cos - threshold) with cos(g, m) = -1 / sqrt(1.04)
            gn = float(g.norm())
            assert float(out @ m) == pytest.approx(gn * (float(g @ m) / gn - threshold))
    with pytest.raises(ValueError, match="cos_clip"):
        GRUOptimizer(
            torch.optim.SGD([nn.Parameter(torch.zeros(2))]), cos_clip=-0.5, retain_weight=0.5
        )


def _post(model: Net, t: int):
    xf, yf = batch(t, "forget", next(model.parameters()).dtype)

    def post() -> Tensor:
        # A KL-like term toward a fixed target on the forget inputs (the authors' +KL).
        logits = model.head(model.body(xf))
        loss = 2.0 * F.kl_div(
            F.log_softmax(logits, -1),
            torch.full_like(logits, 1.0 / logits.shape[-1]),
            reduction="batchmean",
        )
        loss.backward()
        return loss

    return post


@pytest.mark.parametrize(
    "kw",
    [{}, {"retain_weight": 0.5}, {"granularity": "tensor"}],
    ids=["plain", "with_retain_weight", "tensor"],
)
def test_post_rectification_closure_matches_float64_reference(kw: dict) -> None:
    model, opt, ref_model, ref = _pair("adamw_foreach", **kw)
    for t in range(STEPS):
        f, r = closures(model, t)
        opt.zero_grad()
        opt.step(f, r, _post(model, t))
        ref.step(*closures(ref_model, t), post_fn=_post(ref_model, t))
        assert torch.isfinite(opt.last_stats["post_loss"])
    assert any(h["conflict"] for h in ref.history)
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)
    # The memory keeps only the retain gradient.
    for p, q in zip(model.parameters(), ref_model.parameters()):
        m, mr = opt.retain_memory(p), ref.memory(q)
        assert (m is None) == (mr is None)
        if m is not None:
            torch.testing.assert_close(m, mr, rtol=1e-9, atol=1e-12)


def test_post_pass_in_the_closure_free_path_is_identical() -> None:
    a, b = make_net(), make_net()
    oa = GRUOptimizer(make_inner("adam", a), retain_weight=0.25)
    ob = GRUOptimizer(make_inner("adam", b), retain_weight=0.25)
    for t in range(STEPS):
        f, r = closures(a, t)
        oa.step(f, r, _post(a, t))
        xf, yf = batch(t, "forget")
        xr, yr = batch(t, "retain")
        with ob.retain_pass():
            b.retain_loss(xr, yr).backward()
        with ob.post_pass():
            _post(b, t)()
        b.forget_loss(xf, yf).backward()
        ob.step()
    assert_params_equal(a, b)


def test_post_pass_out_of_order_is_refused() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model))
    with pytest.raises(RuntimeError, match="needs a retain side first"):
        with opt.post_pass():
            pass
    with opt.retain_pass():
        model.retain_loss(*batch(0, "retain")).backward()
    model.forget_loss(*batch(0, "forget")).backward()
    with pytest.raises(RuntimeError, match="before the forget backward"):
        with opt.post_pass():
            pass


# ----------------------------------------------------------------- hyperparameters in groups
def test_hyperparameters_live_in_the_param_groups_and_can_differ_per_group() -> None:
    model = make_net()
    ref_model = copy.deepcopy(model)
    opt = GRUOptimizer(make_inner("sgd_momentum", model), gamma=0.8)
    opt.param_groups[1]["gru_gamma"] = 0.3
    opt.param_groups[1]["gru_retain_weight"] = 0.5
    sd = opt.state_dict()
    assert [g["gru_gamma"] for g in sd["param_groups"]] == [0.8, 0.3]
    with pytest.raises(ValueError, match="differs between parameter groups"):
        _ = opt.gamma
    # Per-group gamma and retain_weight: the float64 reference with two optimizers' worth
    # of groups, by hand (the memory of group 1 folds with 0.3).
    ref_inner = make_inner("sgd_momentum", ref_model)
    ref = ReferenceGRU(ref_inner, gamma=0.8)
    body = {id(p) for p in ref_model.body.parameters()}
    for t in range(3):
        f, r = closures(model, t)
        opt.zero_grad()
        opt.step(f, r)
        # The reference: fold group 0 with 0.8 and group 1 with 0.3, then project.
        params = ref.params()
        for p in params:
            p.grad = None
        closures(ref_model, t)[1]()
        g_r = {id(p): p.grad.detach().clone() for p in params if p.grad is not None}
        for p in params:
            gm = 0.8 if id(p) in body else 0.3
            if id(p) in g_r:
                ref.ema[id(p)] = gm * g_r[id(p)] + (1 - gm) * ref.ema.get(id(p), 0.0)
            elif id(p) in ref.ema:
                ref.ema[id(p)] = (1 - gm) * ref.ema[id(p)]
            p.grad = None
        closures(ref_model, t)[0]()
        from _reference import _flat, _unflat, project_flat

        members = [p for p in params if p.grad is not None or id(p) in ref.ema]
        gs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in members]
        ms = [ref.ema.get(id(p), torch.zeros_like(p)) for p in members]
        x, _, _ = project_flat(_flat(gs), _flat(ms))
        for p, v in zip(members, _unflat(x, gs)):
            w = 0.0 if id(p) in body else 0.5
            p.grad = v + w * g_r.get(id(p), torch.zeros_like(v))
        ref_inner.step()
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)


def test_a_scheduler_can_change_gamma_between_steps() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model), gamma=1.0)
    opt.step(*closures(model, 0))
    m0 = opt.retain_memory(model.head.weight).clone()
    for g in opt.param_groups:  # what a user scheduler does, like lr schedulers with "lr"
        g["gru_gamma"] = 0.5
    r_model = copy.deepcopy(model)
    opt.step(*closures(model, 1))
    _, r = closures(r_model, 1)
    r()
    want = 0.5 * r_model.head.weight.grad + 0.5 * m0
    torch.testing.assert_close(opt.retain_memory(model.head.weight), want, rtol=1e-12, atol=1e-14)


def test_an_old_checkpoint_without_the_group_keys_still_loads() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model), gamma=0.6)
    opt.step(*closures(model, 0))
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        del g["gru_gamma"], g["gru_retain_weight"]
    opt2 = GRUOptimizer(make_inner("adam", make_net()), gamma=0.6)
    opt2.load_state_dict(sd)
    assert all(g["gru_gamma"] == 0.6 for g in opt2.param_groups)
