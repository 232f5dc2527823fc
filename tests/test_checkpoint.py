"""Checkpoints: canonical format, bitwise resume, plain inner checkpoints, memory dtype."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from _reference import ReferenceGRU
from conftest import (
    OPTIMIZERS,
    Net,
    assert_params_close,
    assert_params_equal,
    batch,
    closures,
    equal_nested,
    make_inner,
    make_net,
)
from torch import Tensor, nn

from gru_optim import EMA_KEY, GRUOptimizer


def _gru_step(model: Net, opt: GRUOptimizer, t: int) -> None:
    f, r = closures(model, t)
    opt.zero_grad()
    opt.step(f, r)


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _index_of(opt: GRUOptimizer) -> dict[int, int]:
    out, i = {}, 0
    for g in opt.param_groups:
        for p in g["params"]:
            out[id(p)] = i
            i += 1
    return out


def test_state_dict_is_canonical_with_namespaced_memory() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model))
    for t in range(2):
        _gru_step(model, opt, t)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    inner_sd = opt.optimizer.state_dict()
    assert sd["param_groups"] == inner_sd["param_groups"]
    index = _index_of(opt)
    with_memory = 0
    for p in model.parameters():
        k = index[id(p)]
        m = opt.retain_memory(p)
        if m is not None:
            with_memory += 1
            assert torch.equal(sd["state"][k][EMA_KEY], m)
        elif k in sd["state"] and EMA_KEY in sd["state"][k]:
            # A parameter without memory may be listed with m_0 = 0.
            assert not sd["state"][k][EMA_KEY].any()
        # The inner optimizer's own entries are all there, untouched.
        for name, v in inner_sd["state"].get(k, {}).items():
            assert equal_nested(sd["state"][k][name], v)
    assert with_memory == sum(1 for p in model.parameters() if opt.retain_memory(p) is not None)
    assert with_memory >= 6  # body, head and retain_head weights and biases
    # The wrapper never writes into the inner optimizer's state.
    assert all(EMA_KEY not in st for st in opt.optimizer.state.values())
    assert all(EMA_KEY not in st for st in inner_sd["state"].values())


RESUME_CASES = [
    ("adam", {}),
    ("adamw_fused", {"granularity": "tensor"}),
    ("adamw_single", {"granularity": "group", "retain_weight": 0.3}),
    ("sgd_momentum", {"space": "update"}),
    ("adafactor", {}),
    ("rmsprop", {"gamma": 0.5}),
    ("adagrad", {"ema_dtype": torch.bfloat16}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "kw"), RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_is_bitwise_identical(name: str, kw: dict, dtype: torch.dtype) -> None:
    steps, k = 5, 2
    a = make_net(dtype)
    oa = GRUOptimizer(make_inner(name, a), **kw)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=2, gamma=0.5)
    for t in range(steps):
        _gru_step(a, oa, t)
        sa.step()

    b = make_net(dtype)
    ob = GRUOptimizer(make_inner(name, b), **kw)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=2, gamma=0.5)
    for t in range(k):
        _gru_step(b, ob, t)
        sb.step()
    ckpt = _roundtrip({"model": b.state_dict(), "opt": ob.state_dict(), "sched": sb.state_dict()})
    del b, ob, sb

    c = make_net(dtype, seed=123)  # different initial weights: the load must restore them
    oc = GRUOptimizer(make_inner(name, c), **kw)
    sc = torch.optim.lr_scheduler.StepLR(oc, step_size=2, gamma=0.5)
    c.load_state_dict(ckpt["model"])
    oc.load_state_dict(ckpt["opt"])
    sc.load_state_dict(ckpt["sched"])
    for t in range(k, steps):
        _gru_step(c, oc, t)
        sc.step()

    assert_params_equal(a, c)
    for p, q in zip(a.parameters(), c.parameters()):
        ma, mc = oa.retain_memory(p), oc.retain_memory(q)
        assert (ma is None) == (mc is None)
        if ma is not None:
            assert ma.dtype == mc.dtype and torch.equal(ma, mc)
    assert equal_nested(oa.optimizer.state_dict(), oc.optimizer.state_dict())
    assert equal_nested(oa.state_dict(), oc.state_dict())


def test_resume_from_a_checkpoint_taken_before_any_step() -> None:
    """Only zero memories and no inner state: the inner optimizer still initialises its
    state lazily, and training matches an uninterrupted run."""
    a, b = make_net(), make_net()
    oa = GRUOptimizer(make_inner("adam", a))
    ob = GRUOptimizer(make_inner("adam", b))
    ob.load_state_dict(_roundtrip(GRUOptimizer(make_inner("adam", make_net())).state_dict()))
    assert len(ob.optimizer.state) == 0
    assert all(ob.retain_memory(p) is None for p in b.parameters())
    for t in range(3):
        _gru_step(a, oa, t)
        _gru_step(b, ob, t)
    assert_params_equal(a, b)
    assert set(ob.optimizer.state[b.head.weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_plain_inner_checkpoint_loads_with_an_empty_memory() -> None:
    model = make_net()
    plain = make_inner("adamw_foreach", model)
    for t in range(3):
        xf, yf = batch(t, "forget")
        plain.zero_grad()
        model.forget_loss(xf, yf).backward()
        plain.step()
    ckpt = _roundtrip({"model": model.state_dict(), "opt": plain.state_dict()})

    m1, m2 = make_net(seed=5), make_net(seed=5)
    m1.load_state_dict(ckpt["model"])
    m2.load_state_dict(ckpt["model"])
    opt = GRUOptimizer(make_inner("adamw_foreach", m1))
    opt.load_state_dict(copy.deepcopy(ckpt["opt"]))
    assert all(opt.retain_memory(p) is None for p in m1.parameters())
    # GRU's hyperparameters join the parameter groups (defaults for a plain checkpoint).
    loaded = opt.optimizer.state_dict()
    for g in loaded["param_groups"]:
        assert g.pop("gru_gamma") == 0.8 and g.pop("gru_retain_weight") == 0.0
    assert equal_nested(loaded, ckpt["opt"])
    ref = ReferenceGRU(make_inner("adamw_foreach", m2))
    ref.inner.load_state_dict(copy.deepcopy(ckpt["opt"]))
    for t in range(3, 6):
        _gru_step(m1, opt, t)
        ref.step(*closures(m2, t))
    assert_params_close(m1, m2, rtol=1e-9, atol=1e-11)


def test_wrapper_checkpoint_loads_into_the_plain_optimizer() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model))
    for t in range(2):
        _gru_step(model, opt, t)
    sd = _roundtrip(opt.state_dict())
    stripped = {"state": {}, "param_groups": sd["param_groups"]}
    for k, entry in sd["state"].items():
        rest = {n: v for n, v in entry.items() if n != EMA_KEY}
        if rest:
            stripped["state"][k] = rest
    plain = make_inner("adam", copy.deepcopy(model))
    plain.load_state_dict(stripped)
    assert equal_nested(plain.state_dict(), opt.optimizer.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_memory_dtype_default(dtype: torch.dtype) -> None:
    model = make_net(dtype)
    opt = GRUOptimizer(make_inner("adam", model))
    _gru_step(model, opt, 0)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    mems = [opt.retain_memory(p) for p in model.parameters()]
    assert all(m is None or m.dtype == want for m in mems)
    sd = _roundtrip(opt.state_dict())
    opt2 = GRUOptimizer(make_inner("adam", make_net(dtype)))
    opt2.load_state_dict(sd)
    for p in opt2.optimizer.param_groups[0]["params"]:
        assert opt2.retain_memory(p).dtype == want


def test_bfloat16_memory_stays_bfloat16() -> None:
    model = make_net(torch.float32)
    opt = GRUOptimizer(make_inner("adamw_foreach", model), ema_dtype=torch.bfloat16)
    for t in range(2):
        _gru_step(model, opt, t)
    w = model.head.weight
    m = opt.retain_memory(w)
    assert m.dtype == torch.bfloat16
    sd = _roundtrip(opt.state_dict())
    k = _index_of(opt)[id(w)]
    assert sd["state"][k][EMA_KEY].dtype == torch.bfloat16

    # Into a bf16 wrapper: bf16, bitwise equal.
    m_b = make_net(torch.float32)
    ob = GRUOptimizer(make_inner("adamw_foreach", m_b), ema_dtype=torch.bfloat16)
    ob.load_state_dict(sd)
    assert ob.retain_memory(m_b.head.weight).dtype == torch.bfloat16
    assert torch.equal(ob.retain_memory(m_b.head.weight), m)
    _gru_step(m_b, ob, 2)
    assert ob.retain_memory(m_b.head.weight).dtype == torch.bfloat16

    # Into a default wrapper: float32 holding the same values.
    m_c = make_net(torch.float32)
    oc = GRUOptimizer(make_inner("adamw_foreach", m_c))
    oc.load_state_dict(sd)
    assert oc.retain_memory(m_c.head.weight).dtype == torch.float32
    assert torch.equal(oc.retain_memory(m_c.head.weight), m.float())

    # A float32 checkpoint into a bf16 wrapper is rounded to bf16.
    sd32 = _roundtrip(oc.state_dict())
    m_d = make_net(torch.float32)
    od = GRUOptimizer(make_inner("adamw_foreach", m_d), ema_dtype=torch.bfloat16)
    od.load_state_dict(sd32)
    assert od.retain_memory(m_d.head.weight).dtype == torch.bfloat16
    assert torch.equal(od.retain_memory(m_d.head.weight), m)


def test_loaded_memory_is_a_copy_and_stays_linked() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("adam", model))
    _gru_step(model, opt, 0)
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    before = opt.retain_memory(model.head.weight).clone()
    for entry in sd["state"].values():
        for v in entry.values():
            if isinstance(v, Tensor) and v.is_floating_point():
                v.add_(1.0)
    assert torch.equal(opt.retain_memory(model.head.weight), before)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state
    _gru_step(model, opt, 1)
    assert all(EMA_KEY not in st for st in opt.optimizer.state.values())


def test_load_restores_hyperparameters() -> None:
    model = make_net()
    opt = GRUOptimizer(make_inner("sgd_momentum", model))
    _gru_step(model, opt, 0)
    opt.param_groups[0]["lr"] = 0.5
    sd = _roundtrip(opt.state_dict())
    opt2 = GRUOptimizer(make_inner("sgd_momentum", make_net()))
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.5
    assert opt2.optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_round_trips(name: str) -> None:
    """Wrapper checkpoints restore the memory exactly and the inner state exactly as the
    plain optimizer's own load_state_dict would."""
    model = make_net()
    opt = GRUOptimizer(make_inner(name, model))
    _gru_step(model, opt, 0)
    sd = _roundtrip(opt.state_dict())
    m2 = make_net()
    opt2 = GRUOptimizer(make_inner(name, m2))
    opt2.load_state_dict(sd)
    plain = make_inner(name, make_net())
    plain.load_state_dict(_roundtrip(opt.optimizer.state_dict()))
    assert equal_nested(opt2.optimizer.state_dict(), plain.state_dict())
    for p, q in zip(model.parameters(), m2.parameters()):
        mp, mq = opt.retain_memory(p), opt2.retain_memory(q)
        assert (mp is None and mq is None) or torch.equal(mp, mq)


def test_resume_bitwise_with_gamma_one_and_intermittent_retain_parameter() -> None:
    """gamma = 1 and a parameter the retain loss uses only on some steps: its memory is
    exactly zero on the others, which a reloaded checkpoint reads as no memory; the live
    run must agree, or resuming would diverge (AdamW would move it on a zero gradient)."""

    def run(model: nn.Linear, extra: nn.Linear, opt: GRUOptimizer, steps: range) -> None:
        for t in steps:
            g = torch.Generator().manual_seed(t)
            x = torch.randn(8, 4, generator=g, dtype=torch.float64)

            def forget(x: Tensor = x) -> Tensor:
                loss = -model(x).square().mean()
                loss.backward()
                return loss

            def retain(x: Tensor = x, t: int = t) -> Tensor:
                out = model(x + 1)
                if t % 2 == 0:  # the extra layer joins the retain loss on even steps
                    out = out + extra(x)
                loss = out.square().mean()
                loss.backward()
                return loss

            opt.zero_grad()
            opt.step(forget, retain)

    def build() -> tuple[nn.Linear, nn.Linear, GRUOptimizer]:
        torch.manual_seed(0)
        model = nn.Linear(4, 3).double()
        extra = nn.Linear(4, 3).double()
        inner = torch.optim.AdamW([*model.parameters(), *extra.parameters()], lr=0.05)
        return model, extra, GRUOptimizer(inner, gamma=1.0)

    model_a, extra_a, opt_a = build()
    run(model_a, extra_a, opt_a, range(6))

    model_b, extra_b, opt_b = build()
    run(model_b, extra_b, opt_b, range(3))  # stops after an odd step: extra's memory is 0
    sd = _roundtrip({"m": model_b.state_dict(), "e": extra_b.state_dict(), "o": opt_b.state_dict()})
    model_c, extra_c, opt_c = build()
    model_c.load_state_dict(sd["m"])
    extra_c.load_state_dict(sd["e"])
    opt_c.load_state_dict(sd["o"])
    run(model_c, extra_c, opt_c, range(3, 6))
    for a, c in zip(
        [*model_a.parameters(), *extra_a.parameters()],
        [*model_c.parameters(), *extra_c.parameters()],
    ):
        assert torch.equal(a, c)
