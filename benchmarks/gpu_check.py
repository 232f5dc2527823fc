"""GPU check of GRUOptimizer: correctness, no host sync, timings, peak memory.

One prepared script for a session that has the GPU machine (an NVIDIA H200); it fits in
a few minutes there. On a machine without CUDA, ``--device cpu --quick`` runs the parts
that make sense on the CPU (correctness against the float64 reference, the code path of
the sync check, timings and memory accounting on a tiny model), so the script is tested
everywhere.

1. Correctness: several GRU steps with bf16 gradients and the default fp32 memory (and
   fp32 gradients) on the device (the fused Triton path, the default on CUDA), against an
   independent float64 re-derivation on the CPU: the memory, the dot product, the
   coefficient and the rectified gradient.
2. Host synchronisations, counted with ``torch.cuda.set_sync_debug_mode("warn")`` around
   the retain pass and the step: none with ``skip_nonfinite=False`` (both paths), none on
   the fused path with a fused torch inner optimizer (it skips on the device), at most one
   on the fused path otherwise, two on the foreach path with ``skip_nonfinite=True``.
3. Timings with CUDA events at ~100M and ~1B parameters (fp32 and bf16 gradients):
   GRU's own work (the wrapper around a no-op optimizer) on the fused and the foreach
   paths, one foreach and one fused AdamW step, a STREAM triad on preallocated buffers
   (the measured bandwidth) and the byte bound of the fused kernels' traffic (36 B per
   parameter with fp32 gradients, 28 B with bf16 gradients and an fp32 memory). Targets:
   fused own work <= 1.25x the bound and <= one fused AdamW step.
4. Memory: ``torch.cuda.max_memory_allocated`` around each phase (transient), and the
   memory's bytes per parameter byte (persistent).

Results: ``docs/results/gpu_check.json`` and ``.md`` on CUDA (``--out`` to change).

    bash benchmarks/gpu_check.sh                  # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import _common as C
import torch
from bench_step import GAMMA, _NoOpOptimizer

from gru_optim import GRUOptimizer
from gru_optim.functional import ema_update_, rectify_

SIZES = {
    "100M": C.SHAPES["100M"],
    "1B": C.ModelShape("1B", d=2048, layers=20, vocab=50304, ctx=2048),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- 1. correctness
def reference_rectify(
    g_u: list[torch.Tensor], m: list[torch.Tensor]
) -> tuple[list[torch.Tensor], float, float]:
    """The GRU rule in float64 on the CPU, written from GRU_SPEC.md."""
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g_u, m))
    sq = sum(float((b.double() ** 2).sum()) for b in m)
    coef = dot / sq if (dot < 0 and sq > 0) else 0.0
    return [a.double() - coef * b.double() for a, b in zip(g_u, m)], dot, coef


def check_correctness(
    device: torch.device, grad_dtype: torch.dtype, steps: int = 4
) -> dict[str, Any]:
    shape = C.TINY
    params = C.make_params(shape, dtype=grad_dtype, device=str(device), seed=3)
    opt = GRUOptimizer(_NoOpOptimizer(params), gamma=GAMMA)
    gen = torch.Generator().manual_seed(5)
    m_ref = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    worst = {"ema_rel": 0.0, "grad_rel": 0.0, "dot_rel": 0.0, "coef_rel": 0.0}
    conflicts = 0
    for step in range(steps):
        g_r = [torch.randn(p.shape, generator=gen).to(grad_dtype) for p in params]
        sign = -1.0 if step % 4 != 3 else 1.0  # mostly conflicting, one agreeing step
        g_u = [
            (sign * r.float() + 0.3 * torch.randn(r.shape, generator=gen)).to(grad_dtype)
            for r in g_r
        ]
        with opt.retain_pass():
            for p, g in zip(params, g_r):
                p.grad = g.to(device, copy=True)
        C.store_grads(params, [g.to(device) for g in g_u])
        opt.step()
        # float64 reference from the same (already rounded) inputs
        m_ref = [GAMMA * r.double() + (1 - GAMMA) * m for r, m in zip(g_r, m_ref)]
        want, dot, coef = reference_rectify(g_u, m_ref)
        conflicts += coef != 0.0
        ema = [opt.retain_memory(p).detach().cpu().double() for p in params]
        got = [p.grad.detach().cpu().double() for p in params]

        def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
            num = math.sqrt(sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b)))
            den = math.sqrt(sum(float((y**2).sum()) for y in b)) or 1.0
            return num / den

        worst["ema_rel"] = max(worst["ema_rel"], rel(ema, m_ref))
        worst["grad_rel"] = max(worst["grad_rel"], rel(got, want))
        s = opt.last_stats
        worst["dot_rel"] = max(worst["dot_rel"], abs(float(s["dot"]) - dot) / max(abs(dot), 1e-30))
        got_coef = float(s["coef"])
        worst["coef_rel"] = max(
            worst["coef_rel"],
            abs(got_coef - coef) / max(abs(coef), 1e-30) if coef else abs(got_coef),
        )
        opt.zero_grad()
    ema_dtype = str(opt.retain_memory(params[0]).dtype)
    # bf16 gradients are rounded to 8 bits after the projection; fp32 to 24.
    grad_tol = 2e-2 if grad_dtype == torch.bfloat16 else 1e-5
    ok = (
        worst["ema_rel"] < 1e-6
        and worst["grad_rel"] < grad_tol
        and worst["dot_rel"] < 1e-4
        and worst["coef_rel"] < 1e-4
        and conflicts > 0
    )
    return {
        "grad_dtype": str(grad_dtype),
        "ema_dtype": ema_dtype,
        "steps": steps,
        "conflicting_steps": conflicts,
        "worst": worst,
        "grad_tol": grad_tol,
        "ok": ok,
    }


# --------------------------------------------------------------------------- 2. host sync
def _count_syncs(fn: Any, device: torch.device) -> int:
    """How many synchronizing CUDA calls ``fn`` makes (sync debug mode "warn")."""
    import warnings

    if device.type != "cuda":
        fn()
        return -1
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum(1 for w in caught if "synchroniz" in str(w.message))


# (name, GRUOptimizer kwargs, inner, the most host synchronisations a step may make)
SYNC_CASES = [
    (
        "foreach, skip_nonfinite=False, fused AdamW",
        {"fused": False, "skip_nonfinite": False},
        "adamw_fused",
        0,
    ),
    (
        "fused, skip_nonfinite=False, foreach AdamW",
        {"fused": True, "skip_nonfinite": False},
        "adamw_foreach",
        0,
    ),
    ("fused, skip_nonfinite=True, fused AdamW", {"fused": True}, "adamw_fused", 0),
    ("fused, skip_nonfinite=True, foreach AdamW", {"fused": True}, "adamw_foreach", 1),
    ("foreach, skip_nonfinite=True, foreach AdamW", {"fused": False}, "adamw_foreach", 2),
]


def check_no_sync(device: torch.device) -> dict[str, Any]:
    """Count host synchronisations in the retain pass and the step (after a warm-up step
    that builds the kernels' tables), for the cases of :data:`SYNC_CASES`."""
    out: dict[str, Any] = {}
    shape = C.TINY
    fused_ok = device.type == "cuda"
    for name, kw, inner_name, allowed in SYNC_CASES:
        if kw.get("fused") and not fused_ok:
            out[name] = "not checked (no CUDA)"
            continue
        params = C.make_params(shape, device=str(device), seed=7)
        if inner_name == "adamw_foreach":
            inner: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        else:
            inner = torch.optim.AdamW(params, lr=1e-4, fused=True)
        opt = GRUOptimizer(inner, gamma=GAMMA, **kw)
        retain = [torch.randn_like(p) for p in params]
        forget = [-r + 0.1 * torch.randn_like(r) for r in retain]

        def one_step(
            opt: GRUOptimizer = opt,
            params: list[torch.Tensor] = params,
            retain: list[torch.Tensor] = retain,
            forget: list[torch.Tensor] = forget,
        ) -> None:
            with opt.retain_pass():
                for p, r in zip(params, retain):
                    p.grad = r.clone()
            C.store_grads(params, forget)
            opt.step()

        try:
            counts = []
            for step in range(4):
                c = _count_syncs(one_step, device) if step > 0 else (one_step() or 0)
                counts.append(c)
            worst = max(counts[1:])
            if device.type != "cuda":
                out[name] = "not checked (no CUDA): the steps ran"
            elif worst <= allowed:
                out[name] = f"ok: {worst} host synchronisation(s) per step (allowed {allowed})"
            else:
                out[name] = f"FAILED: {worst} host synchronisations per step, allowed {allowed}"
        except Exception as e:  # report, do not abort the whole check
            status = "FAILED: " + "".join(traceback.format_exception_only(type(e), e)).strip()
            out[name] = status + "\n" + "".join(traceback.format_tb(e.__traceback__)[-4:])
    return out


# --------------------------------------------------------------------------- 3+4. timing
def time_size(
    shape: C.ModelShape, device: torch.device, grad_dtype: torch.dtype, repeats: int
) -> dict[str, Any]:
    torch.manual_seed(1234)  # not 0: make_params draws with seed 0
    params = C.make_params(shape, dtype=grad_dtype, device=str(device))
    numel = sum(p.numel() for p in params)
    forget_src = [p.detach().mul(-0.5).add_(torch.randn_like(p), alpha=0.01) for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    retain_src = [p.detach() for p in params]
    base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    wrapper = GRUOptimizer(_NoOpOptimizer(params), gamma=GAMMA, skip_nonfinite=False, fused=False)
    fused = (
        GRUOptimizer(_NoOpOptimizer(params), gamma=GAMMA, skip_nonfinite=False, fused=True)
        if device.type == "cuda"
        else None
    )
    triad = [torch.empty(numel, device=device) for _ in range(3)]
    core_ema = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    adam_foreach = torch.optim.AdamW(params, lr=1e-8, foreach=True)
    adam_fused = (
        torch.optim.AdamW(params, lr=1e-8, fused=True)
        if (device.type == "cuda" or grad_dtype == torch.float32)
        else None
    )
    ctx: list[Any] = []

    methods: dict[str, tuple[Any, Any, Any]] = {
        "gru": (
            lambda: ctx.append(wrapper.retain_pass()) or ctx[-1].__enter__(),
            lambda: ctx.pop().__exit__(None, None, None),
            wrapper.step,
        ),
        "gru_core": (
            None,
            lambda: ema_update_(core_ema, [p.grad for p in params], GAMMA),
            lambda: rectify_([p.grad for p in params], core_ema),
        ),
        "adamw_foreach": (None, None, adam_foreach.step),
        "copy": (None, None, lambda: torch._foreach_copy_(grads, forget_src)),
        "triad": (None, None, lambda: torch.add(triad[1], triad[2], alpha=0.5, out=triad[0])),
    }
    if fused is not None:
        fctx: list[Any] = []
        methods["gru_fused"] = (
            lambda: fctx.append(fused.retain_pass()) or fctx[-1].__enter__(),
            lambda: fctx.pop().__exit__(None, None, None),
            fused.step,
        )
    if adam_fused is not None:
        methods["adamw_fused"] = (None, None, adam_fused.step)

    use_events = device.type == "cuda"
    peaks: dict[str, int] = {}

    def run(name: str, phases: tuple[Any, Any, Any], track_peak: bool = False) -> float:
        pre, post_r, post_f = phases
        total = 0.0
        parts = [pre, "retain", post_r, "forget", post_f]
        if track_peak and device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            start_alloc = torch.cuda.memory_allocated(device)
            peak = 0
        for part in parts:
            if part == "retain":
                C.store_grads(params, retain_src)
                continue
            if part == "forget":
                C.store_grads(params, forget_src)
                continue
            if part is None:
                continue
            if track_peak and device.type == "cuda":
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                start_alloc = torch.cuda.memory_allocated(device)
            if use_events:
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                part()
                b.record()
                b.synchronize()
                total += a.elapsed_time(b) / 1e3
            else:
                t0 = time.perf_counter()
                part()
                total += time.perf_counter() - t0
            if track_peak and device.type == "cuda":
                _sync(device)
                peak = max(peak, torch.cuda.max_memory_allocated(device) - start_alloc)
        if track_peak and device.type == "cuda":
            peaks[name] = int(peak)
        return total

    # warm-up (lazy state), then one tracked step for the transient peaks
    for name, ph in methods.items():
        run(name, ph)
    for name, ph in methods.items():
        run(name, ph, track_peak=True)
    samples: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for name, ph in methods.items():
            samples[name].append(run(name, ph))
    med = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    g_bytes = torch.tensor([], dtype=grad_dtype).element_size()
    # The fused kernels' traffic (gru_optim/_fused.py), fp32 memory: retain norm (read g),
    # fold (read g, read m, write m), forget stats (read g, read m), projection (read g,
    # read m, write g): 36 B per parameter with fp32 gradients, 28 B with bf16.
    min_bytes = numel * (g_bytes + (g_bytes + 4 + 4) + (g_bytes + 4) + (g_bytes + 4 + g_bytes))
    bw = 3 * 4 * numel / med["triad"]  # STREAM triad on preallocated buffers
    bound = min_bytes / bw
    ema_bytes = sum(
        m.numel() * m.element_size()
        for m in (wrapper.retain_memory(p) for p in params)
        if m is not None
    )
    res = {
        "size": shape.name,
        "numel": numel,
        "n_tensors": len(params),
        "grad_dtype": str(grad_dtype),
        "repeats": repeats,
        "median_s": med,
        "samples_s": samples,
        "triad_bandwidth_GBps": bw / 1e9,
        "copy_bandwidth_GBps": 2 * g_bytes * numel / med["copy"] / 1e9,
        "adamw_fused_bandwidth_GBps": (
            (2 * g_bytes + 4 * 4 + 2 * g_bytes) * numel / med["adamw_fused"] / 1e9
            if "adamw_fused" in med
            else None
        ),
        "gru_fused_over_bound": med["gru_fused"] / bound if "gru_fused" in med else None,
        "gru_fused_over_adamw_fused": (
            med["gru_fused"] / med["adamw_fused"]
            if "gru_fused" in med and "adamw_fused" in med
            else None
        ),
        "gru_min_bytes": min_bytes,
        "gru_bound_s": bound,
        "gru_over_bound": med["gru"] / bound,
        "gru_core_over_bound": med["gru_core"] / bound,
        "gru_over_adamw_foreach": med["gru"] / med["adamw_foreach"],
        "gru_over_adamw_fused": med["gru"] / med["adamw_fused"] if "adamw_fused" in med else None,
        "conflict": bool(wrapper.last_stats["conflict"]),
        "persistent_ema_bytes": ema_bytes,
        "persistent_ema_per_param_byte": ema_bytes / (numel * g_bytes),
        "transient_peak_bytes": peaks,
        "largest_param_bytes": max(p.numel() for p in params) * g_bytes,
        "allocated_before_bytes": base_alloc,
        "targets_met": (
            None
            if "gru_fused" not in med
            else bool(
                med["gru_fused"] / bound <= 1.25
                and ("adamw_fused" not in med or med["gru_fused"] <= med["adamw_fused"])
            )
        ),
    }
    return res


def reference_at(shape: C.ModelShape, device: torch.device, repeats: int) -> dict[str, Any]:
    """The reference-style baseline on the device (host round trip), a few repeats."""
    from baselines import ReferenceStyleGRU

    params = C.make_params(shape, device=str(device))
    forget = [p.detach().mul(-0.5) for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    ref = ReferenceStyleGRU([(n, p) for (n, _), p in zip(shape.shapes(), params)], GAMMA)
    times = []
    for i in range(repeats + 1):
        torch._foreach_copy_([p.grad for p in params], [p.detach() for p in params])
        _sync(device)
        t0 = time.perf_counter()
        ref.post_retain()
        _sync(device)
        t = time.perf_counter() - t0
        torch._foreach_copy_([p.grad for p in params], forget)
        _sync(device)
        t0 = time.perf_counter()
        ref.post_forget()
        _sync(device)
        t += time.perf_counter() - t0
        if i:
            times.append(t)
    del ref, params, forget
    gc.collect()
    return {"size": shape.name, "median_s": sorted(times)[len(times) // 2], "samples_s": times}


# --------------------------------------------------------------------------- main
def markdown(res: dict[str, Any]) -> str:
    lines = [f"Device: {res['env'].get('gpu', res['device'])}; torch {res['env']['torch']}.", ""]
    rows = [
        [
            c["grad_dtype"],
            c["ema_dtype"],
            c["conflicting_steps"],
            c["worst"]["grad_rel"],
            c["worst"]["ema_rel"],
            c["worst"]["dot_rel"],
            "yes" if c["ok"] else "NO",
        ]
        for c in res["correctness"]
    ]
    lines += [
        C.markdown_table(
            [
                "grads",
                "memory",
                "conflicting steps",
                "grad rel err",
                "EMA rel err",
                "dot rel err",
                "ok",
            ],
            rows,
        ),
        "",
    ]
    lines += [
        C.markdown_table(
            ["case", "host synchronisations per step"],
            [[k, v.splitlines()[0]] for k, v in res["no_sync"].items()],
        ),
        "",
    ]
    rows = []
    for t in res["timings"]:
        m = t["median_s"]
        rows.append(
            [
                t["size"],
                t["numel"] / 1e6,
                t["grad_dtype"].replace("torch.", ""),
                m.get("gru_fused", float("nan")) * 1e3,
                m["gru"] * 1e3,
                m["adamw_foreach"] * 1e3,
                m.get("adamw_fused", float("nan")) * 1e3,
                t["triad_bandwidth_GBps"],
                t["gru_bound_s"] * 1e3,
                t["gru_fused_over_bound"] or float("nan"),
                t["gru_fused_over_adamw_fused"] or float("nan"),
                C.mib(max(t["transient_peak_bytes"].get("gru_fused", 0), 0)),
                {True: "yes", False: "NO", None: "-"}[t["targets_met"]],
            ]
        )
    lines.append(
        C.markdown_table(
            [
                "size",
                "params (M)",
                "grads",
                "GRU fused ms",
                "GRU foreach ms",
                "AdamW foreach ms",
                "AdamW fused ms",
                "triad GB/s",
                "byte bound ms",
                "fused / bound (<= 1.25)",
                "fused / fused AdamW (<= 1)",
                "fused transient MiB",
                "targets met",
            ],
            rows,
        )
    )
    if res.get("reference"):
        r = res["reference"]
        lines.append(
            f"\nReference-style GRU at {r['size']}: {r['median_s'] * 1e3:.0f} ms per step."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    ap.add_argument("--sizes", default=None, help="comma-separated: 100M,1B (default) or tiny")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        C.set_threads(None)
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "benchmark": "gpu_check",
        "device": str(device),
        "quick": args.quick,
        "env": C.environment(str(device)),
    }
    res["correctness"] = [
        check_correctness(device, torch.bfloat16),
        check_correctness(device, torch.float32),
    ]
    print(
        "correctness:",
        [(c["grad_dtype"], c["ok"], c["worst"]) for c in res["correctness"]],
        flush=True,
    )
    res["no_sync"] = check_no_sync(device)
    print("no sync:", {k: v.splitlines()[0] for k, v in res["no_sync"].items()}, flush=True)
    if args.sizes:
        sizes = args.sizes.split(",")
    else:
        sizes = ["tiny"] if (args.quick or device.type == "cpu") else ["100M", "1B"]
    timings = []
    for name in sizes:
        shape = C.TINY if name == "tiny" else SIZES.get(name, C.SHAPES.get(name))
        for dt in (torch.float32, torch.bfloat16):
            reps = args.repeats or (3 if args.quick else (20 if shape.numel < 5e8 else 10))
            t = time_size(shape, device, dt, reps)
            gc.collect()  # free this case's tensors before the next one
            if device.type == "cuda":
                torch.cuda.empty_cache()
            timings.append(t)
            med = t["median_s"]
            print(
                f"{name} {dt}: GRU fused {med.get('gru_fused', float('nan')) * 1e3:.2f} ms, "
                f"foreach {med['gru'] * 1e3:.2f} ms, "
                f"bound {t['gru_bound_s'] * 1e3:.2f} ms "
                f"({t['gru_fused_over_bound'] or float('nan'):.2f}x fused), "
                f"fused AdamW {med.get('adamw_fused', float('nan')) * 1e3:.2f} ms, "
                f"triad {t['triad_bandwidth_GBps']:.0f} GB/s, "
                f"transient {t['transient_peak_bytes']}",
                flush=True,
            )
    res["timings"] = timings
    ref_size = "tiny" if sizes == ["tiny"] else "100M"
    res["reference"] = reference_at(
        C.TINY if ref_size == "tiny" else SIZES["100M"], device, 1 if args.quick else 3
    )
    res["elapsed_s"] = time.perf_counter() - t_start
    res["ok"] = all(c["ok"] for c in res["correctness"]) and not any(
        v.startswith("FAILED") for v in res["no_sync"].values()
    )
    if args.out:
        out = Path(args.out)
    elif device.type == "cuda":
        out = C.RESULTS
    else:
        out = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    C.write_json("gpu_check" if device.type == "cuda" else "gpu_check_cpu", res, out)
    md = markdown(res)
    C.write_markdown("gpu_check" if device.type == "cuda" else "gpu_check_cpu", md, out)
    if device.type == "cuda" and not args.out and not args.quick:
        C.update_doc_section("gpu_check", md)
    print(md)
    print(f"\nok={res['ok']}; {res['elapsed_s']:.0f} s; results in {out}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
