"""The CPU's compiled passes (gru_optim/kernels/_native.py) beyond what test_fused.py
compares for both implementations: sizes across the threading and chunk boundaries,
results that do not depend on the number of threads, exact float64 sums over the whole
float32 range, non-finite inputs, one call per pass, and the fallback (with its warning)
where no compiler is found or the build fails, also through a compiler launcher in
``CXX``."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import gru_optim
from gru_optim import GRUOptimizer
from gru_optim.kernels import KernelFallbackWarning
from gru_optim.kernels import _dispatch as dispatch
from gru_optim.kernels import _native as NA

CHUNK = 1 << 15  # kChunk in kernels/csrc/gru_cpu.cpp
SIZES = [1, 5, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, 0, 200_003]
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float64, torch.float64),
    (torch.float32, torch.float64),
]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def library_calls(monkeypatch):
    """``start()`` records, from then on, the name of every function of the compiled
    library that runs (the CPU kernels, with Triton's interpreter off); returns the list."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def start() -> list[str]:
        lib = NA._lib()
        calls: list[str] = []

        class Count:
            def __getattr__(self, name):
                fn = getattr(lib, name)

                def run(*args):
                    calls.append(name)
                    return fn(*args)

                return run

        monkeypatch.setattr(NA, "_lib", lambda: Count())
        return calls

    return start


def _lists(gd, md, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = [torch.randn(n, generator=gen).to(gd) for n in SIZES]
    m = [torch.randn(n, generator=gen).to(md) for n in SIZES]
    return g, m


@pytest.mark.parametrize("gd,md", DTYPES)
def test_sums_are_the_float64_sums(gd, md) -> None:
    g, m = _lists(gd, md)
    got = NA.stats(g, m)
    want = torch.stack(
        [
            torch.stack(
                [
                    (a.double() * b.double()).sum(),
                    a.double().square().sum(),
                    b.double().square().sum(),
                ]
            )
            for a, b in zip(g, m)
        ]
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(NA.sum_squares(g), want[:, 1], rtol=1e-12, atol=1e-12)


def _within(x: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, cd: torch.dtype) -> None:
    """``x`` is ``exact`` (float64) up to a few roundings in the compute dtype ``cd`` (of
    terms as large as ``scale``) and one into ``x``'s dtype."""
    eps_c = torch.finfo(cd).eps
    eps_x = torch.finfo(x.dtype).eps
    err = (x.double() - exact).abs()
    bound = 3 * eps_c * scale + eps_x * exact.abs() + torch.finfo(x.dtype).tiny
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("gd,md", DTYPES)
@pytest.mark.parametrize("gamma", [0.2, 0.8, 1.0])
def test_fold_and_projection_are_the_exact_values_rounded(gd, md, gamma) -> None:
    g, m = _lists(gd, md, seed=1)
    ma = [x.clone() for x in m]
    NA.fold_(ma, g, torch.full((len(g),), gamma, dtype=torch.float64), torch.tensor(True))
    cd = torch.float64 if torch.float64 in (gd, md) else torch.float32
    w = float(torch.tensor(gamma, dtype=cd))
    for x, y, gg in zip(ma, m, g):
        y64, g64 = y.double(), gg.double()
        if gamma == 1.0:
            assert torch.equal(x, gg.to(cd).to(md))  # a copy
        else:
            _within(x, y64 + w * (g64 - y64), y64.abs() + g64.abs(), cd)
    coefs = torch.linspace(-1.5, 0.5, len(g), dtype=torch.float64)
    coefs[2] = 0.0
    ga = [x.clone() for x in g]
    NA.project_(ga, m, coefs, torch.tensor(False))
    for i, (x, y, mm) in enumerate(zip(ga, g, m)):
        c = float(coefs[i].to(cd))
        y64, m64 = y.double(), mm.double()
        _within(x, y64 - c * m64, y64.abs() + abs(c) * m64.abs(), cd)
        if i == 2:
            assert torch.equal(x, y)  # a zero coefficient leaves the tensor untouched


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_results_do_not_depend_on_the_number_of_threads(threads, n_threads) -> None:
    g, m = _lists(torch.float32, torch.float32, seed=2)
    torch.set_num_threads(1)
    ref = NA.stats(g, m)
    mref = [x.clone() for x in m]
    NA.fold_(mref, g, torch.full((len(g),), 0.3, dtype=torch.float64), torch.tensor(True))
    torch.set_num_threads(n_threads)
    assert torch.equal(NA.stats(g, m), ref)  # bitwise: fixed chunks, fixed order
    mm = [x.clone() for x in m]
    NA.fold_(mm, g, torch.full((len(g),), 0.3, dtype=torch.float64), torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(mm, mref))


def test_float32_sums_neither_overflow_nor_underflow() -> None:
    # Products of float32 values are exact in float64: tiny, huge and subnormal values sum
    # to float64 accuracy (what the foreach path needs a float64 rescue for).
    tiny = torch.finfo(torch.float32).smallest_normal * 2.0**-23
    for scale in (tiny, 1e-30, 1e-20, 1.0, 1e18, 3e38):
        g = [torch.full((CHUNK + 3,), scale), torch.tensor([scale, -scale])]
        m = [torch.full((CHUNK + 3,), scale / 2), torch.tensor([scale, scale])]
        got = NA.stats(g, m)
        want = torch.tensor(
            [
                [
                    float((a.double() * b.double()).sum()),
                    float(a.double().square().sum()),
                    float(b.double().square().sum()),
                ]
                for a, b in zip(g, m)
            ],
            dtype=torch.float64,
        )
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
        assert bool((got[:, 1] > 0).all())


def test_non_finite_inputs_give_non_finite_sums() -> None:
    for bad in (float("inf"), float("nan")):
        g = [torch.randn(CHUNK * 2 + 1), torch.randn(10)]
        g[0][CHUNK + 5] = bad
        m = [torch.randn(CHUNK * 2 + 1), torch.randn(10)]
        s = NA.stats(g, m)
        assert not bool(torch.isfinite(s[0, :2]).any()) and bool(torch.isfinite(s[1]).all())
        assert not bool(torch.isfinite(NA.sum_squares(g)[0]))


def test_one_call_per_pass_whatever_the_number_of_tensors(library_calls) -> None:
    from gru_optim.functional import ema_update_, project_, segment_stats

    calls = library_calls()
    for n in (3, 30):
        calls.clear()
        g = [torch.randn(50 + i) for i in range(n)]
        m = [torch.randn(50 + i) for i in range(n)]
        segment_stats(g, m, None, fused=True)
        ema_update_(m, g, 0.8, fused=True)
        project_(g, m, torch.zeros(n), fused=True)
        assert calls == ["gru_cpu_stats", "gru_cpu_fold", "gru_cpu_project"], calls
        calls.clear()
        ema_update_(m, g, 0.8, fused=True, sq_norms=True)  # no separate norm pass
        assert calls == ["gru_cpu_fold"], calls


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_a_step_reads_the_retain_gradient_twice_only_to_skip_a_nonfinite_one(
    library_calls, skip_nonfinite
) -> None:
    # An exact skip of a non-finite retain gradient needs its norm before the fold (two
    # passes over it); without the check, the fold's own pass gives the norm.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    ref = [p.detach().clone() for p in net.parameters()]
    opt = GRUOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), skip_nonfinite=skip_nonfinite)
    assert opt.kernels == "cpu"
    x = torch.randn(16, 6)
    calls = library_calls()
    opt.zero_grad()

    def loss(sign: float):
        def closure():
            value = sign * net(x).square().mean()
            value.backward()
            return value

        return closure

    opt.step(loss(-1.0), loss(1.0))
    retain = ["gru_cpu_sumsq", "gru_cpu_fold"] if skip_nonfinite else ["gru_cpu_fold"]
    assert calls[: len(retain)] == retain, calls
    assert calls.count("gru_cpu_sumsq") == int(skip_nonfinite), calls
    # The reported retain norm is the norm of the gradient the retain closure produced.
    net2 = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for a, b in zip(net2.parameters(), ref):
            a.copy_(b)
    net2(x).square().mean().backward()
    want = torch.sqrt(sum(p.grad.double().square().sum() for p in net2.parameters()))
    torch.testing.assert_close(
        opt.last_stats["retain_grad_norm"].double(), want, rtol=1e-6, atol=0.0
    )


def test_refuses_what_it_cannot_take() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        NA.stats([torch.randn(4, 4).t()], [torch.randn(4, 4)])
    with pytest.raises(ValueError, match="equal sizes"):
        NA.stats([torch.randn(4)], [torch.randn(5)])
    with pytest.raises(TypeError, match="floating"):
        NA.sum_squares([torch.ones(3, dtype=torch.int64)])


def test_the_build_is_cached(tmp_path, monkeypatch) -> None:
    first = NA._build(NA._compiler()[0])  # type: ignore[arg-type]
    assert first.exists() and first.name.startswith("gru_cpu-")
    mtime = first.stat().st_mtime_ns
    assert NA._build(NA._compiler()[0]) == first  # type: ignore[arg-type]
    assert first.stat().st_mtime_ns == mtime  # found, not rebuilt


def _subprocess(env_extra: dict[str, str]) -> tuple[str, str]:
    """Two default optimizers built in a fresh process (every warning shown, so that a
    second warning would show): ``(stdout, stderr)``, stdout giving the path that runs
    and the kernels' reason."""
    code = (
        "import warnings\nwarnings.simplefilter('always')\n"
        "import torch\nfrom gru_optim import GRUOptimizer\n"
        "from gru_optim.kernels import native_reason\n"
        "p = torch.nn.Parameter(torch.zeros(3))\n"
        "opt = GRUOptimizer(torch.optim.SGD([p], lr=0.1))\n"
        "GRUOptimizer(torch.optim.SGD([p], lr=0.1))\n"
        "print(opt.kernels)\nprint(native_reason())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return res.stdout, res.stderr


def _warned_once(err: str, reason: str) -> bool:
    """Whether ``err`` holds exactly one KernelFallbackWarning, and it gives ``reason``."""
    lines = [ln for ln in err.splitlines() if "KernelFallbackWarning" in ln]
    return len(lines) == 1 and reason in lines[0]


def test_without_a_compiler_the_foreach_path_runs_and_warns_once(tmp_path) -> None:
    cxx = str(tmp_path / "no-such-compiler")
    out, err = _subprocess({"CXX": cxx, "GRU_OPTIM_CACHE": str(tmp_path)})
    reason = f"the C++ compiler CXX={cxx!r} was not found"
    assert out.splitlines() == ["foreach", reason]
    assert _warned_once(err, reason), err


def test_a_missing_launcher_in_cxx_is_named(tmp_path) -> None:
    # CXX='ccache c++' is split as a shell would: the launcher is what is missing.
    cxx = "no-such-launcher-gru c++"
    out, err = _subprocess({"CXX": cxx, "GRU_OPTIM_CACHE": str(tmp_path)})
    reason = f"the compiler launcher 'no-such-launcher-gru' of CXX={cxx!r} was not found"
    assert out.splitlines() == ["foreach", reason]
    assert _warned_once(err, reason), err


def _launcher(tmp_path) -> tuple[str, object]:
    """A compiler launcher (as ccache is) that records its calls and runs the command."""
    log = tmp_path / "launcher.log"
    launcher = tmp_path / "launch"
    launcher.write_text(f'#!/bin/sh\necho "$1" >> "{log}"\nexec "$@"\n')
    launcher.chmod(0o755)
    return str(launcher), log


def test_a_launcher_in_cxx_builds_the_cpu_kernels(tmp_path) -> None:
    launcher, log = _launcher(tmp_path)
    out, err = _subprocess({"CXX": f"{launcher} c++", "GRU_OPTIM_CACHE": str(tmp_path)})
    assert out.splitlines() == ["cpu", "None"]
    assert "KernelFallbackWarning" not in err
    assert "c++" in log.read_text().split()  # type: ignore[attr-defined]
    assert list(tmp_path.glob("gru_cpu-*.so"))


def test_a_failing_build_says_why_and_the_foreach_path_runs(tmp_path) -> None:
    fake = tmp_path / "cxx"
    fake.write_text("#!/bin/sh\necho 'fake compiler: broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    launcher, _ = _launcher(tmp_path)
    for cxx in (str(fake), f"{launcher} {fake}"):
        out, err = _subprocess({"CXX": cxx, "GRU_OPTIM_CACHE": str(tmp_path)})
        kernels, reason = out.splitlines()
        assert kernels == "foreach"
        assert reason.startswith(f"the CPU kernels could not be built: {cxx} failed")
        assert "fake compiler: broken" in reason
        assert _warned_once(err, "fake compiler: broken"), err
        assert not list(tmp_path.glob("*.so"))  # nothing half-written left behind


def test_turned_off_by_the_environment_without_a_warning() -> None:
    out, err = _subprocess({"GRU_OPTIM_NATIVE": "0"})
    assert out.splitlines() == ["foreach", "the CPU kernels are turned off (GRU_OPTIM_NATIVE=0)"]
    assert "KernelFallbackWarning" not in err  # asked for: nothing to warn about


def test_the_fallback_warns_once_and_only_where_the_cpu_kernels_were_expected(
    monkeypatch,
) -> None:
    assert gru_optim.KernelFallbackWarning is KernelFallbackWarning  # exported at the top
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "native_reason", lambda: "no compiler here")
    monkeypatch.setattr(dispatch, "_WARNED", set())

    def make(**kw) -> GRUOptimizer:
        p = torch.nn.Parameter(torch.zeros(3))
        return GRUOptimizer(torch.optim.SGD([p], lr=0.1), **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Not expected: foreach asked for, or a rule without a fused form.
        for kw in ({"fused": False}, {"directions": 2}, {"space": "update"}):
            assert make(**kw).kernels == "foreach"
    with pytest.warns(KernelFallbackWarning, match="unavailable: no compiler here") as rec:
        assert make().kernels == "foreach"
    assert len(rec) == 1 and rec[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make().kernels == "foreach"  # once per process and reason


def test_default_cpu_training_runs_the_cpu_kernels_and_matches_foreach(monkeypatch) -> None:
    # A model large enough that the passes are threaded, trained by the default optimizer.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.Tanh(), torch.nn.Linear(400, 10))
    b = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.Tanh(), torch.nn.Linear(400, 10))
    b.load_state_dict(a.state_dict())
    oa = GRUOptimizer(torch.optim.AdamW(a.parameters(), lr=1e-3))
    ob = GRUOptimizer(torch.optim.AdamW(b.parameters(), lr=1e-3), fused=False)
    assert oa.kernels == "cpu" and ob.kernels == "foreach"
    ce = torch.nn.functional.cross_entropy
    conflicts = 0
    for t in range(5):
        gen = torch.Generator().manual_seed(t)
        xf, xr = torch.randn(16, 300, generator=gen), torch.randn(16, 300, generator=gen)
        yf, yr = (
            torch.randint(0, 10, (16,), generator=gen),
            torch.randint(0, 10, (16,), generator=gen),
        )
        for net, opt in ((a, oa), (b, ob)):

            def forget(net=net, xf=xf, yf=yf):
                loss = -ce(net(xf), yf)
                loss.backward()
                return loss

            def retain(net=net, xr=xr, yr=yr):
                loss = ce(net(xr), yr)
                loss.backward()
                return loss

            opt.step(forget, retain)
        conflicts += int(ob.last_stats["conflict"])
        torch.testing.assert_close(
            oa.last_stats["coef"].double(), ob.last_stats["coef"].double(), rtol=1e-4, atol=1e-7
        )
    assert conflicts > 0
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [None, False])
def test_the_folds_norms_with_one_gamma_per_group(fused) -> None:
    # Several groups, each with its own gamma (one fold call per gamma): the retain norm
    # gathered from the folds is the norm of the whole retain gradient.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    groups = [
        {"params": net[0].parameters(), "gru_gamma": 0.5},
        {"params": net[2].parameters(), "gru_gamma": 0.9},
    ]
    opt = GRUOptimizer(torch.optim.SGD(groups, lr=0.1), skip_nonfinite=False, fused=fused)
    assert [g["gru_gamma"] for g in opt.param_groups] == [0.5, 0.9]
    x = torch.randn(16, 6)

    def closure(sign: float):
        def run():
            loss = sign * net(x).square().mean()
            loss.backward()
            return loss

        return run

    for _ in range(2):
        ref = [p.detach().clone() for p in net.parameters()]
        opt.zero_grad()
        opt.step(closure(-1.0), closure(1.0))
        twin = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        with torch.no_grad():
            for a, b in zip(twin.parameters(), ref):
                a.copy_(b)
        twin(x).square().mean().backward()
        want = torch.sqrt(sum(p.grad.double().square().sum() for p in twin.parameters()))
        torch.testing.assert_close(
            opt.last_stats["retain_grad_norm"].double(), want, rtol=1e-6, atol=0.0
        )
