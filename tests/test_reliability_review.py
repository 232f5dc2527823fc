"""The independent review of issue 21's fixes (F1-F5 and a message): each defect it found,
with a test that failed before its fix.

- F1: ``add_param_group`` (and ``load_state_dict``) inside the retain closure of
  ``step(forget, retain)`` is refused there, as inside ``retain_pass()``; a retain closure
  that raises leaves nothing folded.
- F2: ``cos_clip`` follows the constructor's rule for values already in the groups: given
  (``None`` included) it wins, not given it is read from the groups' ``gru_cos_clip``; a
  ``gru_cos_clip`` the rule does not read is refused in ``add_param_group`` and
  ``load_state_dict`` before anything changes, never kept and ignored.
- F3: a complex gradient that is a lazy conjugate (a loss using ``p.conj()``) is resolved
  where sparse gradients are densified: the step is exact against a float64 reference on
  ``torch.view_as_real``.
- F4: re-wrapping by rebinding the name is refused with a message that says what to do.
- F5: a dropped ``GRUOptimizer`` is freed by reference counting (no cycle through the AMP
  boundary), and a copy's boundary is its own.
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from gru_optim import COS_CLIP_KEY, EMA_KEY, GAMMA_KEY, GRUOptimizer
from gru_optim.rules import Cone, CosClip, Projection

LR = 0.1


def _model(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3, dtype=torch.float64)


def _closures(model: nn.Module, step: int = 0) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    xf = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64)

    def forget() -> Tensor:
        loss = -(model(xf) - y).square().mean()
        loss.backward()
        return loss

    def retain() -> Tensor:
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    return forget, retain


def _flat(ts: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _reference(steps: int, gamma: float = 0.8) -> list[Tensor]:
    """The weights of ``_model()`` after ``steps`` GRU steps of SGD(lr=LR), in float64,
    from the definition (memory ``gamma g_r + (1 - gamma) m``, projection when
    ``<g, m> < 0``)."""
    model = _model()
    params = list(model.parameters())
    m: Tensor | None = None
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        xf = torch.randn(8, 4, generator=g, dtype=torch.float64)
        y = torch.randn(8, 3, generator=g, dtype=torch.float64)
        r = _flat(torch.autograd.grad((model(x) - y).square().mean(), params))
        f = _flat(torch.autograd.grad(-(model(xf) - y).square().mean(), params))
        m = gamma * r if m is None else gamma * r + (1 - gamma) * m
        d = float(f @ m)
        if d < 0:
            f = f - d / float(m @ m) * m
        with torch.no_grad():
            i = 0
            for p in params:
                p -= LR * f[i : i + p.numel()].reshape(p.shape)
                i += p.numel()
    return [p.detach().clone() for p in params]


def _assert_weights(model: nn.Module, expected: list[Tensor]) -> None:
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-12)


def _gru_keys(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k.startswith("gru_")} for g in groups]


def _wrapped_before(inner: torch.optim.Optimizer, **kwargs: Any) -> None:
    """Leave an earlier wrapper's keys in ``inner``'s groups (the wrapper dropped)."""
    first = GRUOptimizer(inner, **kwargs)
    del first
    gc.collect()


# ---------------------------------------------------------------------- F1
@pytest.mark.parametrize("call", ["add_param_group", "load_state_dict"])
def test_refused_inside_the_retain_closure_and_nothing_changes(call: str) -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR))
    forget, retain = _closures(model)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    saved = opt.state_dict()
    weights = [p.detach().clone() for p in model.parameters()]

    def retain_calling() -> Tensor:
        if call == "add_param_group":
            opt.add_param_group({"params": [extra]})
        else:
            opt.load_state_dict(saved)
        return retain()

    opt.zero_grad()
    with pytest.raises(RuntimeError, match=rf"{call}\(\) between retain_pass\(\)"):
        opt.step(forget, retain_calling)
    assert len(opt.param_groups) == 1
    assert all(opt.retain_memory(p) is None for p in model.parameters())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    opt.state_dict()  # no retain side left pending
    # The same step again, now without the refused call: exact from scratch.
    opt.zero_grad()
    opt.step(forget, retain)
    _assert_weights(model, _reference(1))
    opt.add_param_group({"params": [extra]})  # fine after the step
    assert len(opt.param_groups) == 2


def test_a_retain_closure_that_raises_leaves_nothing_folded() -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR))
    forget, retain = _closures(model)
    weights = [p.detach().clone() for p in model.parameters()]

    def failing_retain() -> Tensor:
        retain()  # its gradient is in .grad when it raises
        raise KeyError("a bug in the retain closure")

    opt.zero_grad()
    with pytest.raises(KeyError, match="a bug"):
        opt.step(forget, failing_retain)
    assert all(opt.retain_memory(p) is None for p in model.parameters())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert opt.state_dict()["state"][0][EMA_KEY].abs().sum() == 0
    # The gradient it left is stale: the next retain side clears it, the step is exact.
    opt.step(forget, retain)
    _assert_weights(model, _reference(1))


# ---------------------------------------------------------------------- F2
def _run_steps(opt: GRUOptimizer, model: nn.Module, steps: int = 3) -> None:
    """``steps`` GRU steps on the batches of :func:`_reference`."""
    for step in range(steps):
        forget, retain = _closures(model, step)
        opt.zero_grad()
        opt.step(forget, retain)


def test_cos_clip_not_given_is_read_from_the_groups() -> None:
    model, twin = _model(), _model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    _wrapped_before(inner, cos_clip=-0.3)
    opt = GRUOptimizer(inner)  # cos_clip not given: the groups' -0.3
    assert isinstance(opt.rule, CosClip) and opt.rule.threshold == -0.3
    assert inner.param_groups[0][COS_CLIP_KEY] == -0.3
    explicit = GRUOptimizer(torch.optim.SGD(twin.parameters(), lr=LR), cos_clip=-0.3)
    _run_steps(opt, model)
    _run_steps(explicit, twin)
    assert bool(opt.last_stats["rectified"])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert opt.state_dict()["param_groups"][0][COS_CLIP_KEY] == -0.3


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"cos_clip": None}, Projection),
        ({"rule": Projection()}, Projection),
        ({"directions": 2}, Cone),
    ],
)
def test_another_rule_given_wins_and_drops_the_groups_cos_clip(
    kwargs: dict[str, Any], rule: type
) -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    _wrapped_before(inner, cos_clip=-0.5)
    opt = GRUOptimizer(inner, **kwargs)
    assert type(opt.rule) is rule
    assert COS_CLIP_KEY not in inner.param_groups[0]
    assert COS_CLIP_KEY not in opt.state_dict()["param_groups"][0]
    if rule is Projection:
        _run_steps(opt, model, 2)
        _assert_weights(model, _reference(2))


def test_different_cos_clips_in_the_groups() -> None:
    a, b, c = (nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(3))
    inner = torch.optim.SGD(
        [{"params": [a], COS_CLIP_KEY: -0.2}, {"params": [b], COS_CLIP_KEY: -0.7}], lr=LR
    )
    before = copy.deepcopy(_gru_keys(inner.param_groups))
    with pytest.raises(ValueError, match="cos_clip was not given.*granularity='group'"):
        GRUOptimizer(inner)  # one global segment, two thresholds
    assert _gru_keys(inner.param_groups) == before
    opt = GRUOptimizer(inner, granularity="group")  # each group keeps its own
    assert isinstance(opt.rule, CosClip)
    assert [g[COS_CLIP_KEY] for g in inner.param_groups] == [-0.2, -0.7]
    opt.add_param_group({"params": [c]})
    assert inner.param_groups[2][COS_CLIP_KEY] == CosClip().threshold
    del opt
    GRUOptimizer(inner, cos_clip=-0.4)  # given: it wins in every group
    assert [g[COS_CLIP_KEY] for g in inner.param_groups] == [-0.4, -0.4, -0.4]


def test_invalid_cos_clip_in_the_groups_is_refused_before_writing() -> None:
    inner = torch.optim.SGD(_model().parameters(), lr=LR)
    inner.param_groups[0][COS_CLIP_KEY] = 0.5
    with pytest.raises(ValueError, match=r"cos_clip must be in \[-1, 0\].*param_groups\[0\]"):
        GRUOptimizer(inner, gamma=0.3)
    assert _gru_keys(inner.param_groups) == [{COS_CLIP_KEY: 0.5}]


def test_a_cos_clip_read_from_the_groups_names_its_origin_when_refused() -> None:
    inner = torch.optim.SGD(_model().parameters(), lr=LR)
    _wrapped_before(inner, cos_clip=-0.5)
    with pytest.raises(ValueError, match=r"retain_weight=0.*read from the parameter groups"):
        GRUOptimizer(inner, retain_weight=0.5)
    opt = GRUOptimizer(inner, retain_weight=0.5, cos_clip=None)
    assert opt.retain_weight == 0.5 and isinstance(opt.rule, Projection)


@pytest.mark.parametrize("kwargs", [{}, {"directions": 2}])
def test_add_param_group_with_a_cos_clip_the_rule_does_not_read_is_refused(
    kwargs: dict[str, Any],
) -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR), **kwargs)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    groups = copy.deepcopy(_gru_keys(opt.param_groups))
    with pytest.raises(ValueError, match=r"'gru_cos_clip', which this GRUOptimizer's rule"):
        opt.add_param_group({"params": [extra], COS_CLIP_KEY: -0.3})
    assert len(opt.param_groups) == 1 and _gru_keys(opt.param_groups) == groups
    opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 2 and COS_CLIP_KEY not in opt.param_groups[1]


def test_loading_a_cos_clip_checkpoint_into_an_optimizer_without_cos_clip_is_refused() -> None:
    model = _model()
    saver = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR), cos_clip=-0.5)
    _run_steps(saver, model, 1)
    sd = copy.deepcopy(saver.state_dict())
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR))
    groups = copy.deepcopy(_gru_keys(opt.param_groups))
    with pytest.raises(ValueError, match=r"has gru_cos_clip=-0.5.*cos_clip=-0.5 to resume"):
        opt.load_state_dict(sd)
    assert _gru_keys(opt.param_groups) == groups
    assert all(opt.retain_memory(p) is None for p in model.parameters())
    resumed = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR), cos_clip=-0.5)
    resumed.load_state_dict(sd)
    assert resumed.param_groups[0][COS_CLIP_KEY] == -0.5
    for p in model.parameters():
        assert torch.equal(resumed.retain_memory(p), saver.retain_memory(p))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- F3
def _conj_losses(
    p: Tensor, step: int
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """Losses whose gradients are lazy conjugates (``p.conj()``): the forget one conflicts
    with the retain one."""
    g = torch.Generator().manual_seed(step)
    cr = torch.randn(5, dtype=torch.complex128, generator=g)
    cf = -cr + 0.5 * torch.randn(5, dtype=torch.complex128, generator=g)

    def retain(w: Tensor) -> Tensor:
        return (w.conj() * cr).real.sum()

    def forget(w: Tensor) -> Tensor:
        return (w.conj() * cf).real.sum()

    return forget, retain


def _conj_reference(p0: Tensor, steps: int, gamma: float, retain_weight: float) -> Tensor:
    """The float64 reference on the real view: gradients of the same losses taken with
    respect to ``view_as_real(p)``, projected against the memory, stepped by SGD."""
    w = torch.view_as_real(p0.detach().clone()).clone()
    m = torch.zeros(w.numel(), dtype=torch.float64)
    conflicts = 0
    for step in range(steps):
        forget, retain = _conj_losses(p0, step)
        wr = w.clone().requires_grad_(True)
        (r,) = torch.autograd.grad(retain(torch.view_as_complex(wr)), wr)
        (f,) = torch.autograd.grad(forget(torch.view_as_complex(wr)), wr)
        r, f = r.reshape(-1), f.reshape(-1)
        m = gamma * r + (1 - gamma) * m
        d = float(f @ m)
        if d < 0:
            conflicts += 1
            f = f - d / float(m @ m) * m
        w = w - LR * (f + retain_weight * r).reshape(w.shape)
    assert conflicts > 0  # the projection is exercised
    return w


@pytest.mark.parametrize("retain_weight", [0.0, 0.5])
@pytest.mark.parametrize("path", ["closures", "retain_pass"])
def test_a_lazily_conjugated_complex_gradient_is_exact(path: str, retain_weight: float) -> None:
    torch.manual_seed(0)
    p0 = torch.randn(5, dtype=torch.complex128)
    p = nn.Parameter(p0.clone())
    opt = GRUOptimizer(torch.optim.SGD([p], lr=LR), gamma=0.8, retain_weight=retain_weight)
    seen: list[bool] = []
    steps = 4
    for step in range(steps):
        forget_loss, retain_loss = _conj_losses(p0, step)

        def forget(forget_loss: Callable[[Tensor], Tensor] = forget_loss) -> Tensor:
            loss = forget_loss(p)
            loss.backward()
            seen.append(p.grad is not None and p.grad.is_conj())
            return loss

        def retain(retain_loss: Callable[[Tensor], Tensor] = retain_loss) -> Tensor:
            loss = retain_loss(p)
            loss.backward()
            seen.append(p.grad is not None and p.grad.is_conj())
            return loss

        opt.zero_grad()
        if path == "closures":
            opt.step(forget, retain)
        else:
            with opt.retain_pass():
                retain()
            forget()
            opt.step()
    # The gradients were lazy conjugates (the forget one onto a kept retain part is not).
    assert seen[0] and (seen[1] or retain_weight != 0.0)
    expected = _conj_reference(p0, steps, 0.8, retain_weight)
    torch.testing.assert_close(torch.view_as_real(p.detach()), expected, rtol=1e-12, atol=1e-12)
    memory = opt.retain_memory(p)
    assert memory is not None and memory.is_complex() and not memory.is_conj()


# ---------------------------------------------------------------------- F4
def test_rebinding_the_name_is_refused_with_a_message_that_says_what_to_do() -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    opt = GRUOptimizer(inner, gamma=0.5)
    with pytest.raises(RuntimeError) as refused:
        opt = GRUOptimizer(inner, gamma=0.8)  # re-running a notebook cell
    message = str(refused.value)
    assert "del opt" in message and "opt.gamma = " in message
    assert "still bound to `opt` while the second is built" in message
    assert all(g[GAMMA_KEY] == 0.5 for g in inner.param_groups)  # the refusal wrote nothing
    opt.gamma = 0.8  # the fix it names: change it in place
    assert all(g[GAMMA_KEY] == 0.8 for g in inner.param_groups)
    _run_steps(opt, model, 2)
    _assert_weights(model, _reference(2, gamma=0.8))
    del opt  # the other fix it names: drop it, then wrap again
    assert GRUOptimizer(inner, gamma=0.3).gamma == 0.3


# ---------------------------------------------------------------------- F5
def _scaled_run(opt: GRUOptimizer, model: nn.Module, scaler: Any, steps: int) -> None:
    """``steps`` GRU steps, the losses scaled by ``scaler`` (``None``: unscaled)."""
    for step in range(steps):
        if scaler is None:
            forget, retain = _closures(model, step)
            opt.zero_grad()
            opt.step(forget, retain)
            continue
        forget, retain = _scaled_pair(model, step, scaler)
        opt.zero_grad()
        opt.step(forget, retain)
        scaler.update()


def _scaled_pair(
    model: nn.Module, step: int, scaler: Any
) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    xf = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64)

    def forget() -> Tensor:
        loss = -(model(xf) - y).square().mean()
        scaler.scale(loss).backward()
        return loss

    def retain() -> Tensor:
        loss = (model(x) - y).square().mean()
        scaler.scale(loss).backward()
        return loss

    return forget, retain


@pytest.mark.parametrize("scaled", [False, True])
def test_a_dropped_optimizer_is_freed_by_reference_counting(scaled: bool) -> None:
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaled else None
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR), grad_scaler=scaler)
    _scaled_run(opt, model, scaler, 2)
    gc.collect()
    gc.disable()
    try:
        memory = weakref.ref(opt.retain_memory(model.weight))  # type: ignore[arg-type]
        dropped = weakref.ref(opt)
        del opt
        assert dropped() is None
        assert memory() is None  # the parameter-sized memory is freed at once
    finally:
        gc.enable()


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_a_copy_unscales_its_own_gradients(clone: Callable[[Any], Any]) -> None:
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR), grad_scaler=scaler)
    _scaled_run(opt, model, scaler, 1)
    twin = clone(opt)
    # The copy steps its own copy of the parameters with its own copy of the scaler.
    twin_params = twin.param_groups[0]["params"]
    twin_model = nn.Linear(4, 3, dtype=torch.float64)
    twin_model.weight, twin_model.bias = twin_params[0], twin_params[1]
    _scaled_run(opt, model, scaler, 2)
    _scaled_run(twin, twin_model, twin.grad_scaler, 2)
    for p, q in zip(model.parameters(), twin_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ---------------------------------------------------------------------- the message
def test_a_retain_pass_loss_of_the_wrong_type_is_named_as_an_argument() -> None:
    model = _model()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=LR))
    with pytest.raises(TypeError, match=r"the retain_pass loss is a ndarray; it must be the loss"):
        with opt.retain_pass(loss=np.array(6.5)):  # type: ignore[arg-type]
            pass
    opt.state_dict()  # nothing pending
    with opt.retain_pass(loss=float(np.array(6.5))):
        _closures(model)[1]()
    _closures(model)[0]()
    opt.step()
    assert float(opt.last_stats["retain_loss"]) == 6.5
