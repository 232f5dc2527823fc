"""Smoke tests of benchmarks/: the quick modes run, their outputs are well formed, and the
baselines compute the same rectified gradient as the library (so the timing comparison
is like for like). No assertion is about speed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402
import bench_e2e  # noqa: E402
import bench_memory  # noqa: E402
import bench_scaling  # noqa: E402
import bench_step  # noqa: E402
import gpu_check  # noqa: E402
from baselines import PCGradStyle, ReferenceStyleGRU  # noqa: E402

from gru_optim import GRUOptimizer  # noqa: E402

SMALL = C.ModelShape("smoke", d=16, layers=1, vocab=64, ctx=8)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _finite_positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_shapes_are_transformer_shaped():
    s = C.SHAPES["30M"]
    assert 25e6 < s.numel < 35e6
    assert s.n_tensors == 100
    assert len({n for n, _ in s.shapes()}) == s.n_tensors


def test_bench_step_quick_writes_table_and_json(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU kernels, where built
    payload = bench_step.main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_step.json").read_text())
    assert data["shape"]["numel"] == C.TINY.numel
    for m in ("gru", "gru_core", "adamw", "reference", "pcgrad", "copy"):
        assert _finite_positive(data["methods"][m]["median_s"]), m
        assert len(data["methods"][m]["samples_s"]) == 1
    # the GRU vs reference comparison is computed, and the projection ran
    assert _finite_positive(data["ratios"]["reference_over_gru"])
    assert data["ratios"]["gru_over_reference"] == pytest.approx(
        1 / data["ratios"]["reference_over_gru"]
    )
    assert data["conflict_every_step"] == {
        "gru": True,
        "gru_nocheck": True,
        "gru_foreach": True,
        "gru_k2": True,
        "gru_k4": True,
        "gru_k8": True,
        "gru_core": True,
        "reference": True,
    }
    from gru_optim.kernels import native_reason

    assert data["gru_kernels"] == ("cpu" if native_reason() is None else "foreach")
    b = data["bandwidth"]
    assert b["gru_min_bytes"] == 36 * C.TINY.numel  # the fused kernels' traffic, fp32
    assert _finite_positive(b["triad_bandwidth_GBps"]) and _finite_positive(b["gru_over_bound"])
    assert _finite_positive(b["adamw_fused_bandwidth_GBps"])
    assert b["gru_nocheck_bytes_per_param_actual"] == 32  # no retain norm pass
    assert _finite_positive(data["ratios"]["gru_nocheck_over_adamw_fused"])
    md = (tmp_path / "bench_step.md").read_text()
    assert "| GRU wrapper (own work) |" in md and "reference-style GRU" in md
    if data["gru_kernels"] == "cpu":  # each pass of the CPU kernels alone
        passes = data["cpu_passes"]["passes"]
        assert set(passes) == {"sum_squares", "fold", "stats", "project", "adamw_fused"}
        for v in passes.values():
            assert _finite_positive(v["warm"]["GBps"]) and _finite_positive(
                v["after_write"]["GBps"]
            )
        gru = [v["bytes_per_param"] for k, v in passes.items() if k != "adamw_fused"]
        assert sum(gru) == 36
        assert "| fold: read g and m, write m |" in md
    assert payload["env"]["torch_threads"] >= 1


def test_baselines_rectify_like_the_library():
    torch.manual_seed(0)
    shapes = SMALL.shapes()
    retain = [torch.randn(s, dtype=torch.float64) for _, s in shapes]
    forget = [-r + 0.3 * torch.randn_like(r) for r in retain]
    results = []
    for kind in ("gru", "reference", "pcgrad"):
        params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for _, s in shapes]
        for p in params:
            p.grad = torch.zeros_like(p)
        if kind == "gru":
            opt = GRUOptimizer(bench_step._NoOpOptimizer(params), gamma=0.8)
        elif kind == "reference":
            impl = ReferenceStyleGRU([(n, p) for (n, _), p in zip(shapes, params)], 0.8)
        else:
            impl = PCGradStyle(params, 0.8)
        for _ in range(2):  # two steps: the memory is a real average
            if kind == "gru":
                with opt.retain_pass():
                    C.store_grads(params, retain)
                C.store_grads(params, forget)
                opt.step()
            else:
                torch._foreach_copy_([p.grad for p in params], retain)
                impl.post_retain()
                assert all(float(p.grad.abs().sum()) == 0 for p in params)
                torch._foreach_copy_([p.grad for p in params], forget)
                impl.post_forget()
        results.append(torch.cat([p.grad.reshape(-1) for p in params]))
    flat_f = torch.cat([f.reshape(-1) for f in forget])
    assert not torch.allclose(results[0], flat_f)  # it did project
    # PCGrad-style keeps a float32 memory; the reference projects in float64
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(results[2], results[0], rtol=1e-5, atol=1e-5)


def test_bench_scaling_quick_writes_plot(tmp_path):
    payload = bench_scaling.main(["--sizes", "tiny", "--out", str(tmp_path)])
    assert [c["shape"]["name"] for c in payload["cases"]] == ["tiny"]
    assert (tmp_path / "bench_scaling.png").stat().st_size > 1000
    data = json.loads((tmp_path / "bench_scaling.json").read_text())
    assert "reference_over_gru" in data["cases"][0]["ratios"]
    g = bench_scaling.growth(
        {
            "cases": [
                {"shape": {"numel": n}, "methods": {"x": {"median_s": 2e-9 * n}}}
                for n in (1e6, 1e7)
            ]
        }
    )
    assert g["x"] == pytest.approx(1.0)


def test_memory_accounting():
    params = C.make_params(SMALL)
    for dtype, want in ((None, 1.0), (torch.bfloat16, 0.5)):
        opt = GRUOptimizer(bench_step._NoOpOptimizer(params), ema_dtype=dtype)
        with opt.retain_pass():
            for p in params:
                p.grad = torch.randn_like(p) + 1.0
        for p in params:  # the forget gradient (GRU left .grad None), conflicting
            p.grad = torch.full_like(p, -2.0)
        opt.step()
        assert bool(opt.last_stats["conflict"])
        got = bench_memory.persistent_bytes(opt, params)
        assert got["ema_per_param_byte"] == want
        assert got["other_bytes"] < 1024  # only 0-dim statistics besides the memory
    # the allocator-event peak sees a transient buffer that is freed again
    peak = bench_memory.peak_transient(lambda: torch.empty(1 << 18).fill_(1.0).sum())
    assert peak["torch_peak_bytes"] >= 4 << 18
    assert peak["torch_net_bytes"] < 4 << 18


def test_e2e_quick_runs_both_steps():
    res = bench_e2e.run(
        {"vocab": 64, "d": 16, "layers": 1, "heads": 2, "batch": 2, "seq": 8},
        repeats=1,
        verbose=False,
    )
    assert set(res["methods"]) == {"graddiff", "gru"}
    assert _finite_positive(res["ratio_gru_over_graddiff"])
    assert _finite_positive(res["ratio_cpu_time"])
    assert len(res["cpu_time"]["gru"]["samples_s"]) == 1
    assert res["gru_steps"] == 2  # warm-up + one repeat
    assert "GRU / GradDiff" in bench_e2e.markdown(res)


def test_gpu_check_cpu_parts():
    for dtype in (torch.bfloat16, torch.float32):
        c = gpu_check.check_correctness(torch.device("cpu"), dtype, steps=4)
        assert c["ok"], c
        assert c["ema_dtype"] == "torch.float32"
    t = gpu_check.time_size(SMALL, torch.device("cpu"), torch.float32, repeats=1)
    assert t["conflict"] and _finite_positive(t["gru_over_bound"])
    assert t["persistent_ema_per_param_byte"] == 1.0
    sync = gpu_check.check_no_sync(torch.device("cpu"))
    assert set(sync) == {case[0] for case in gpu_check.SYNC_CASES}
    assert not any(v.startswith("FAILED") for v in sync.values()), sync
