"""Nothing half-changed, nothing silently ignored (issue 21 items 1-4 and 10, issue 23
item 5): constructor hyperparameters against values already in the groups, one live
wrapper per inner optimizer, refused calls that change nothing, numbers as retain
losses, and plain steps that are reported.

The numbers are checked against a float64 reference written here from the definition
(``m_t = gamma * g_r + (1 - gamma) * m_{t-1}``, projection of the forget gradient when
``<g, m> < 0``), on a float64 model stepped by SGD.
"""

from __future__ import annotations

import copy
import gc
import pickle
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from gru_optim import (
    COS_CLIP_KEY,
    EMA_KEY,
    GAMMA_KEY,
    RETAIN_WEIGHT_KEY,
    GRUOptimizer,
    PlainStepWarning,
)

LR = 0.1


def _model(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3, dtype=torch.float64)


def _data() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    xf = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64)
    return x, xf, y


def _losses(model: nn.Module) -> tuple[Any, Any]:
    x, xf, y = _data()

    def retain() -> Tensor:
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    def forget() -> Tensor:
        loss = -(model(xf) - y).square().mean()
        loss.backward()
        return loss

    return forget, retain


def _reference(steps: int, gamma: float, retain_weight: float = 0.0) -> list[Tensor]:
    """The weights after ``steps`` GRU steps of SGD(lr=LR), in float64, from scratch."""
    model = _model()
    x, xf, y = _data()
    params = list(model.parameters())
    memory: Tensor | None = None
    for _ in range(steps):
        gr = torch.autograd.grad((model(x) - y).square().mean(), params)
        gf = torch.autograd.grad(-(model(xf) - y).square().mean(), params)
        r = torch.cat([t.reshape(-1) for t in gr])
        f = torch.cat([t.reshape(-1) for t in gf])
        memory = gamma * r if memory is None else gamma * r + (1 - gamma) * memory
        d = float(f @ memory)
        if d < 0:
            f = f - d / float(memory @ memory) * memory
        f = f + retain_weight * r
        with torch.no_grad():
            i = 0
            for p in params:
                p -= LR * f[i : i + p.numel()].reshape(p.shape)
                i += p.numel()
    return [p.detach().clone() for p in params]


def _run(opt: GRUOptimizer, model: nn.Module, steps: int) -> None:
    forget, retain = _losses(model)
    for _ in range(steps):
        opt.zero_grad()
        opt.step(forget, retain)


def _gru_keys(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k.startswith("gru_")} for g in groups]


def _assert_weights(model: nn.Module, expected: list[Tensor]) -> None:
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- item 1
def test_explicit_gamma_wins_over_an_earlier_wrappers_keys() -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    first = GRUOptimizer(inner, gamma=0.8)
    del first  # dropped: re-wrapping is allowed (the garbage collector decides)
    opt = GRUOptimizer(inner, gamma=0.3)
    assert opt.gamma == 0.3
    assert all(g[GAMMA_KEY] == 0.3 for g in inner.param_groups)
    _run(opt, model, 3)
    _assert_weights(model, _reference(3, 0.3))


def test_explicit_values_win_over_a_loaded_gru_checkpoint() -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR), gamma=0.8)
    _run(opt, model, 1)
    sd = opt.state_dict()
    del opt
    # The FAQ's flow: the plain optimizer loads the GRU checkpoint (its gru_ keys too).
    plain = torch.optim.SGD(model.parameters(), lr=LR)
    plain.load_state_dict(
        {
            "state": {
                k: {n: v for n, v in e.items() if n != EMA_KEY} for k, e in sd["state"].items()
            },
            "param_groups": sd["param_groups"],
        }
    )
    assert plain.param_groups[0][GAMMA_KEY] == 0.8
    rewrapped = GRUOptimizer(plain, gamma=0.3, retain_weight=0.25)
    assert rewrapped.gamma == 0.3 and rewrapped.retain_weight == 0.25
    assert _gru_keys(plain.param_groups) == [{GAMMA_KEY: 0.3, RETAIN_WEIGHT_KEY: 0.25}]


def test_values_not_given_are_taken_from_the_groups() -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    inner.param_groups[0][GAMMA_KEY] = 0.3
    inner.param_groups[0][RETAIN_WEIGHT_KEY] = 0.5
    opt = GRUOptimizer(inner)
    assert opt.gamma == 0.3 and opt.retain_weight == 0.5
    # A group added later takes the value the existing groups agree on.
    extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt.add_param_group({"params": [extra]})
    assert _gru_keys(inner.param_groups)[1] == {GAMMA_KEY: 0.3, RETAIN_WEIGHT_KEY: 0.5}
    _run(opt, model, 2)
    _assert_weights(model, _reference(2, 0.3, retain_weight=0.5))


def test_per_group_values_are_kept_and_new_groups_get_the_default() -> None:
    a, b, c = (nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(3))
    inner = torch.optim.SGD(
        [{"params": [a], GAMMA_KEY: 0.3}, {"params": [b], GAMMA_KEY: 0.5}], lr=LR
    )
    opt = GRUOptimizer(inner, granularity="group")
    assert [g[GAMMA_KEY] for g in inner.param_groups] == [0.3, 0.5]
    opt.add_param_group({"params": [c]})
    assert inner.param_groups[2][GAMMA_KEY] == 0.8
    # Given explicitly, the value is written into every group.
    del opt
    opt = GRUOptimizer(inner, gamma=0.6, granularity="group")
    assert [g[GAMMA_KEY] for g in inner.param_groups] == [0.6, 0.6, 0.6]
    assert opt.gamma == 0.6


def test_explicit_cos_clip_wins_over_the_groups() -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    inner.param_groups[0][COS_CLIP_KEY] = -0.5
    opt = GRUOptimizer(inner, cos_clip=-0.2)
    assert inner.param_groups[0][COS_CLIP_KEY] == -0.2
    assert opt.rule.defaults() == {COS_CLIP_KEY: -0.2}


def test_a_second_live_wrapper_is_refused_and_changes_nothing() -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    opt = GRUOptimizer(inner, gamma=0.8)
    before = _gru_keys(inner.param_groups)
    with pytest.raises(RuntimeError, match="already wrapped by a GRUOptimizer that is still"):
        GRUOptimizer(inner, gamma=0.3, retain_weight=0.5)
    assert _gru_keys(inner.param_groups) == before
    # The first one is unaffected.
    _run(opt, model, 2)
    _assert_weights(model, _reference(2, 0.8))


def test_a_wrapper_kept_alive_by_a_scheduler_counts_as_live() -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    opt = GRUOptimizer(inner)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    del opt
    with pytest.raises(RuntimeError, match="del opt"):
        GRUOptimizer(inner)
    del sched
    GRUOptimizer(inner, gamma=0.5)  # nothing holds the first one any more


def test_rewrap_after_del_in_a_reference_cycle() -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    gc.disable()  # the first wrapper must still await collection when the second is built
    try:
        first = GRUOptimizer(inner, gamma=0.9)
        _run(first, model, 1)
        del first
        opt = GRUOptimizer(inner, gamma=0.3)
    finally:
        gc.enable()
    assert opt.gamma == 0.3


def test_deepcopy_and_pickle_wrap_their_own_inner_optimizer() -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR), gamma=0.8)
    _run(opt, model, 1)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.optimizer is not opt.optimizer
        with pytest.raises(RuntimeError, match="already wrapped"):
            GRUOptimizer(clone.optimizer)
        with pytest.raises(RuntimeError, match="already wrapped"):
            GRUOptimizer(opt.optimizer)


# ---------------------------------------------------------------------- item 2
def test_add_param_group_refused_between_retain_pass_and_step() -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR), gamma=0.8)
    forget, retain = _losses(model)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt.zero_grad()
    with opt.retain_pass():
        retain()
    with pytest.raises(RuntimeError, match=r"add_param_group\(\) between retain_pass"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 1
    forget()
    opt.step()
    _assert_weights(model, _reference(1, 0.8))
    opt.add_param_group({"params": [extra]})  # fine after step()
    assert len(opt.param_groups) == 2


def test_add_param_group_refused_inside_the_closures() -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR), gamma=0.8)
    forget, retain = _losses(model)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def adding_forget() -> Tensor:
        opt.add_param_group({"params": [extra]})
        return forget()  # type: ignore[no-any-return]

    opt.zero_grad()
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.step(adding_forget, retain)
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------------- item 3
def test_refused_constructor_writes_nothing() -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(ValueError, match="cos_clip"):
        GRUOptimizer(inner, gamma=0.3, cos_clip=-0.5, retain_weight=0.1)
    assert _gru_keys(inner.param_groups) == [{}]
    opt = GRUOptimizer(inner, gamma=0.8)
    assert opt.gamma == 0.8 and opt.retain_weight == 0.0
    _run(opt, model, 2)
    _assert_weights(model, _reference(2, 0.8))


def test_refused_lbfgs_with_retain_weight_is_not_refused_for_good() -> None:
    model = _model()
    inner = torch.optim.LBFGS(model.parameters(), lr=LR)
    with pytest.raises(ValueError, match="retain_weight=0"):
        GRUOptimizer(inner, retain_weight=0.5)
    assert _gru_keys(inner.param_groups) == [{}]
    opt = GRUOptimizer(inner)
    assert opt.retain_weight == 0.0


def test_invalid_values_found_in_the_groups_are_refused_before_writing() -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    inner.param_groups[0][GAMMA_KEY] = 1.5
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\].*param_groups\[0\]"):
        GRUOptimizer(inner)
    assert _gru_keys(inner.param_groups) == [{GAMMA_KEY: 1.5}]
    opt = GRUOptimizer(inner, gamma=0.5)  # an explicit value replaces it
    assert opt.gamma == 0.5


# ---------------------------------------------------------------------- item 4
@pytest.mark.parametrize(
    ("kwargs", "group", "match"),
    [
        ({}, {GAMMA_KEY: 1.5}, "gamma must be in"),
        ({}, {RETAIN_WEIGHT_KEY: -1}, "retain_weight must be in"),
        ({"cos_clip": -0.5}, {COS_CLIP_KEY: -0.2}, "share one segment"),
        ({"cos_clip": -0.5}, {RETAIN_WEIGHT_KEY: 0.5}, "cos_clip needs"),
    ],
)
def test_add_param_group_with_an_invalid_value_is_refused_atomically(
    kwargs: dict[str, Any], group: dict[str, Any], match: str
) -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR), gamma=0.8, **kwargs)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    groups_before = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [extra], **group})
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0].keys() == groups_before[0].keys()
    assert all(opt.param_groups[0][k] == v for k, v in groups_before[0].items() if k != "params")
    # Steps work, and the parameter can be added with valid values.
    forget, retain = _losses(model)
    opt.zero_grad()
    opt.step(forget, retain)
    opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 2


# ---------------------------------------------------------------------- item 10
@pytest.mark.parametrize("value", [1.5, np.float32(1.5), np.float64(1.5), 3])
def test_a_number_returned_by_the_retain_closure_is_recorded(value: Any) -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR), gamma=0.8)
    forget, retain = _losses(model)

    def numeric_retain() -> Any:
        retain()
        return value

    opt.zero_grad()
    opt.step(forget, numeric_retain)
    assert float(opt.last_stats["retain_loss"]) == float(value)
    _assert_weights(model, _reference(1, 0.8))


def test_retain_pass_accepts_numbers() -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR), gamma=0.8)
    forget, retain = _losses(model)
    opt.zero_grad()
    with opt.retain_pass(loss=1.5) as rp:
        retain()
        rp.record(2.25)
        rp.record(np.float64(0.25))
    forget()
    opt.step()
    assert float(opt.last_stats["retain_loss"]) == 4.0
    _assert_weights(model, _reference(1, 0.8))
    with pytest.raises(TypeError, match="retain_pass loss"):
        opt.retain_pass(loss="1.5").__enter__()  # type: ignore[arg-type]


# ---------------------------------------------------------------------- issue 23 item 5
def _plain(model: nn.Module, opt: GRUOptimizer) -> None:
    forget, _ = _losses(model)
    opt.zero_grad()
    forget()
    opt.step()


def test_a_plain_step_warns_once_and_is_the_inner_step() -> None:
    model, twin = _model(), _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR))
    ref = torch.optim.SGD(twin.parameters(), lr=LR)
    with pytest.warns(PlainStepWarning, match=r"retain_pass\(\)") as record:
        _plain(model, opt)
    assert record[0].filename == __file__  # it names the caller's line, not gru_optim's
    assert not bool(opt.last_stats["rectified"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _plain(model, opt)  # once per optimizer
    for _ in range(2):
        _plain(twin, ref)  # type: ignore[arg-type]
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_the_plain_step_warning_is_filterable() -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=PlainStepWarning)
        _plain(model, opt)
    assert issubclass(PlainStepWarning, UserWarning)
    fresh = _model()
    other = GRUOptimizer(torch.optim.SGD(fresh.parameters(), lr=LR))
    with pytest.warns(PlainStepWarning):
        _plain(fresh, other)


def test_plain_steps_error_raises_before_anything_changes() -> None:
    model = _model()
    opt = GRUOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), plain_steps="error"
    )
    weights = [p.detach().clone() for p in model.parameters()]
    forget, retain = _losses(model)
    opt.zero_grad()
    forget()
    with pytest.raises(RuntimeError, match="plain_steps='error'"):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert len(opt.state) == 0
    opt.zero_grad()
    opt.step(forget, retain)  # GRU steps are untouched by the option
    # SGD's first momentum step is a plain SGD step of the (rectified) gradient.
    _assert_weights(model, _reference(1, 0.8))


def test_plain_steps_allow_is_silent_and_bitwise() -> None:
    model, twin = _model(), _model()
    opt = GRUOptimizer(torch.optim.Adam(model.parameters(), lr=LR), plain_steps="allow")
    ref = torch.optim.Adam(twin.parameters(), lr=LR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            _plain(model, opt)
            _plain(twin, ref)  # type: ignore[arg-type]
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_gru_steps_with_an_empty_memory_are_not_plain_steps() -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR), plain_steps="error")
    forget, retain = _losses(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        with opt.retain_pass():  # the first step: the memory was empty before it
            retain()
        forget()
        opt.step()
        opt.zero_grad()
        opt.step(forget, retain)
    assert bool(opt.last_stats["rectified"])


def test_a_step_with_every_learning_rate_zero_is_not_reported() -> None:
    # torch.distributed.checkpoint creates the inner state this way.
    model = _model()
    opt = GRUOptimizer(torch.optim.Adam(model.parameters(), lr=0.0), plain_steps="error")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert len(opt.state) == 2


def test_plain_steps_is_validated() -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(ValueError, match="plain_steps must be one of 'warn', 'error', 'allow'"):
        GRUOptimizer(inner, plain_steps="ignore")  # type: ignore[arg-type]
    assert _gru_keys(inner.param_groups) == [{}]


def test_plain_steps_can_be_changed_and_is_validated_when_set() -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR))
    with pytest.raises(ValueError, match="plain_steps must be one of"):
        opt.plain_steps = "never"  # type: ignore[assignment]
    assert opt.plain_steps == "warn"
    opt.plain_steps = "allow"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _plain(model, opt)
    opt.plain_steps = "error"
    with pytest.raises(RuntimeError, match="got no retain gradient"):
        _plain(model, opt)


def test_an_optimizer_wrapping_a_gru_optimizer_is_not_wrapped_again() -> None:
    # A Trainer's second train() handed GRU Accelerate's wrapper around the first
    # GRUOptimizer: the outer one rectified, then the inner one took a plain step.
    from accelerate import Accelerator

    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    gru = GRUOptimizer(inner)
    accelerated = Accelerator(cpu=True).prepare_optimizer(gru)
    assert accelerated.optimizer is gru
    with pytest.raises(TypeError, match="already wraps a GRUOptimizer"):
        GRUOptimizer(accelerated)
    assert _gru_keys(inner.param_groups) == [{GAMMA_KEY: 0.8, RETAIN_WEIGHT_KEY: 0.0}]
