"""Property-based tests of the functional core (the properties of GRU_SPEC.md).

Every expected value is computed here, independently, in float64. Tolerances follow the
arithmetic: dot products accumulate in float32 (float64 for float64 inputs), results are
stored in the gradients' dtype (bfloat16 rounds to 2**-8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from gru_optim.functional import (
    conflict_coefficients,
    ema_update_,
    expand_segments,
    project_,
    rectify_,
    segment_sum,
    tensor_dots,
    tensor_sq_norms,
)

F64 = torch.float64
# (gradient dtype, memory dtype)
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp64": (torch.float64, torch.float64),
    "bf16": (torch.bfloat16, torch.float32),
}
STORE_EPS = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.bfloat16: 2.0**-7}
SLACK = 16.0


@dataclass
class Problem:
    grads: list[Tensor]
    ema: list[Tensor]
    segments: list[int] | None
    foreach: bool | None
    gdtype: torch.dtype

    @property
    def seg_slices(self) -> list[slice]:
        if self.segments is None:
            return [slice(0, len(self.grads))]
        out, i = [], 0
        for s in self.segments:
            out.append(slice(i, i + s))
            i += s
        return out

    def clone_grads(self) -> list[Tensor]:
        return [g.clone() for g in self.grads]


def acc_eps(gdtype: torch.dtype, numel: int) -> float:
    base = 2.0**-52 if gdtype == torch.float64 else 2.0**-23
    return base * max(numel, 1)


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def partitions(draw, n: int) -> list[int]:
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    bounds = [0, *cuts, n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


@st.composite
def problems(draw, kinds=("global", "tensor", "group"), dtypes=tuple(DTYPES)) -> Problem:
    n = draw(st.integers(1, 5))
    shp = [draw(shapes) for _ in range(n)]
    gdtype, mdtype = DTYPES[draw(st.sampled_from(dtypes))]
    relation = draw(
        st.sampled_from(
            ["random", "opposed", "aligned", "orthogonalish", "zero_m", "partial_zero_m", "zero_g"]
        )
    )
    seed = draw(st.integers(0, 2**31 - 1))
    sg = 10.0 ** draw(st.floats(-3, 3))
    sm = 10.0 ** draw(st.floats(-3, 3))
    gen = torch.Generator().manual_seed(seed)
    m = [torch.randn(s, generator=gen, dtype=F64) * sm for s in shp]
    noise = [torch.randn(s, generator=gen, dtype=F64) * sg for s in shp]
    a = draw(st.floats(0.1, 10.0))
    if relation == "opposed":
        g = [-a * sg / sm * mi + 0.3 * ni for mi, ni in zip(m, noise)]
    elif relation == "aligned":
        g = [a * sg / sm * mi + 0.3 * ni for mi, ni in zip(m, noise)]
    elif relation == "orthogonalish":
        g = [ni * 1e-3 + sg / sm * 1e-7 * mi for mi, ni in zip(m, noise)]
    elif relation == "zero_g":
        g = [torch.zeros(s, dtype=F64) for s in shp]
    else:
        g = noise
    if relation == "zero_m":
        m = [torch.zeros_like(mi) for mi in m]
    elif relation == "partial_zero_m":
        zero = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        m = [torch.zeros_like(mi) if z else mi for mi, z in zip(m, zero)]
    kind = draw(st.sampled_from(kinds))
    segments = None if kind == "global" else [1] * n if kind == "tensor" else draw(partitions(n))
    foreach = draw(st.sampled_from([None, True, False]))
    return Problem([x.to(gdtype) for x in g], [x.to(mdtype) for x in m], segments, foreach, gdtype)


def flat64(ts: list[Tensor]) -> Tensor:
    if not ts:
        return torch.zeros(0, dtype=F64)
    return torch.cat([t.reshape(-1).to(F64) for t in ts])


class SegmentView:
    """float64 views of one segment before and after rectification."""

    def __init__(self, prob: Problem, sl: slice, after: list[Tensor]) -> None:
        self.g = flat64(prob.grads[sl])
        self.m = flat64(prob.ema[sl])
        self.out = flat64(after[sl])
        self.numel = self.g.numel()
        self.d = float(self.g @ self.m)
        self.n = float(self.m @ self.m)
        self.gn = float(self.g.norm())
        self.mn = float(self.m.norm())
        self.eps_acc = acc_eps(prob.gdtype, self.numel)
        self.eps_st = STORE_EPS[prob.gdtype]

    def dot_tol(self) -> float:
        return SLACK * self.eps_acc * self.gn * self.mn + 1e-300


def run(prob: Problem) -> tuple[list[Tensor], object]:
    out = prob.clone_grads()
    res = rectify_(out, prob.ema, segments=prob.segments, foreach=prob.foreach)
    return out, res


# ----------------------------------------------------------------- rectify_ properties
@given(problems())
def test_rectified_gradient_does_not_conflict(prob: Problem) -> None:
    out, res = run(prob)
    for k, sl in enumerate(prob.seg_slices):
        v = SegmentView(prob, sl, out)
        after = float(v.out @ v.m)
        tol = v.dot_tol() + SLACK * v.eps_st * float(v.out.norm()) * v.mn
        assert after >= -tol, (after, tol)
        assert math.isclose(float(res.dot[k]), v.d, abs_tol=v.dot_tol())
        assert math.isclose(
            float(res.ema_sq_norm[k]), v.n, rel_tol=SLACK * v.eps_acc, abs_tol=1e-300
        )


@given(problems())
def test_no_conflict_leaves_gradient_exactly_unchanged(prob: Problem) -> None:
    out, res = run(prob)
    for k, sl in enumerate(prob.seg_slices):
        v = SegmentView(prob, sl, out)
        computed_d = float(res.dot[k])
        if computed_d >= 0 or v.d > v.dot_tol() or v.n == 0.0:
            assert float(res.coef[k]) == 0.0
            for a, b in zip(out[sl], prob.grads[sl]):
                assert torch.equal(a, b)
        else:
            assert float(res.coef[k]) < 0.0


@given(problems())
def test_matches_closed_form_and_correction_is_parallel_to_memory(prob: Problem) -> None:
    out, res = run(prob)
    for k, sl in enumerate(prob.seg_slices):
        v = SegmentView(prob, sl, out)
        c = float(res.coef[k])
        corr = v.out - v.g
        store = SLACK * v.eps_st * (v.gn + abs(c) * v.mn) * math.sqrt(max(v.numel, 1))
        # g~ - g is exactly the returned multiple of m (up to storing g~ in its dtype) ...
        assert float((corr + c * v.m).norm()) <= store + 1e-300
        # ... and that multiple is the closed form min(d, 0) / ||m||^2.
        if v.n > 0 and v.d < -v.dot_tol():
            expected = v.g - (v.d / v.n) * v.m
            tol = SLACK * v.eps_acc * v.gn + store
            assert float((v.out - expected).norm()) <= tol
        assert c <= 0.0


@given(problems())
def test_rectification_never_lengthens_the_gradient(prob: Problem) -> None:
    out, _ = run(prob)
    for sl in prob.seg_slices:
        v = SegmentView(prob, sl, out)
        assert float(v.out.norm()) <= v.gn * (1 + SLACK * (v.eps_acc + v.eps_st)) + 1e-300


@given(problems())
def test_rectifying_twice_changes_nothing(prob: Problem) -> None:
    once, _ = run(prob)
    twice = [t.clone() for t in once]
    rectify_(twice, prob.ema, segments=prob.segments, foreach=prob.foreach)
    for sl in prob.seg_slices:
        v = SegmentView(prob, sl, once)
        diff = float((flat64(twice[sl]) - v.out).norm())
        tol = SLACK * (v.eps_acc + v.eps_st) * v.gn * math.sqrt(max(v.numel, 1)) + 1e-300
        assert diff <= tol


@given(problems(), st.floats(1e-3, 1e3))
def test_invariant_to_scaling_the_memory(prob: Problem, scale: float) -> None:
    out, _ = run(prob)
    scaled = Problem(
        prob.grads, [m * scale for m in prob.ema], prob.segments, prob.foreach, prob.gdtype
    )
    out_c, _ = run(scaled)
    for sl in prob.seg_slices:
        v = SegmentView(prob, sl, out)
        diff = float((flat64(out_c[sl]) - v.out).norm())
        tol = SLACK * (v.eps_acc + v.eps_st) * v.gn * math.sqrt(max(v.numel, 1)) + 1e-300
        assert diff <= tol


@given(problems())
def test_zero_memory_projects_nothing_and_never_nans(prob: Problem) -> None:
    zero = Problem(
        prob.grads,
        [torch.zeros_like(m) for m in prob.ema],
        prob.segments,
        prob.foreach,
        prob.gdtype,
    )
    out, res = run(zero)
    for a, b in zip(out, prob.grads):
        assert torch.equal(a, b)
    assert not res.coef.isnan().any() and not res.coef.any()
    # And with any memory, finite inputs give finite outputs.
    out2, res2 = run(prob)
    assert all(torch.isfinite(t).all() for t in out2)
    assert torch.isfinite(res2.coef).all() and torch.isfinite(res2.dot).all()


@given(problems(kinds=("global", "tensor")))
def test_segments_match_separate_calls(prob: Problem) -> None:
    """Per-tensor segments are the same as rectifying each tensor on its own; one global
    segment is the same as rectifying the concatenation."""
    out, _ = run(prob)
    if prob.segments is not None:
        for i, (g, m) in enumerate(zip(prob.grads, prob.ema)):
            alone = [g.clone()]
            rectify_(alone, [m], foreach=prob.foreach)
            assert torch.equal(alone[0], out[i])
    else:
        g = flat64(prob.grads)
        m = flat64(prob.ema)
        one = [g.clone()]
        rectify_(one, [m])
        v = SegmentView(prob, slice(0, len(prob.grads)), out)
        tol = SLACK * (v.eps_acc + v.eps_st) * (v.gn + 1e-300) * math.sqrt(max(v.numel, 1))
        assert float((one[0] - v.out).norm()) <= tol + 1e-300


@given(problems(), st.integers(0, 2**31 - 1))
def test_dot_offsets_rectify_only_the_remainder(prob: Problem, seed: int) -> None:
    """With g = u + r and offsets <r, m>, the decision is on u and r stays in place."""
    gen = torch.Generator().manual_seed(seed)
    r = [torch.randn(g.shape, generator=gen, dtype=F64).to(g.dtype) for g in prob.grads]
    u = [g.to(F64) for g in prob.grads]
    total = [(a + b.to(F64)).to(prob.gdtype) for a, b in zip(u, r)]
    # The exact remainder after rounding the sum: u' = total - r.
    u_exact = [t.to(F64) - b.to(F64) for t, b in zip(total, r)]
    offsets = tensor_dots(r, prob.ema)
    res = rectify_(
        total, prob.ema, segments=prob.segments, dot_offsets=offsets, foreach=prob.foreach
    )
    ref = [x.clone() for x in u_exact]
    res_u = rectify_(ref, [m.to(F64) for m in prob.ema], segments=prob.segments)
    for k, sl in enumerate(prob.seg_slices):
        gu = flat64(u_exact[sl])
        m = flat64(prob.ema[sl])
        eps = acc_eps(prob.gdtype, gu.numel()) + STORE_EPS[prob.gdtype]
        big = float(gu.norm()) + float(flat64(r[sl]).norm())
        dtol = SLACK * eps * big * float(m.norm()) + 1e-300
        assert math.isclose(float(res.dot[k]), float(res_u.dot[k]), abs_tol=dtol)
        if abs(float(res_u.dot[k])) > dtol:
            want = flat64(ref[sl]) + flat64(r[sl])
            got = flat64(total[sl])
            assert (
                float((got - want).norm())
                <= SLACK * eps * big * math.sqrt(max(gu.numel(), 1)) + 1e-300
            )


@given(problems(dtypes=("fp32", "fp64")))
def test_all_reduce_of_sharded_partial_sums(prob: Problem) -> None:
    """Two 'ranks' each hold half of every tensor (as FSDP2 shards do); summing their
    packed partial sums gives the same rectification as the whole tensors."""
    halves = []
    for g, m in zip(prob.grads, prob.ema):
        gf, mf = g.reshape(-1), m.reshape(-1)
        h = gf.numel() // 2
        halves.append(((gf[:h].clone(), mf[:h]), (gf[h:].clone(), mf[h:])))
    packs: list[Tensor | None] = [None, None]

    def capture(rank: int):
        def fn(t: Tensor) -> None:
            packs[rank] = t.clone()

        return fn

    for rank in (0, 1):
        rectify_(
            [h[rank][0].clone() for h in halves],
            [h[rank][1] for h in halves],
            segments=prob.segments,
            all_reduce=capture(rank),
        )
    assert packs[0] is not None and packs[1] is not None
    total = packs[0] + packs[1]

    def summed(t: Tensor) -> None:
        t.copy_(total)

    for rank in (0, 1):
        rectify_(
            [h[rank][0] for h in halves],
            [h[rank][1] for h in halves],
            segments=prob.segments,
            all_reduce=summed,
            foreach=prob.foreach,
        )
    whole, _ = run(prob)
    for (a, b), w in zip(halves, whole):
        got = torch.cat([a[0], b[0]]).to(F64)
        want = w.reshape(-1).to(F64)
        tol = (
            SLACK
            * acc_eps(prob.gdtype, sum(g.numel() for g in prob.grads))
            * (float(flat64(prob.grads).norm()) + 1e-300)
        )
        assert float((got - want).norm()) <= tol * math.sqrt(max(got.numel(), 1)) + 1e-300


# ----------------------------------------------------------------- ema_update_
EMA_DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp64": (torch.float64, torch.float64),
    "bf16_grad": (torch.float32, torch.bfloat16),
    "bf16_ema": (torch.bfloat16, torch.float32),
}


@given(
    st.lists(shapes, min_size=1, max_size=5),
    st.sampled_from(sorted(EMA_DTYPES)),
    st.one_of(st.just(1.0), st.floats(1e-4, 1.0)),
    st.sampled_from([None, True, False]),
    st.integers(0, 2**31 - 1),
)
def test_ema_update_weighs_the_new_gradient(shp, combo, gamma, foreach, seed) -> None:
    mdtype, gdtype = EMA_DTYPES[combo]
    gen = torch.Generator().manual_seed(seed)
    ema = [torch.randn(s, generator=gen, dtype=F64).to(mdtype) for s in shp]
    grads = [torch.randn(s, generator=gen, dtype=F64).to(gdtype) for s in shp]
    old = [m.clone() for m in ema]
    grads_before = [g.clone() for g in grads]
    ema_update_(ema, grads, gamma, foreach=foreach)
    for m, o, g, g0 in zip(ema, old, grads, grads_before):
        assert m.dtype == mdtype and m.shape == o.shape
        assert torch.equal(g, g0)  # the gradients are only read
        want = gamma * g.to(F64) + (1.0 - gamma) * o.to(F64)
        eps = STORE_EPS[mdtype]
        tol = SLACK * eps * (g.to(F64).abs() + o.to(F64).abs()) + 1e-300
        assert ((m.to(F64) - want).abs() <= tol).all()
        if gamma == 1.0:
            assert torch.equal(m, g.to(mdtype))


def test_ema_update_gamma_one_copies_exactly_and_small_gamma_barely_moves() -> None:
    ema = [torch.full((3,), 5.0), torch.full((2, 2), -1.0, dtype=torch.float64)]
    grads = [
        torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16),
        torch.arange(4.0, dtype=torch.float64).reshape(2, 2),
    ]
    ema_update_(ema, grads, 1.0)
    assert torch.equal(ema[0], grads[0].float()) and torch.equal(ema[1], grads[1])
    ema_update_(ema, [torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=F64)], 0.25)
    torch.testing.assert_close(ema[0], torch.tensor([0.75, 1.5, 2.25]))


@pytest.mark.parametrize("gamma", [0.0, -1.0, 1.5, float("nan")])
def test_ema_update_rejects_gamma(gamma: float) -> None:
    ema = [torch.ones(2)]
    with pytest.raises(ValueError, match="gamma"):
        ema_update_(ema, [torch.zeros(2)], gamma)
    assert torch.equal(ema[0], torch.ones(2))


def test_ema_update_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError):
        ema_update_([torch.ones(2)], [torch.ones(2), torch.ones(2)], 0.5)


# ----------------------------------------------------------------- the building blocks
@given(problems())
def test_dots_and_norms_match_float64(prob: Problem) -> None:
    dots = tensor_dots(prob.grads, prob.ema)
    sq = tensor_sq_norms(prob.ema, foreach=prob.foreach)
    assert dots.dtype in (torch.float32, torch.float64) and dots.shape == (len(prob.grads),)
    for i, (g, m) in enumerate(zip(prob.grads, prob.ema)):
        g64, m64 = g.to(F64).reshape(-1), m.to(F64).reshape(-1)
        eps = SLACK * acc_eps(prob.gdtype, g64.numel())
        assert math.isclose(
            float(dots[i]), float(g64 @ m64), abs_tol=eps * float(g64.norm() * m64.norm()) + 1e-300
        )
        assert math.isclose(float(sq[i]), float(m64 @ m64), rel_tol=eps, abs_tol=1e-300)


def test_empty_lists() -> None:
    assert tensor_dots([], []).numel() == 0
    assert tensor_sq_norms([]).numel() == 0
    res = rectify_([], [])
    assert res.coef.numel() == 0
    ema_update_([], [], 0.5)
    project_([], [], torch.zeros(0))


@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=8), st.data())
def test_segment_sum_and_expand_round_trip(values, data) -> None:
    v = torch.tensor(values, dtype=F64)
    seg = data.draw(partitions(len(values)))
    sums = segment_sum(v, seg)
    assert sums.shape == (len(seg),)
    i = 0
    for k, s in enumerate(seg):
        assert math.isclose(float(sums[k]), sum(values[i : i + s]), rel_tol=1e-12, abs_tol=1e-9)
        i += s
    expanded = expand_segments(sums, seg, len(values))
    assert expanded.shape == (len(values),)
    assert [float(x) for x in expanded] == [
        float(sums[k]) for k, s in enumerate(seg) for _ in range(s)
    ]
    assert math.isclose(float(segment_sum(v, None)[0]), sum(values), rel_tol=1e-12, abs_tol=1e-9)
    assert expand_segments(segment_sum(v, None), None, len(values)).shape == (len(values),)


def test_segment_sum_rejects_bad_segments() -> None:
    with pytest.raises(ValueError, match="segments"):
        segment_sum(torch.ones(4), [1, 2])


def test_conflict_coefficients() -> None:
    dot = torch.tensor([-2.0, 3.0, -1.0, 0.0, -5.0])
    sq = torch.tensor([4.0, 4.0, 0.0, 1.0, 1e-30])
    c = conflict_coefficients(dot, sq)
    assert c.tolist() == [-0.5, 0.0, 0.0, 0.0, pytest.approx(-5e30)]
    assert not torch.isnan(conflict_coefficients(torch.zeros(3), torch.zeros(3))).any()


@given(problems(dtypes=("fp32", "fp64", "bf16")), st.booleans())
def test_project_applies_each_coefficient(prob: Problem, uniform: bool) -> None:
    n = len(prob.grads)
    coefs = torch.full((n,), -0.375) if uniform else torch.linspace(-1.0, 0.0, n)
    out = prob.clone_grads()
    project_(out, prob.ema, coefs, foreach=prob.foreach)
    for t, g, m, c in zip(out, prob.grads, prob.ema, coefs.tolist()):
        if c == 0.0:
            assert torch.equal(t, g)
        want = g.to(F64) - c * m.to(F64)
        tol = SLACK * STORE_EPS[prob.gdtype] * (g.to(F64).abs() + abs(c) * m.to(F64).abs())
        assert ((t.to(F64) - want).abs() <= tol + 1e-300).all()
        assert t.dtype == prob.gdtype


def test_project_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError):
        project_([torch.ones(2)], [torch.ones(2)], torch.zeros(2))
