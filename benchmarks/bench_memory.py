"""Memory GRU adds: persistent bytes (the retain memory) and transient bytes inside step.

Persistent: after some steps, every tensor reachable from the GRUOptimizer object
(its ``__dict__``, recursively through dicts, lists, tuples and dataclasses), except the
wrapped optimizer and the parameters and their gradients, is counted once per storage.
The result is reported per parameter byte, for the default fp32 memory and for
``ema_dtype=torch.bfloat16``. The buffers found are listed by attribute.

Transient: torch's CPU allocator reports every allocation and free to the profiler when
``torch.profiler.profile(profile_memory=True)`` is active (``[memory]`` events with signed
byte counts). Summing them in time order over one call gives the live bytes the call
allocated at each instant; the maximum is the peak transient allocation of that call
(buffers freed by the end included). ``tracemalloc`` cannot see torch's allocator, but it
does see NumPy's, so the reference-style baseline (which projects in NumPy) gets both
numbers. The retain fold (end of ``retain_pass``) and the rectification (``step`` with an
inner optimizer that does nothing) are measured separately, then ``step`` with AdamW
inside for context.

Run: ``python benchmarks/bench_memory.py [--quick] [--size 30M]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as C
import torch
from baselines import PCGradStyle, ReferenceStyleGRU
from bench_step import GAMMA, _NoOpOptimizer
from torch.profiler import ProfilerActivity, profile

from gru_optim import GRUOptimizer
from gru_optim.functional import ema_update_, rectify_


def peak_transient(fn: Callable[[], Any]) -> dict[str, int]:
    """Peak of the running sum of allocator events during ``fn`` (torch), and the
    tracemalloc peak (NumPy and Python objects)."""
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    _, np_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return {
        "torch_peak_bytes": int(peak),
        "torch_net_bytes": int(live),
        "host_peak_bytes": int(np_peak),
    }


def _tensors_in(
    obj: Any, path: str, seen: set[int], out: list[tuple[str, torch.Tensor]], depth: int = 0
) -> None:
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            _tensors_in(v, f"{path}[{type(k).__name__}]", seen, out, depth + 1)
            if isinstance(k, torch.Tensor):
                out.append((f"{path}<key>", k))
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _tensors_in(v, f"{path}[]", seen, out, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _tensors_in(getattr(obj, f.name), f"{path}.{f.name}", seen, out, depth + 1)
    elif type(obj).__module__.startswith("gru_optim") and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            _tensors_in(v, f"{path}.{k}", seen, out, depth + 1)


def persistent_bytes(opt: GRUOptimizer, params: list[torch.Tensor]) -> dict[str, Any]:
    """Bytes of every tensor the wrapper holds that is not a parameter or a gradient."""
    exclude = {p.untyped_storage().data_ptr() for p in params}
    exclude |= {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for k, v in vars(opt).items():
        if k in ("_inner",) or k.startswith("_optimizer_"):
            continue
        _tensors_in(v, k, seen, found)
    storages: dict[int, int] = {}
    by_attr: dict[str, dict[str, int]] = {}
    for path, t in found:
        ptr = t.untyped_storage().data_ptr()
        if ptr in exclude or ptr in storages or t.device.type == "meta":
            continue
        nbytes = t.untyped_storage().nbytes()
        storages[ptr] = nbytes
        # The owning attribute, down to the engine's parts (``_engine.memory``, ...).
        attr = ".".join(path.split("[")[0].split("<")[0].split(".")[:2])
        d = by_attr.setdefault(attr, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += nbytes
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    total = sum(storages.values())
    ema_bytes = by_attr.get("_engine.memory", {}).get("bytes", 0)
    return {
        "param_bytes": param_bytes,
        "extra_bytes": total,
        "extra_per_param_byte": total / param_bytes,
        "ema_bytes": ema_bytes,
        "ema_per_param_byte": ema_bytes / param_bytes,
        "other_bytes": total - ema_bytes,
        "by_attribute": by_attr,
    }


def _setup(
    shape: C.ModelShape,
) -> tuple[list[torch.nn.Parameter], list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(1234)  # not 0: make_params draws with seed 0
    params = C.make_params(shape)
    forget = [p.detach().mul(-0.5).add_(torch.randn_like(p), alpha=0.01) for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    return params, [p.detach() for p in params], forget


def run(shape: C.ModelShape, verbose: bool = True) -> dict[str, Any]:
    params, retain_src, forget_src = _setup(shape)
    largest = max(p.numel() * p.element_size() for p in params)
    named = [(n, p) for (n, _), p in zip(shape.shapes(), params)]
    out: dict[str, Any] = {
        "shape": {
            "name": shape.name,
            "numel": sum(p.numel() for p in params),
            "n_tensors": len(params),
        },
        "largest_param_bytes": largest,
    }

    # Persistent memory, fp32 and bf16 memory.
    persist = {}
    for label, dt in (("fp32", None), ("bf16", torch.bfloat16)):
        opt = GRUOptimizer(_NoOpOptimizer(params), gamma=GAMMA, ema_dtype=dt)
        for _ in range(2):
            with opt.retain_pass():
                C.store_grads(params, retain_src)
            C.store_grads(params, forget_src)
            opt.step()
        assert bool(opt.last_stats["conflict"])
        persist[label] = persistent_bytes(opt, params)
        gc.collect()
    out["persistent"] = persist

    # Transient memory inside each phase.
    transient: dict[str, dict[str, Any]] = {}

    def phases(
        pre: Callable[[], Any], post_retain: Callable[[], Any], post_forget: Callable[[], Any]
    ) -> dict[str, Any]:
        # warm-up step, then measure the second one
        for measure in (False, True):
            pre()
            C.store_grads(params, retain_src)
            r = peak_transient(post_retain) if measure else (post_retain(), None)[1]
            C.store_grads(params, forget_src)
            f = peak_transient(post_forget) if measure else (post_forget(), None)[1]
        return {"retain_fold": r, "rectify": f}

    opt = GRUOptimizer(_NoOpOptimizer(params), gamma=GAMMA)
    ctx: list[Any] = []

    def w_pre() -> None:
        ctx.append(opt.retain_pass())
        ctx[-1].__enter__()

    transient["gru"] = phases(w_pre, lambda: ctx.pop().__exit__(None, None, None), opt.step)
    opt = GRUOptimizer(torch.optim.AdamW(params, lr=1e-8, foreach=True), gamma=GAMMA)
    transient["gru+adamw"] = phases(w_pre, lambda: ctx.pop().__exit__(None, None, None), opt.step)
    adam = torch.optim.AdamW(params, lr=1e-8, foreach=True)
    transient["adamw"] = phases(lambda: None, lambda: None, adam.step)
    ema = [torch.zeros_like(p) for p in params]
    transient["gru_core"] = phases(
        lambda: None,
        lambda: ema_update_(ema, [p.grad for p in params], GAMMA),
        lambda: rectify_([p.grad for p in params], ema),
    )
    ref = ReferenceStyleGRU(named, GAMMA)
    transient["reference"] = phases(lambda: None, ref.post_retain, ref.post_forget)
    pc = PCGradStyle(params, GAMMA)
    transient["pcgrad"] = phases(lambda: None, pc.post_retain, pc.post_forget)
    gc.collect()
    for v in transient.values():
        v["peak_bytes"] = max(
            v["retain_fold"]["torch_peak_bytes"] + v["retain_fold"]["host_peak_bytes"],
            v["rectify"]["torch_peak_bytes"] + v["rectify"]["host_peak_bytes"],
        )
        v["peak_over_largest_param"] = v["peak_bytes"] / largest
        v["peak_over_param_bytes"] = v["peak_bytes"] / persist["fp32"]["param_bytes"]
    out["transient"] = transient
    if verbose:
        print_tables(out)
    return out


LABELS = {
    "gru": "GRU wrapper (inner step no-op)",
    "gru+adamw": "GRU wrapper + AdamW foreach",
    "adamw": "AdamW foreach alone",
    "gru_core": "GRU functional core",
    "reference": "reference-style GRU",
    "pcgrad": "PCGrad-style GRU",
}


def persistent_rows(out: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for label, p in out["persistent"].items():
        rows.append(
            [
                f"memory {label}",
                C.mib(p["param_bytes"]),
                C.mib(p["ema_bytes"]),
                p["ema_per_param_byte"],
                p["other_bytes"],
                p["extra_per_param_byte"],
            ]
        )
    return rows


PERSIST_HEADERS = [
    "EMA dtype",
    "param MiB",
    "EMA MiB",
    "EMA / param bytes",
    "other bytes",
    "all extra / param bytes",
]
TRANSIENT_HEADERS = [
    "method",
    "retain fold peak MiB",
    "rectify/step peak MiB",
    "of which host (tracemalloc) MiB",
    "peak / largest param",
    "peak / all params",
]


def transient_rows(out: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for k, v in out["transient"].items():
        rows.append(
            [
                LABELS.get(k, k),
                C.mib(v["retain_fold"]["torch_peak_bytes"] + v["retain_fold"]["host_peak_bytes"]),
                C.mib(v["rectify"]["torch_peak_bytes"] + v["rectify"]["host_peak_bytes"]),
                C.mib(max(v["retain_fold"]["host_peak_bytes"], v["rectify"]["host_peak_bytes"])),
                v["peak_over_largest_param"],
                v["peak_over_param_bytes"],
            ]
        )
    return rows


def print_tables(out: dict[str, Any]) -> None:
    C.print_table(
        f"persistent memory ({out['shape']['name']})", PERSIST_HEADERS, persistent_rows(out)
    )
    C.print_table(
        f"transient memory ({out['shape']['name']}, largest parameter "
        f"{C.mib(out['largest_param_bytes']):.1f} MiB)",
        TRANSIENT_HEADERS,
        transient_rows(out),
    )


def markdown(out: dict[str, Any]) -> str:
    s = out["shape"]
    return "\n".join(
        [
            f"{s['numel'] / 1e6:.1f}M fp32 parameters in {s['n_tensors']} tensors; largest "
            f"parameter {C.mib(out['largest_param_bytes']):.1f} MiB.",
            "",
            "Persistent (everything the wrapper holds besides the parameters, their "
            "gradients and the inner optimizer):",
            "",
            C.markdown_table(PERSIST_HEADERS, persistent_rows(out)),
            "",
            "Peak transient allocation inside each phase (torch profiler allocator events; "
            "NumPy's share via tracemalloc):",
            "",
            C.markdown_table(TRANSIENT_HEADERS, transient_rows(out)),
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default 1)")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    C.set_threads(args.threads)
    shape = C.TINY if args.quick else C.SHAPES[args.size or "30M"]
    res = run(shape)
    payload = {"benchmark": "memory", "quick": args.quick, "env": C.environment(), **res}
    out = Path(args.out) if args.out else C.RESULTS
    C.write_json("bench_memory", payload, out)
    md = markdown(res)
    C.write_markdown("bench_memory", md, out)
    if args.out is None and not args.no_doc and not args.quick:
        C.update_doc_section("bench_memory", md)
    return payload


if __name__ == "__main__":
    main()
