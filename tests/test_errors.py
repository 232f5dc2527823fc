"""Bad input: a clear error before anything changes. Non-finite gradients: a skipped step."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _reference import ReferenceGRU
from conftest import (
    Net,
    assert_params_close,
    assert_params_equal,
    assert_unchanged,
    batch,
    closures,
    equal_nested,
    make_inner,
    make_net,
    snapshot,
)
from torch import Tensor, nn

from gru_optim import EMA_KEY, GRUOptimizer, PlainStepWarning


def _trained(name: str = "adam", steps: int = 2, **kw) -> tuple[Net, GRUOptimizer]:
    """A model and optimizer with inner state and a memory already in place."""
    model = make_net()
    opt = GRUOptimizer(make_inner(name, model), **kw)
    for t in range(steps):
        f, r = closures(model, t)
        opt.zero_grad()
        opt.step(f, r)
    return model, opt


def _no_backward(model: Net, kind: str, t: int = 5) -> Callable[[], Tensor]:
    x, y = batch(t, kind)
    fn = model.forget_loss if kind == "forget" else model.retain_loss
    return lambda: fn(x, y)


# ----------------------------------------------------------------- closures
def test_retain_closure_without_backward() -> None:
    model, opt = _trained()
    before = snapshot(model, opt)
    f, _ = closures(model, 5)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="retain closure computed no gradient"):
        opt.step(f, _no_backward(model, "retain"))
    assert_unchanged(before, model, opt)
    # Nothing is left pending: the next step is a normal GRU step.
    f, r = closures(model, 5)
    opt.zero_grad()
    opt.step(f, r)
    assert not bool(opt.last_stats["skipped"])


def test_retain_pass_without_backward() -> None:
    model, opt = _trained()
    before = snapshot(model, opt)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="no gradient was computed inside retain_pass"):
        with opt.retain_pass():
            pass
    assert_unchanged(before, model, opt)
    xf, yf = batch(5, "forget")
    model.forget_loss(xf, yf).backward()
    ref = make_net()
    ref.load_state_dict(model.state_dict())
    plain = make_inner("adam", ref)
    plain.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))
    ref.forget_loss(xf, yf).backward()
    with pytest.warns(PlainStepWarning):
        opt.step()  # no retain pass pending: the inner optimizer's plain step
    plain.step()
    assert_params_equal(model, ref)


def test_forget_closure_without_backward() -> None:
    """Weights and inner state stay as they were. The retain pass has already run at the
    unchanged weights, so (as for a non-finite forget gradient) the memory keeps it."""
    model, opt = _trained()
    twin = copy.deepcopy(model)
    ref_mem = {
        id(q): opt.retain_memory(p).detach().clone()
        for p, q in zip(model.parameters(), twin.parameters())
        if opt.retain_memory(p) is not None
    }
    before = snapshot(model, opt)
    _, r = closures(model, 5)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="no forget gradient"):
        opt.step(_no_backward(model, "forget"), r)
    after = snapshot(model, opt)
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    assert equal_nested(before["inner"], after["inner"])
    _, r2 = closures(twin, 5)
    twin.zero_grad()
    r2()
    for p, q in zip(model.parameters(), twin.parameters()):
        if id(q) in ref_mem:
            want = 0.8 * q.grad + 0.2 * ref_mem[id(q)]
            torch.testing.assert_close(opt.retain_memory(p), want, rtol=1e-12, atol=1e-15)
    # The failed step left nothing pending.
    f, r = closures(model, 6)
    opt.zero_grad()
    opt.step(f, r)
    assert not bool(opt.last_stats["skipped"])


@pytest.mark.parametrize("bad", [5, "loss", 1.5, object()])
@pytest.mark.parametrize("which", ["forget", "retain"])
def test_non_callable_closures(bad: object, which: str) -> None:
    model, opt = _trained()
    before = snapshot(model, opt)
    f, r = closures(model, 5)
    opt.zero_grad()
    with pytest.raises(TypeError, match="callable"):
        if which == "forget":
            opt.step(bad, r)  # type: ignore[arg-type]
        else:
            opt.step(f, bad)  # type: ignore[arg-type]
    assert_unchanged(before, model, opt)
    assert all(p.grad is None for p in model.parameters())  # no closure ran


# ----------------------------------------------------------------- unsupported gradients
class SparseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.out = nn.Linear(4, 3)

    def loss(self, idx: Tensor, y: Tensor, sign: float) -> Tensor:
        return sign * F.cross_entropy(self.out(self.emb(idx)), y)


@pytest.mark.parametrize("path", ["closure", "retain_pass"])
def test_sparse_gradients(path: str) -> None:
    # Supported since issue 21 (densified; exactness in test_complex_sparse.py).
    torch.manual_seed(0)
    model = SparseNet()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    idx = torch.tensor([1, 2, 3, 4])
    y = torch.tensor([0, 1, 2, 0])
    opt.zero_grad()
    if path == "closure":
        opt.step(
            lambda: model.loss(idx, y, -1.0).backward(),
            lambda: model.loss(idx, y, 1.0).backward(),
        )
    else:
        with opt.retain_pass():
            model.loss(idx, y, 1.0).backward()
        model.loss(idx, y, -1.0).backward()
        opt.step()
    assert all(opt.retain_memory(p) is not None for p in model.parameters())
    assert bool(opt.last_stats["rectified"])
    assert not model.emb.weight.grad.is_sparse  # the inner optimizer stepped a dense one
    # The plain inner step still gets the sparse gradient (SGD supports them).
    opt.zero_grad()
    model.loss(idx, y, 1.0).backward()
    assert model.emb.weight.grad is not None and model.emb.weight.grad.is_sparse
    before = model.emb.weight.detach().clone()
    with pytest.warns(PlainStepWarning):
        opt.step()
    assert not torch.equal(before, model.emb.weight)


def test_sparse_adam_is_refused() -> None:
    model = SparseNet()
    with pytest.raises(TypeError, match="SparseAdam steps only sparse gradients"):
        GRUOptimizer(torch.optim.SparseAdam(model.emb.parameters(), lr=0.1))


def test_complex_parameters() -> None:
    # Supported since issue 21 (exactness in test_complex_sparse.py).
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    v = nn.Parameter(torch.randn(3))
    opt = GRUOptimizer(torch.optim.Adam([w, v], lr=0.1))
    x = torch.randn(3, dtype=torch.complex64)

    def loss(sign: float) -> Tensor:
        return sign * ((w @ x).abs().sum() + v.square().sum())

    ws = w.detach().clone()
    opt.zero_grad()
    opt.step(lambda: loss(-1.0).backward(), lambda: loss(1.0).backward())
    assert not torch.equal(w, ws)
    memory = opt.retain_memory(w)
    assert memory is not None and memory.dtype == torch.complex64


# ----------------------------------------------------------------- construction
@pytest.mark.parametrize(
    ("gamma", "exc"),
    [
        (0, ValueError),
        (0.0, ValueError),
        (-1, ValueError),
        (1.5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("0.8", TypeError),
        (True, TypeError),
    ],
)
def test_gamma_outside_the_unit_interval(gamma: object, exc: type) -> None:
    model = make_net()
    inner = make_inner("adam", model)
    sd = copy.deepcopy(inner.state_dict())
    with pytest.raises(exc, match="gamma"):
        GRUOptimizer(inner, gamma=gamma)  # type: ignore[arg-type]
    assert equal_nested(inner.state_dict(), sd)
    assert not any(hasattr(inner, a) for a in ("_inner", "_ema"))


@pytest.mark.parametrize("gamma", [1, 1.0, 0.8, 1e-6])
def test_valid_gamma(gamma: float) -> None:
    opt = GRUOptimizer(make_inner("sgd_momentum", make_net()), gamma=gamma)
    assert opt.gamma == float(gamma)


@pytest.mark.parametrize(
    "inner",
    [
        lambda m: m,
        lambda m: list(m.parameters()),
        lambda m: torch.optim.Adam,
        lambda m: None,
        lambda m: {"params": list(m.parameters())},
    ],
    ids=["module", "param_list", "optimizer_class", "none", "dict"],
)
def test_inner_is_not_an_optimizer(inner: Callable) -> None:
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        GRUOptimizer(inner(make_net()))


def test_wrapping_twice() -> None:
    opt = GRUOptimizer(make_inner("adam", make_net()))
    with pytest.raises(TypeError, match="already a GRUOptimizer"):
        GRUOptimizer(opt)


@pytest.mark.parametrize(
    "kw",
    [
        {"granularity": "layer"},
        {"space": "param"},
        {"retain_weight": -1.0},
        {"retain_weight": float("nan")},
        {"ema_dtype": torch.int32},
        {"ema_dtype": "bf16"},
    ],
    ids=[
        "granularity",
        "space",
        "retain_weight_negative",
        "retain_weight_nan",
        "ema_dtype_int",
        "ema_dtype_str",
    ],
)
def test_other_bad_options(kw: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        GRUOptimizer(make_inner("adam", make_net()), **kw)


# ----------------------------------------------------------------- state dicts
class WiderNet(Net):
    """Same parameter count and groups as Net, other shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.body[0] = nn.Linear(6, 9, dtype=torch.float64)
        self.body[2] = nn.Linear(9, 8, dtype=torch.float64)


def _other_state_dicts() -> dict[str, dict]:
    wide = WiderNet()
    ow = GRUOptimizer(make_inner("adam", wide))
    f, r = closures(wide, 0)
    ow.step(f, r)
    one_group = make_net()
    o1 = GRUOptimizer(torch.optim.Adam(one_group.parameters(), lr=1e-2))
    f, r = closures(one_group, 0)
    o1.step(f, r)
    small = make_net()
    groups = [
        {"params": list(small.body.parameters())},
        {"params": [small.head.weight, small.head.bias]},
    ]
    os_ = GRUOptimizer(torch.optim.Adam(groups, lr=1e-2))
    plain_wide = make_inner("adam", WiderNet())
    for g in plain_wide.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    plain_wide.step()
    same = _trained()[1].state_dict()
    unknown = {"state": {**same["state"], 99: {}}, "param_groups": same["param_groups"]}
    return {
        "other_shapes": ow.state_dict(),
        "other_shapes_plain": plain_wide.state_dict(),
        "group_count": o1.state_dict(),
        "group_sizes": os_.state_dict(),
        "unknown_param": unknown,
        "not_a_state_dict": {"weights": 1},
    }


@pytest.mark.parametrize(
    "case",
    [
        "other_shapes",
        "other_shapes_plain",
        "group_count",
        "group_sizes",
        "unknown_param",
        "not_a_state_dict",
    ],
)
def test_state_dict_from_another_model(case: str) -> None:
    sd = copy.deepcopy(_other_state_dicts()[case])
    model, opt = _trained()
    before = snapshot(model, opt)
    lr_before = [g["lr"] for g in opt.param_groups]
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert_unchanged(before, model, opt)
    assert [g["lr"] for g in opt.param_groups] == lr_before
    # Still trains.
    f, r = closures(model, 3)
    opt.zero_grad()
    opt.step(f, r)
    assert not bool(opt.last_stats["skipped"])


# ----------------------------------------------------------------- retain_pass misuse
def test_retain_pass_entered_twice() -> None:
    model, opt = _trained()
    xr, yr = batch(5, "retain")
    opt.zero_grad()
    with opt.retain_pass():
        model.retain_loss(xr, yr).backward()
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="retain_pass entered twice"):
        with opt.retain_pass():
            model.retain_loss(xr, yr).backward()
    assert_unchanged(before, model, opt)
    f, r = closures(model, 5)
    with pytest.raises(RuntimeError, match="retain_closure after a retain_pass"):
        opt.step(f, r)
    assert_unchanged(before, model, opt)


def test_retain_pass_nested() -> None:
    model, opt = _trained()
    xr, yr = batch(5, "retain")
    before = snapshot(model, opt)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="retain_pass entered twice"):
        with opt.retain_pass():
            with opt.retain_pass():
                model.retain_loss(xr, yr).backward()
    assert_unchanged(before, model, opt)
    # After the error the optimizer is usable again.
    opt.zero_grad()
    with opt.retain_pass():
        model.retain_loss(xr, yr).backward()
    model.forget_loss(*batch(5, "forget")).backward()
    opt.step()
    assert not bool(opt.last_stats["skipped"])


# ----------------------------------------------------------------- non-finite gradients
def _poisoned(model: Net, kind: str, value: float, t: int) -> Callable[[], Tensor]:
    """A closure of the given kind whose gradient has ``value`` in body[0].weight."""
    x, y = batch(t, kind)
    poison = torch.zeros_like(model.body[0].weight)
    poison[0, 0] = value

    def fn() -> Tensor:
        base = model.forget_loss(x, y) if kind == "forget" else model.retain_loss(x, y)
        loss = base + (model.body[0].weight * poison).sum()
        loss.backward()
        return loss

    return fn


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("path", ["closure", "retain_pass"])
def test_non_finite_retain_gradient_skips_the_step(value: float, path: str) -> None:
    model, opt = _trained("adamw_foreach")
    twin, twin_opt = _trained("adamw_foreach")
    before = snapshot(model, opt)
    f, _ = closures(model, 5)
    bad_r = _poisoned(model, "retain", value, 5)
    opt.zero_grad()
    if path == "closure":
        opt.step(f, bad_r)
    else:
        with opt.retain_pass():
            bad_r()
        f()
        opt.step()
    assert bool(opt.last_stats["skipped"])
    assert_unchanged(before, model, opt)
    # Training continues exactly as if the bad step had never happened.
    for t in range(6, 8):
        for m, o in ((model, opt), (twin, twin_opt)):
            f, r = closures(m, t)
            o.zero_grad()
            o.step(f, r)
        assert not bool(opt.last_stats["skipped"])
    assert_params_equal(model, twin)
    for p, q in zip(model.parameters(), twin.parameters()):
        mp, mq = opt.retain_memory(p), twin_opt.retain_memory(q)
        assert (mp is None and mq is None) or torch.equal(mp, mq)


@pytest.mark.parametrize("retain_weight", [0.0, 0.5])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_forget_gradient_skips_the_step(value: float, retain_weight: float) -> None:
    model = make_net()
    ref_model = copy.deepcopy(model)
    opt = GRUOptimizer(make_inner("adam", model), retain_weight=retain_weight)
    ref = ReferenceGRU(make_inner("adam", ref_model), retain_weight=retain_weight)
    for t in range(2):
        f, r = closures(model, t)
        opt.zero_grad()
        opt.step(f, r)
        ref.step(*closures(ref_model, t))
    before = snapshot(model, opt)
    _, r = closures(model, 2)
    opt.zero_grad()
    opt.step(_poisoned(model, "forget", value, 2), r)
    assert bool(opt.last_stats["skipped"])
    after = snapshot(model, opt)
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    assert equal_nested(before["inner"], after["inner"])
    # Documented: the memory keeps this step's finite retain gradient.
    ref.fold_retain(closures(ref_model, 2)[1])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        m, mr = opt.retain_memory(p), ref.memory(q)
        assert (m is None) == (mr is None)
        if m is not None:
            torch.testing.assert_close(m, mr, rtol=1e-12, atol=1e-15)
    # Training continues normally.
    for t in range(3, 5):
        f, r = closures(model, t)
        opt.zero_grad()
        opt.step(f, r)
        ref.step(*closures(ref_model, t))
        assert not bool(opt.last_stats["skipped"])
    assert_params_close(model, ref_model, rtol=1e-9, atol=1e-11)


def test_skip_nonfinite_false_lets_values_through() -> None:
    model, opt = _trained("sgd_momentum", skip_nonfinite=False)
    _, r = closures(model, 5)
    opt.zero_grad()
    opt.step(_poisoned(model, "forget", math.inf, 5), r)
    assert not bool(opt.last_stats["skipped"])
    assert not torch.isfinite(model.body[0].weight).all()


def test_nothing_of_the_wrapper_in_inner_state_after_errors() -> None:
    model, opt = _trained()
    f, _ = closures(model, 5)
    with pytest.raises(RuntimeError):
        opt.step(f, _no_backward(model, "retain"))
    assert all(EMA_KEY not in st for st in opt.optimizer.state.values())


def test_exception_inside_retain_pass_changes_nothing() -> None:
    model, opt = _trained()
    before = snapshot(model, opt)
    xr, yr = batch(5, "retain")
    opt.zero_grad()
    with pytest.raises(KeyError, match="user error"):
        with opt.retain_pass():
            model.retain_loss(xr, yr).backward()
            raise KeyError("user error")
    assert_unchanged(before, model, opt)
    # Nothing pending, no pass left open: a new pass and step work.
    opt.zero_grad()
    with opt.retain_pass():
        model.retain_loss(xr, yr).backward()
    model.forget_loss(*batch(5, "forget")).backward()
    opt.step()
    assert not bool(opt.last_stats["skipped"])
    assert not torch.equal(before["params"][0], next(model.parameters()))
