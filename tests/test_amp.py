"""Mixed precision: GradScaler (fp16-style loss scaling) and bf16 parameters.

Loss scaling by a power of two is exact in floating point (barring overflow), so a
scaled run on fp32 tensors must give *bitwise* the weights and memory of the unscaled run
when GRU unscales each gradient exactly once; unscaling twice, or never, shows at once.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gru_optim import GRUOptimizer

INIT_SCALE = 2.0**12


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def make_batches(n: int, dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, ...]]:
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(16, 8, generator=g).to(dtype),
            torch.randint(0, 4, (16,), generator=g),
            (torch.randn(16, 8, generator=g) + 0.5).to(dtype),
            torch.randint(0, 4, (16,), generator=g),
        )
        for _ in range(n)
    ]


def make_scaler(**kw: Any) -> torch.amp.GradScaler:
    kw.setdefault("init_scale", INIT_SCALE)
    kw.setdefault("growth_interval", 2)
    return torch.amp.GradScaler("cpu", **kw)


def snapshot(model: nn.Module, opt: GRUOptimizer) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "mems": [
            None if opt.retain_memory(p) is None else opt.retain_memory(p).clone()  # type: ignore[union-attr]
            for p in model.parameters()
        ],
        "inner": copy.deepcopy(opt.optimizer.state_dict()),
    }


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def run(
    path: str,
    scaler: torch.amp.GradScaler | None,
    steps: int = 4,
    **gru: Any,
) -> tuple[nn.Module, GRUOptimizer]:
    """Train with GRU through one of the supported loop shapes, scaled or not."""
    model = make_model()
    opt = GRUOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), grad_scaler=scaler, **gru)
    scale = scaler.scale if scaler is not None else (lambda t: t)
    for i, (xf, yf, xr, yr) in enumerate(make_batches(steps)):

        def forget(xf: Tensor = xf, yf: Tensor = yf) -> Tensor:
            loss = -F.cross_entropy(model(xf), yf)
            scale(loss).backward()
            return loss

        def retain(xr: Tensor = xr, yr: Tensor = yr) -> Tensor:
            loss = F.cross_entropy(model(xr), yr)
            scale(loss).backward()
            return loss

        opt.zero_grad()
        if path == "closures":
            opt.step(forget, retain)
        elif path == "closures_scaler_step":
            # GradScaler.step needs the scale to exist: it is created by the first
            # scaler.scale() call, which happens inside the closures.
            if scaler is not None and i > 0:
                scaler.step(opt, forget, retain)  # positional closures: run, then unscaled
            else:
                opt.step(forget, retain)
        elif path in ("closure_free", "closure_free_scaler_step"):
            with opt.retain_pass():
                retain()
            forget()
            if scaler is not None and path == "closure_free_scaler_step":
                scaler.step(opt)
            else:
                opt.step()
        else:  # pragma: no cover
            raise ValueError(path)
        if scaler is not None:
            scaler.update()
    return model, opt


PATHS = ["closures", "closures_scaler_step", "closure_free", "closure_free_scaler_step"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "gru",
    [{}, {"retain_weight": 0.5}, {"space": "update"}, {"directions": 3, "retain_weight": 0.5}],
    ids=["plain", "rw", "update", "gru_k"],
)
def test_scaled_run_matches_unscaled_bitwise(path: str, gru: dict[str, Any]) -> None:
    ref_model, ref_opt = run(path, None, **gru)
    scaler = make_scaler()
    model, opt = run(path, scaler, **gru)
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt))
    # Four unskipped steps with growth_interval=2: the scale doubled twice, so update()
    # saw the inf checks of every step and none found an overflow.
    assert scaler.get_scale() == INIT_SCALE * 4
    assert not bool(opt.last_stats["skipped"])
    # The run did something: the weights moved and there was a conflict at some point.
    assert not torch.equal(next(model.parameters()), next(make_model().parameters()))


def _inject(model: nn.Module) -> None:
    next(model.parameters()).grad[0, 0] = float("inf")  # type: ignore[index]


@pytest.mark.parametrize("where", ["retain", "forget"])
@pytest.mark.parametrize("path", ["closures", "closure_free_scaler_step"])
def test_injected_overflow_skips_the_step(where: str, path: str) -> None:
    scaler = make_scaler(growth_interval=1000)
    model, opt = run(path, scaler, steps=2)
    before = snapshot(model, opt)
    scale = scaler.get_scale()
    xf, yf, xr, yr = make_batches(3)[2]

    def forget() -> Tensor:
        loss = -F.cross_entropy(model(xf), yf)
        scaler.scale(loss).backward()
        if where == "forget":
            _inject(model)
        return loss

    def retain() -> Tensor:
        loss = F.cross_entropy(model(xr), yr)
        scaler.scale(loss).backward()
        if where == "retain":
            _inject(model)
        return loss

    # What the memory becomes when the retain gradient is finite: measured without GRU.
    probe = copy.deepcopy(model)
    F.cross_entropy(probe(xr), yr).backward()
    expected_mems = [
        0.8 * q.grad + 0.2 * m
        for q, m in zip(probe.parameters(), before["mems"])  # type: ignore[operator]
    ]

    opt.zero_grad()
    if path == "closures":
        opt.step(forget, retain)
    else:
        with opt.retain_pass():
            retain()
        forget()
        scaler.step(opt)
    scaler.update()

    assert bool(opt.last_stats["skipped"])
    after = snapshot(model, opt)
    assert_same(after["params"], before["params"])
    assert_same(after["inner"], before["inner"])
    if where == "retain":
        # An overflowing retain gradient never reaches the memory.
        assert_same(after["mems"], before["mems"])
    else:
        # A finite (unscaled) retain gradient measured at the unchanged weights is kept,
        # as with skip_nonfinite (see docs/guides/amp.md).
        for m, e in zip(after["mems"], expected_mems):
            torch.testing.assert_close(m, e)
    assert scaler.get_scale() == scale / 2  # update() saw the overflow and backed off

    # The next iteration steps normally at the new scale.
    xf, yf, xr, yr = make_batches(4)[3]
    opt.zero_grad()
    opt.step(
        lambda: (scaler.scale(-F.cross_entropy(model(xf), yf)).backward(), 0)[1],
        lambda: (scaler.scale(F.cross_entropy(model(xr), yr)).backward(), 0)[1],
    )
    scaler.update()
    assert not bool(opt.last_stats["skipped"])
    assert not torch.equal(next(model.parameters()), before["params"][0])


def test_caller_unscale_for_clipping_is_not_repeated() -> None:
    def train(scaler: torch.amp.GradScaler | None) -> nn.Module:
        model = make_model()
        opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), grad_scaler=scaler)
        s = scaler.scale if scaler is not None else (lambda t: t)
        for xf, yf, xr, yr in make_batches(3):
            opt.zero_grad()
            with opt.retain_pass():
                s(F.cross_entropy(model(xr), yr)).backward()
            s(-F.cross_entropy(model(xf), yf)).backward()
            if scaler is not None:
                scaler.unscale_(opt)  # the forget gradient, to clip it
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            if scaler is not None:
                scaler.update()
        return model

    ref = train(None)
    got = train(make_scaler())
    assert_same([p.detach() for p in got.parameters()], [p.detach() for p in ref.parameters()])


def test_plain_step_with_scaler_is_a_scaled_inner_step() -> None:
    # No retain pass: GRU steps like scaler.step(inner) would, unscaling once.
    model, ref = make_model(), make_model()
    scaler = make_scaler()
    opt = GRUOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), grad_scaler=scaler, plain_steps="allow"
    )
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for xf, yf, _, _ in make_batches(3):
        opt.zero_grad()
        scaler.scale(-F.cross_entropy(model(xf), yf)).backward()
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        (-F.cross_entropy(ref(xf), yf)).backward()
        ref_opt.step()
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in ref.parameters()])
    assert scaler.get_scale() == INIT_SCALE * 2


def test_scaler_step_without_grad_scaler_raises() -> None:
    model = make_model()
    scaler = make_scaler()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))  # no grad_scaler=
    xf, yf, xr, yr = make_batches(1)[0]
    with opt.retain_pass():
        scaler.scale(F.cross_entropy(model(xr), yr)).backward()
    scaler.scale(-F.cross_entropy(model(xf), yf)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="grad_scaler="):
        scaler.step(opt)
    assert_same([p.detach() for p in model.parameters()], before)
    # The refusal leaves nothing behind: a direct step still works.
    opt.step()
    assert not torch.equal(next(model.parameters()), before[0])


def test_forgetting_scaler_update_is_a_clear_error() -> None:
    model = make_model()
    scaler = make_scaler()
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), grad_scaler=scaler)
    xf, yf, xr, yr = make_batches(1)[0]

    def forget() -> Tensor:
        loss = -F.cross_entropy(model(xf), yf)
        scaler.scale(loss).backward()
        return loss

    def retain() -> Tensor:
        loss = F.cross_entropy(model(xr), yr)
        scaler.scale(loss).backward()
        return loss

    opt.zero_grad()
    opt.step(forget, retain)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match=r"scaler\.update\(\)"):
        opt.step(forget, retain)


def test_grad_scaler_type_is_checked() -> None:
    with pytest.raises(TypeError, match="GradScaler"):
        GRUOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), grad_scaler=object())


def test_disabled_scaler_is_the_unscaled_run() -> None:
    ref_model, ref_opt = run("closures", None)
    model, opt = run("closures", torch.amp.GradScaler("cpu", enabled=False))
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt))


def test_real_fp16_autocast_overflows_are_skipped_then_training_proceeds() -> None:
    # fp16 autocast on the CPU with an absurd initial scale: the fp16 backward overflows
    # until update() has backed the scale off far enough.
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    opt = GRUOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), grad_scaler=scaler)
    skipped, retain_overflows = [], 0
    for xf, yf, xr, yr in make_batches(40):
        before = [p.detach().clone() for p in model.parameters()]
        mem_before = [opt.retain_memory(p) for p in model.parameters()]
        mem_before = [None if m is None else m.clone() for m in mem_before]

        def forget(xf: Tensor = xf, yf: Tensor = yf) -> Tensor:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = -F.cross_entropy(model(xf).float(), yf)
            scaler.scale(loss).backward()
            return loss

        def retain(xr: Tensor = xr, yr: Tensor = yr) -> Tensor:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(xr).float(), yr)
            scaler.scale(loss).backward()
            return loss

        opt.zero_grad()
        opt.step(forget, retain)
        scaler.update()
        skipped.append(bool(opt.last_stats["skipped"]))
        if skipped[-1]:
            assert_same([p.detach() for p in model.parameters()], before)
            if not torch.isfinite(opt.last_stats["retain_grad_norm"]):
                retain_overflows += 1
                assert_same([opt.retain_memory(p) for p in model.parameters()], mem_before)
    assert skipped[0] and not skipped[-1] and retain_overflows > 0
    assert scaler.get_scale() < 2.0**24
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(opt.retain_memory(p)).all() for p in model.parameters())  # type: ignore[arg-type]


def test_micro_batches_under_a_scaler_match_one_unscaled_batch() -> None:
    def train(scaler: torch.amp.GradScaler | None, micro: int) -> nn.Module:
        model = make_model()
        opt = GRUOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), grad_scaler=scaler)
        s = scaler.scale if scaler is not None else (lambda t: t)
        for xf, yf, xr, yr in make_batches(3):
            opt.zero_grad()
            with opt.retain_pass():
                for x, y in zip(xr.chunk(micro), yr.chunk(micro)):
                    s(F.cross_entropy(model(x), y) / micro).backward()
            for x, y in zip(xf.chunk(micro), yf.chunk(micro)):
                s(-F.cross_entropy(model(x), y) / micro).backward()
            opt.step()
            if scaler is not None:
                scaler.update()
        return model

    ref = train(None, 1)
    got = train(make_scaler(), 4)
    for p, q in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bf16
def _bf16_run(
    dtype: torch.dtype, autocast: bool = False, steps: int = 5
) -> tuple[nn.Module, GRUOptimizer, list[bool]]:
    model = make_model(dtype)
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    conflicts = []
    for xf, yf, xr, yr in make_batches(steps, dtype):

        def forget(xf: Tensor = xf, yf: Tensor = yf) -> Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = -F.cross_entropy(model(xf).float(), yf)
            loss.backward()
            return loss

        def retain(xr: Tensor = xr, yr: Tensor = yr) -> Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(xr).float(), yr)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(forget, retain)
        conflicts.append(bool(opt.last_stats["conflict"]))
    return model, opt, conflicts


def test_bf16_parameters_keep_an_fp32_memory_and_track_the_fp32_run() -> None:
    ref, ref_opt, ref_conflicts = _bf16_run(torch.float32)
    model, opt, conflicts = _bf16_run(torch.bfloat16)
    assert any(ref_conflicts) and conflicts == ref_conflicts
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16  # type: ignore[union-attr]
        m = opt.retain_memory(p)
        assert m is not None and m.dtype == torch.float32
        # Within bf16 rounding: a few units of bf16's 2**-8 relative precision per step.
        torch.testing.assert_close(p.float(), q, rtol=0, atol=0.02)
        torch.testing.assert_close(m, ref_opt.retain_memory(q), rtol=0, atol=0.02)
    for key in ("dot", "ema_norm", "forget_grad_norm", "coef"):
        assert opt.last_stats[key].dtype == torch.float32
        torch.testing.assert_close(
            opt.last_stats[key], ref_opt.last_stats[key], rtol=0.05, atol=1e-3
        )


def test_bf16_autocast_with_fp32_parameters_tracks_the_fp32_run() -> None:
    ref, _, ref_conflicts = _bf16_run(torch.float32)
    model, opt, conflicts = _bf16_run(torch.float32, autocast=True)
    assert conflicts == ref_conflicts
    for p, q in zip(model.parameters(), ref.parameters()):
        assert opt.retain_memory(p).dtype == torch.float32  # type: ignore[union-attr]
        torch.testing.assert_close(p, q, rtol=0, atol=0.02)
        assert not torch.equal(p, q)  # autocast really computed in bf16


def test_bf16_conflict_sign_is_decided_in_fp32() -> None:
    # Two bf16 tensors whose dot products with the memory are +1000 and -1001: the global
    # dot is -1 (a conflict). Rounded to bf16 (spacing 4 near 1000), -1001 becomes -1000
    # and a bf16 sum of the per-tensor dots says 0: no conflict. GRU accumulates in fp32.
    a = nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))
    b = nn.Parameter(torch.zeros(1001, dtype=torch.bfloat16))
    opt = GRUOptimizer(torch.optim.SGD([a, b], lr=0.0), gamma=1.0)
    with opt.retain_pass():
        (a.sum() + b.sum()).backward()  # g_r = ones: m = ones (fp32)
    (a.sum() - b.sum()).backward()  # g_u = (+ones, -ones)
    opt.step()
    per_tensor_bf16 = torch.tensor([1000.0, -1001.0]).to(torch.bfloat16)
    assert per_tensor_bf16.sum() == 0  # what a bf16 reduction would decide on
    assert opt.last_stats["dot"].item() == -1.0
    assert bool(opt.last_stats["conflict"])
    # After the projection <g~, m> = 0: g~ = g_u + (1 / 2001) * ones.
    shift = 1.0 / 2001
    torch.testing.assert_close(a.grad.float(), torch.full((1000,), 1 + shift).bfloat16().float())  # type: ignore[union-attr]
    torch.testing.assert_close(b.grad.float(), torch.full((1001,), -1 + shift).bfloat16().float())  # type: ignore[union-attr]
