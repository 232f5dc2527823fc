"""GRU's own work per step against one AdamW update, the reference style and PCGrad style.

One "step" of every method follows the same protocol, driven by the harness:

1. ``pre_retain()``                      (timed)
2. the retain backward writes ``.grad``  (simulated by a copy; not timed)
3. ``post_retain()``                     (timed: fold the retain gradient into the memory)
4. the forget backward writes ``.grad``  (simulated by a copy; not timed)
5. ``post_forget()``                     (timed: rectify ``.grad`` in place)

so a method's time is everything it adds to a training step except the backward passes
and the inner optimizer's update. The forget gradient is built to conflict with the
retain memory, so the projection runs on every step (the JSON records that it did).

Methods:

- ``gru``: ``GRUOptimizer`` around an optimizer whose ``step`` does nothing (the
  wrapper minus the inner step), closure-free path (``retain_pass`` + ``step``), default
  settings (gamma 0.8, global, fp32 memory, ``skip_nonfinite=True``, ``fused=None``: on
  CPU the compiled C++ passes of ``gru_optim/kernels/_native.py``).
- ``gru_foreach``: the same with ``fused=False`` (torch's foreach operations).
- ``gru_nocheck``: the wrapper with ``skip_nonfinite=False``: no retain norm before the
  fold (the fold's own pass gives it), so 32 B per parameter instead of 36.
- ``gru_core``: the functional core alone: ``ema_update_`` then ``rectify_``, which are
  the functions ``step()`` runs (``rectify_`` is ``segment_stats``,
  ``conflict_coefficients`` and ``project_``, as the projection rule's ``solve`` and
  ``apply_``), without the shell's bookkeeping (retain norm, range checks, statistics).
- ``adamw``: one ``torch.optim.AdamW(foreach=True)`` update of the same parameters.
- ``adamw_fused``: the same with ``fused=True`` (for information).
- ``reference``: :class:`baselines.ReferenceStyleGRU` (the authors' approach).
- ``pcgrad``: :class:`baselines.PCGradStyle` (flatten and project).
- ``gru_k2``, ``gru_k4``, ``gru_k8``: the wrapper with ``directions=k`` (GRU-k: the memory
  and the ``k - 1`` most recent retain gradients; ``k (k + 1) / 2`` Gram entries and ``k``
  dot products per step).
- ``copy``: ``torch._foreach_copy_`` of all gradients (bytes moved = 2 x gradient bytes).
- ``triad``: a STREAM triad ``a = b + s c`` on preallocated flat buffers of the same size
  (3 x 4 B per element): the machine's bandwidth, measured in the same run, from which the
  byte bounds are computed.

Run: ``python benchmarks/bench_step.py [--quick] [--size 30M] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from typing import Any

import _common as C
import torch
from baselines import PCGradStyle, ReferenceStyleGRU

from gru_optim import GRUOptimizer
from gru_optim.functional import ema_update_, rectify_

GAMMA = 0.8

# Bytes GRU moves per parameter element per conflicting step, fp32 gradients and memory,
# with the fused kernels (gru_optim/kernels/_triton.py):
#   retain norm  read g_r                       1 x 4 B   (to skip a bad fold on the device)
#   fold         read g_r, read m, write m      3 x 4 B
#   forget stats read g_u, read m               2 x 4 B   (<g,m>, ||g||^2, ||m||^2, one pass)
#   projection   read g_u, read m, write g_u    3 x 4 B
GRU_MIN_BYTES_PER_ELEM = 36
# The CPU's compiled passes (gru_optim/kernels/_native.py) move the same 36 B. What the foreach
# path moves: retain norm 4, fold 12, forget norm 4, dots 8, ||m||^2 4, projection 12; the
# functional core (ema_update_ + rectify_) skips the retain norm.
GRU_WRAPPER_BYTES_PER_ELEM = GRU_MIN_BYTES_PER_ELEM
# skip_nonfinite=False: the fold's own pass gives the retain norm (no separate read).
GRU_NOCHECK_BYTES_PER_ELEM = GRU_MIN_BYTES_PER_ELEM - 4
GRU_FOREACH_BYTES_PER_ELEM = 44
GRU_CORE_BYTES_PER_ELEM = 40
# foreach AdamW reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg,
# exp_avg_sq at least once: 7 x 4 B.
ADAMW_MIN_BYTES_PER_ELEM = 28

METHOD_LABELS = {
    "gru": "GRU wrapper (own work)",
    "gru_foreach": "GRU wrapper, fused=False (foreach)",
    "gru_nocheck": "GRU wrapper, skip_nonfinite=False",
    "gru_core": "GRU functional core",
    "adamw": "AdamW foreach step",
    "adamw_fused": "AdamW fused step",
    "reference": "reference-style GRU",
    "pcgrad": "PCGrad-style GRU",
    "copy": "copy of all grads",
    "triad": "STREAM triad (bandwidth)",
    "gru_k2": "GRU-k wrapper, k = 2",
    "gru_k4": "GRU-k wrapper, k = 4",
    "gru_k8": "GRU-k wrapper, k = 8",
}


class _NoOpOptimizer(torch.optim.Optimizer):
    """An inner optimizer whose step does nothing: isolates the wrapper's own work."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.0})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


class _Method:
    name = ""

    def pre_retain(self) -> None:
        pass

    def post_retain(self) -> None:
        pass

    def post_forget(self) -> None:
        pass

    def conflicted(self) -> bool | None:
        return None


class _GRUWrapper(_Method):
    name = "gru"

    def __init__(
        self,
        params: list[torch.Tensor],
        directions: int = 1,
        fused: bool | None = None,
        skip_nonfinite: bool = True,
    ) -> None:
        self.name = "gru" if directions == 1 else f"gru_k{directions}"
        if fused is False:
            self.name = "gru_foreach"
        if not skip_nonfinite:
            self.name = "gru_nocheck"
        self.opt = GRUOptimizer(
            _NoOpOptimizer(params),
            gamma=GAMMA,
            directions=directions,
            fused=fused,
            skip_nonfinite=skip_nonfinite,
        )
        self.kernels = self.opt.kernels
        self._ctx: Any = None

    def pre_retain(self) -> None:
        self._ctx = self.opt.retain_pass()
        self._ctx.__enter__()

    def post_retain(self) -> None:
        self._ctx.__exit__(None, None, None)
        self._ctx = None

    def post_forget(self) -> None:
        self.opt.step()

    def conflicted(self) -> bool | None:
        return bool(self.opt.last_stats["conflict"])


class _GRUCore(_Method):
    name = "gru_core"

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.ema = [torch.zeros_like(p) for p in params]
        self.last: Any = None

    def post_retain(self) -> None:
        ema_update_(self.ema, [p.grad for p in self.params], GAMMA)

    def post_forget(self) -> None:
        self.last = rectify_([p.grad for p in self.params], self.ema)

    def conflicted(self) -> bool | None:
        return bool((self.last.coef != 0).any())


class _AdamW(_Method):
    def __init__(self, params: list[torch.Tensor], fused: bool) -> None:
        self.name = "adamw_fused" if fused else "adamw"
        kw = {"fused": True} if fused else {"foreach": True}
        self.opt = torch.optim.AdamW(params, lr=1e-8, weight_decay=0.01, **kw)

    def post_forget(self) -> None:
        self.opt.step()


class _Baseline(_Method):
    def __init__(self, impl: Any, name: str) -> None:
        self.impl = impl
        self.name = name

    def post_retain(self) -> None:
        self.impl.post_retain()

    def post_forget(self) -> None:
        self.impl.post_forget()

    def conflicted(self) -> bool | None:
        if isinstance(self.impl, ReferenceStyleGRU):
            return self.impl.last_dot < 0
        return None


class _Copy(_Method):
    name = "copy"

    def __init__(self, grads: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        self.grads, self.src = grads, src

    def post_forget(self) -> None:
        torch._foreach_copy_(self.grads, self.src)


class _Triad(_Method):
    """STREAM triad on preallocated flat buffers: a = b + s c (3 x 4 B per element)."""

    name = "triad"

    def __init__(self, numel: int) -> None:
        self.a = torch.empty(numel)
        self.b = torch.randn(numel)
        self.c = torch.randn(numel)

    def post_forget(self) -> None:
        torch.add(self.b, self.c, alpha=0.5, out=self.a)


def available_methods(numel: int, include_baselines: bool, gru_k: bool = True) -> list[str]:
    names = ["gru", "gru_nocheck", "gru_foreach", "gru_core", "adamw", "adamw_fused", "copy"]
    names.append("triad")
    if gru_k:
        names[1:1] = ["gru_k2", "gru_k4", "gru_k8"]
    if include_baselines:
        names[names.index("adamw_fused") : names.index("adamw_fused")] = ["reference", "pcgrad"]
    return names


def measure(
    shape: C.ModelShape,
    *,
    repeats: int,
    warmup: int = 1,
    methods: list[str] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Time the methods on one model shape, interleaved; return a JSON-ready dict."""
    torch.manual_seed(1234)  # not 0: make_params draws with seed 0
    params = C.make_params(shape)
    numel = sum(p.numel() for p in params)
    # Retain gradient source: the parameters themselves (no extra memory). Forget source:
    # mostly opposed to it, so <g_u, m> < 0 and the projection runs every step.
    forget_src = [p.detach().mul(-0.5).add_(torch.randn_like(p), alpha=0.01) for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    retain_src = [p.detach() for p in params]
    named = [(n, p) for (n, _), p in zip(shape.shapes(), params)]

    methods = methods or available_methods(numel, include_baselines=True)
    impls: dict[str, _Method] = {}
    for m in methods:
        if m == "gru":
            impls[m] = _GRUWrapper(params)
        elif m == "gru_foreach":
            impls[m] = _GRUWrapper(params, fused=False)
        elif m == "gru_nocheck":
            impls[m] = _GRUWrapper(params, skip_nonfinite=False)
        elif m.startswith("gru_k"):
            impls[m] = _GRUWrapper(params, directions=int(m[len("gru_k") :]))
        elif m == "triad":
            impls[m] = _Triad(numel)
        elif m == "gru_core":
            impls[m] = _GRUCore(params)
        elif m == "adamw":
            impls[m] = _AdamW(params, fused=False)
        elif m == "adamw_fused":
            impls[m] = _AdamW(params, fused=True)
        elif m == "reference":
            impls[m] = _Baseline(ReferenceStyleGRU(named, GAMMA), m)
        elif m == "pcgrad":
            impls[m] = _Baseline(PCGradStyle(params, GAMMA), m)
        elif m == "copy":
            impls[m] = _Copy(grads, forget_src)
        else:
            raise ValueError(f"unknown method {m!r}")

    def runner(impl: _Method) -> Callable[[], float]:
        def run() -> float:
            t = 0.0
            t0 = C.clock()
            impl.pre_retain()
            t += C.clock() - t0
            C.store_grads(params, retain_src)  # the retain backward
            t0 = C.clock()
            impl.post_retain()
            t += C.clock() - t0
            C.store_grads(params, forget_src)  # the forget backward
            t0 = C.clock()
            impl.post_forget()
            t += C.clock() - t0
            return t

        return run

    gc.collect()
    samples = C.interleaved({k: runner(v) for k, v in impls.items()}, repeats, warmup)
    stats = {k: C.summarize(v) for k, v in samples.items()}
    conflicts = {k: impls[k].conflicted() for k in impls if impls[k].conflicted() is not None}
    med = {k: v["median_s"] for k, v in stats.items()}

    elem = 4
    res: dict[str, Any] = {
        "shape": {
            "name": shape.name,
            "d": shape.d,
            "layers": shape.layers,
            "vocab": shape.vocab,
            "numel": numel,
            "n_tensors": len(params),
            "largest_tensor_numel": max(p.numel() for p in params),
            "dtype": "float32",
        },
        "repeats": repeats,
        "warmup": warmup,
        "methods": {k: {**stats[k], "samples_s": samples[k]} for k in stats},
        "conflict_every_step": conflicts,
        "gru_kernels": impls["gru"].kernels if isinstance(impls.get("gru"), _GRUWrapper) else None,
    }
    ratios: dict[str, float] = {}
    if "gru" in med:
        for other in ("adamw", "adamw_fused", "reference", "pcgrad", "gru_core", "gru_foreach"):
            if other in med:
                ratios[f"gru_over_{other}"] = med["gru"] / med[other]
        if "reference" in med:
            ratios["reference_over_gru"] = med["reference"] / med["gru"]
        if "pcgrad" in med:
            ratios["pcgrad_over_gru"] = med["pcgrad"] / med["gru"]
    if "gru_nocheck" in med:
        for other in ("adamw", "adamw_fused"):
            if other in med:
                ratios[f"gru_nocheck_over_{other}"] = med["gru_nocheck"] / med[other]
    if "gru_core" in med:
        for other in ("adamw", "reference"):
            if other in med:
                ratios[f"gru_core_over_{other}"] = med["gru_core"] / med[other]
        if "reference" in med:
            ratios["reference_over_gru_core"] = med["reference"] / med["gru_core"]
    res["ratios"] = ratios
    if "gru" in med:
        for k in (2, 4, 8):
            if f"gru_k{k}" in med:
                ratios[f"gru_k{k}_over_gru"] = med[f"gru_k{k}"] / med["gru"]
                ratios[f"gru_k{k}_over_adamw"] = med[f"gru_k{k}"] / med["adamw"]
    if "triad" in med:
        bw = 3 * elem * numel / med["triad"]
        t_bound = GRU_MIN_BYTES_PER_ELEM * numel / bw
        res["bandwidth"] = {
            "triad_bandwidth_GBps": bw / 1e9,
            "copy_bandwidth_GBps": 2 * elem * numel / med["copy"] / 1e9 if "copy" in med else None,
            "adamw_fused_bandwidth_GBps": (
                ADAMW_MIN_BYTES_PER_ELEM * numel / med["adamw_fused"] / 1e9
                if "adamw_fused" in med
                else None
            ),
            "gru_wrapper_bandwidth_GBps": GRU_WRAPPER_BYTES_PER_ELEM * numel / med["gru"] / 1e9
            if "gru" in med
            else None,
            "gru_wrapper_bound_s": GRU_WRAPPER_BYTES_PER_ELEM * numel / bw,
            "gru_foreach_bandwidth_GBps": GRU_FOREACH_BYTES_PER_ELEM
            * numel
            / med["gru_foreach"]
            / 1e9
            if "gru_foreach" in med
            else None,
            "gru_foreach_bytes_per_param_actual": GRU_FOREACH_BYTES_PER_ELEM,
            "gru_nocheck_bandwidth_GBps": GRU_NOCHECK_BYTES_PER_ELEM
            * numel
            / med["gru_nocheck"]
            / 1e9
            if "gru_nocheck" in med
            else None,
            "gru_nocheck_bytes_per_param_actual": GRU_NOCHECK_BYTES_PER_ELEM,
            "gru_min_bytes_per_param": GRU_MIN_BYTES_PER_ELEM,
            "gru_min_bytes": GRU_MIN_BYTES_PER_ELEM * numel,
            "gru_bound_s": t_bound,
            "gru_wrapper_bytes_per_param_actual": GRU_WRAPPER_BYTES_PER_ELEM,
            "gru_core_bytes_per_param_actual": GRU_CORE_BYTES_PER_ELEM,
            "adamw_min_bytes_per_param": ADAMW_MIN_BYTES_PER_ELEM,
        }
        for k in (
            "gru",
            "gru_nocheck",
            "gru_foreach",
            "gru_core",
            "adamw",
            "adamw_fused",
            "reference",
            "pcgrad",
        ):
            if k in med:
                res["bandwidth"][f"{k}_over_bound"] = med[k] / t_bound
    if res.get("gru_kernels") == "cpu":
        res["cpu_passes"] = pass_breakdown(params, repeats)
    if verbose:
        print_step_table(res)
    return res


# Bytes each of the CPU kernels' passes moves per fp32 parameter, and what it does.
PASSES = {
    "sum_squares": (4, "retain norm: read g"),
    "fold": (12, "fold: read g and m, write m"),
    "stats": (8, "forget statistics: read g and m"),
    "project": (12, "projection: read g and m, write g"),
    "adamw_fused": (ADAMW_MIN_BYTES_PER_ELEM, "fused AdamW step (for comparison)"),
}


def pass_breakdown(params: list[torch.Tensor], repeats: int) -> dict[str, Any] | None:
    """Each pass of the CPU kernels alone over the same tensors (interleaved repeats),
    and one fused AdamW step beside them: milliseconds and effective bandwidth, warm (right
    after an untimed run of the same pass) and right after the gradients were rewritten
    (an untimed copy into them, as a backward writes them: the pass then also pays for
    writing those dirty cache lines back). ``None`` where the CPU kernels do not run."""
    from gru_optim.kernels import _native

    if _native.native_reason() is not None:
        return None
    grads = [p.grad.detach() for p in params if p.grad is not None]
    src = [g.clone() for g in grads]
    ema = [torch.randn_like(g) for g in grads]
    n = len(grads)
    gammas = torch.full((n,), GAMMA, dtype=torch.float64)
    coefs = torch.full((n,), 1e-12, dtype=torch.float64)  # nonzero: every tensor is written
    open_, closed = torch.ones((), dtype=torch.bool), torch.zeros((), dtype=torch.bool)
    twins = [torch.nn.Parameter(g.detach().clone()) for g in grads]
    for t, g in zip(twins, grads):
        t.grad = g  # AdamW reads the same gradients
    adamw = torch.optim.AdamW(twins, lr=1e-12, fused=True)
    adamw.step()  # its state exists before the timing

    passes: dict[str, Callable[[], Any]] = {
        "sum_squares": lambda: _native.sum_squares(grads),
        "fold": lambda: _native.fold_(ema, grads, gammas, open_),
        "stats": lambda: _native.stats(grads, ema),
        "project": lambda: _native.project_(grads, ema, coefs, closed),
        "adamw_fused": adamw.step,
    }

    def timed(fn: Callable[[], Any], rewrite: bool) -> Callable[[], float]:
        def run() -> float:
            if rewrite:
                torch._foreach_copy_(grads, src)
            else:
                fn()  # warm: the same pass just ran (untimed)
            t0 = C.clock()
            fn()
            return C.clock() - t0

        return run

    fns = {}
    for k, f in passes.items():
        fns[k] = timed(f, False)
        fns[f"{k}|after_write"] = timed(f, True)
    samples = C.interleaved(fns, repeats, 1)
    numel = sum(g.numel() for g in grads)
    out: dict[str, Any] = {}
    for key, xs in samples.items():
        k, _, cond = key.partition("|")
        st = C.summarize(xs)
        row = out.setdefault(k, {"bytes_per_param": PASSES[k][0]})
        tag = "after_write" if cond else "warm"
        row[tag] = {**st, "GBps": PASSES[k][0] * numel / st["median_s"] / 1e9}
    return {"threads": torch.get_num_threads(), "passes": out}


def step_rows(res: dict[str, Any]) -> list[list[Any]]:
    med = {k: v["median_s"] for k, v in res["methods"].items()}
    base = med.get("adamw")
    bound = res.get("bandwidth", {}).get("gru_bound_s")
    rows = []
    for k, v in res["methods"].items():
        rows.append(
            [
                METHOD_LABELS.get(k, k),
                v["median_s"] * 1e3,
                v["q1_s"] * 1e3,
                v["q3_s"] * 1e3,
                v["median_s"] / base if base else float("nan"),
                v["median_s"] / med["gru"] if "gru" in med else float("nan"),
                v["median_s"] / bound if bound else float("nan"),
            ]
        )
    return rows


STEP_HEADERS = [
    "method",
    "median ms",
    "q1 ms",
    "q3 ms",
    "x AdamW foreach",
    "x GRU wrapper",
    "x GRU bound",
]


def print_step_table(res: dict[str, Any]) -> None:
    s = res["shape"]
    C.print_table(
        f"{s['name']}: {s['numel'] / 1e6:.1f}M params in {s['n_tensors']} tensors, "
        f"median of {res['repeats']} interleaved repeats",
        STEP_HEADERS,
        step_rows(res),
    )
    if "bandwidth" in res:
        b = res["bandwidth"]
        print(
            f"triad bandwidth {b['triad_bandwidth_GBps']:.2f} GB/s (fused AdamW reaches "
            f"{b['adamw_fused_bandwidth_GBps'] or float('nan'):.2f}); GRU's fused passes move "
            f"{b['gru_min_bytes_per_param']} B/param -> bound {b['gru_bound_s'] * 1e3:.1f} ms; "
            f"the foreach path moves {b['gru_foreach_bytes_per_param_actual']} B/param; GRU "
            f"wrapper ({res.get('gru_kernels')}) at "
            f"{b.get('gru_over_bound', float('nan')):.2f}x the bound"
        )
    print("ratios:", {k: round(v, 3) for k, v in res["ratios"].items()})


def markdown(res: dict[str, Any]) -> str:
    s = res["shape"]
    b = res.get("bandwidth", {})
    lines = [
        f"{s['numel'] / 1e6:.1f}M fp32 parameters in {s['n_tensors']} tensors "
        f"(d={s['d']}, {s['layers']} layers, vocab {s['vocab']}); median of "
        f"{res['repeats']} interleaved repeats; every step conflicted: "
        f"{res['conflict_every_step']}.",
        "",
        C.markdown_table(STEP_HEADERS, step_rows(res)),
    ]
    if b:
        lines += [
            "",
            f"Bandwidth measured in the same run: STREAM triad on preallocated buffers "
            f"{b['triad_bandwidth_GBps']:.2f} GB/s; fused AdamW's own effective bandwidth "
            f"{b['adamw_fused_bandwidth_GBps'] or float('nan'):.2f} GB/s "
            f"({ADAMW_MIN_BYTES_PER_ELEM} B/param); the GRU wrapper's "
            f"{b['gru_wrapper_bandwidth_GBps'] or float('nan'):.2f} GB/s "
            f"({b['gru_wrapper_bytes_per_param_actual']} B/param, kernels "
            f"{res.get('gru_kernels')!r}); with fused=False "
            f"{b.get('gru_foreach_bandwidth_GBps') or float('nan'):.2f} GB/s "
            f"({b['gru_foreach_bytes_per_param_actual']} B/param); with "
            f"skip_nonfinite=False {b.get('gru_nocheck_bandwidth_GBps') or float('nan'):.2f}"
            f" GB/s ({b.get('gru_nocheck_bytes_per_param_actual')} B/param). The fused "
            f"passes move "
            f"{b['gru_min_bytes_per_param']} B per fp32 parameter "
            f"({b['gru_min_bytes'] / 1e6:.0f} MB here): a bound of "
            f"{b['gru_bound_s'] * 1e3:.1f} ms at the triad's bandwidth; the wrapper takes "
            f"{b.get('gru_over_bound', float('nan')):.2f}x that bound.",
        ]
    cp = res.get("cpu_passes")
    if cp:
        rows = [
            [
                PASSES[k][1],
                v["bytes_per_param"],
                v["warm"]["median_s"] * 1e3,
                v["warm"]["GBps"],
                v["after_write"]["median_s"] * 1e3,
                v["after_write"]["GBps"],
            ]
            for k, v in cp["passes"].items()
        ]
        lines += [
            "",
            f"The CPU kernels' passes one at a time over the same gradients ({cp['threads']} "
            "threads, interleaved repeats), warm (right after an untimed run of the same pass) "
            "and right after an untimed copy into the "
            "gradients (as a backward writes them: the pass then also pays for writing "
            "those cache lines back), with one fused AdamW step under the same conditions:",
            "",
            C.markdown_table(
                ["pass", "B/param", "warm ms", "warm GB/s", "after a write ms", "GB/s"], rows
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few repeats (smoke)")
    ap.add_argument("--size", default=None, help=f"one of {list(C.SHAPES)} (default 30M)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None, help="results folder (default docs/results)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default 1)")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    C.set_threads(args.threads)
    shape = C.TINY if args.quick else C.SHAPES[args.size or "30M"]
    repeats = args.repeats or (3 if args.quick else 15)
    res = measure(shape, repeats=repeats, warmup=1 if args.quick else 2)
    payload = {"benchmark": "step", "quick": args.quick, "env": C.environment(), **res}
    from pathlib import Path

    out = Path(args.out) if args.out else None
    C.write_json("bench_step", payload, out)
    md = markdown(res)
    C.write_markdown("bench_step", md, out)
    if out is None and not args.no_doc and not args.quick:
        C.update_doc_section("bench_step", md)
    return payload


if __name__ == "__main__":
    main()
