"""Collectives per optimizer step: what GRU adds under DDP and FSDP2, and how many bytes.

Runs ``--world`` real processes (gloo on the CPU by default, NCCL with ``--backend nccl``)
and, for each setting, counts every collective issued during one training iteration
(retain forward/backward, forget forward/backward, optimizer step) with a counting
wrapper around the real ``torch.distributed`` functions (each call still performs the
real collective; DDP's bucket all-reduces are counted through a DDP communication hook).
The baseline is the same iteration with the plain inner optimizer (both backward passes,
no GRU), so ``GRU adds`` is exactly the difference.

    python benchmarks/bench_collectives.py                 # 2 CPU processes
    python benchmarks/bench_collectives.py --json out.json --d 512 --layers 8

Times are medians over ``--steps`` iterations after one warm-up; on a shared CPU they are
indicative only. The counts and bytes do not depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gru_optim import GRUOptimizer  # noqa: E402

COLLECTIVES = (
    "all_reduce",
    "all_gather_single",
    "reduce_scatter_single",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_gather",
    "broadcast",
    "reduce_scatter",
)


class MLP(nn.Module):
    def __init__(self, d: int, layers: int, classes: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, d), nn.GELU()) for _ in range(layers)
        )
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


class Counter:
    """Collectives recorded as (name, bytes); ``bytes`` is the larger tensor argument
    (the payload of an all-reduce, the gathered output, the scattered input)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def patch(self) -> Iterator[None]:
        saved = {}
        for name in COLLECTIVES:
            real = getattr(dist, name, None)
            if real is None:
                continue
            saved[name] = real
            setattr(dist, name, self._wrap(name, real))
        try:
            yield
        finally:
            for name, real in saved.items():
                setattr(dist, name, real)

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def counting(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)]
            lists = [a for a in args if isinstance(a, list) and a and isinstance(a[0], Tensor)]
            size = max([t.numel() * t.element_size() for t in tensors] + [0])
            size = max([size] + [sum(t.numel() * t.element_size() for t in lst) for lst in lists])
            self.calls.append((name, size))
            return real(*args, **kwargs)

        return counting

    def ddp_hook(self) -> Callable[..., Any]:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations
            buf = bucket.buffer()
            self.calls.append(("all_reduce (DDP bucket)", buf.numel() * buf.element_size()))
            return allreduce_hook(state, bucket)

        return hook


SETTINGS: dict[str, dict[str, Any] | None] = {
    "plain AdamW (baseline)": None,
    "GRU global (default)": {},
    "GRU global, skip_nonfinite=False": {"skip_nonfinite": False},
    "GRU per tensor": {"granularity": "tensor"},
    "GRU per group": {"granularity": "group"},
    "GRU retain_weight=1": {"retain_weight": 1.0},
    "GRU space='update'": {"space": "update"},
}


def build(mode: str, args: argparse.Namespace, counter: Counter, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = MLP(args.d, args.layers).to(device)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for b in model.blocks:
            fully_shard(b)
        fully_shard(model)
        return model
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(None, counter.ddp_hook())
    return ddp


def run_setting(
    mode: str, gru: dict[str, Any] | None, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    counter = Counter()
    model = build(mode, args, counter, device)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt: torch.optim.Optimizer = inner if gru is None else GRUOptimizer(inner, **gru)
    g = torch.Generator().manual_seed(dist.get_rank())
    xf, xr = (torch.randn(args.batch, args.d, generator=g).to(device) for _ in range(2))
    yf, yr = (torch.randint(0, 16, (args.batch,), generator=g).to(device) for _ in range(2))

    def iteration() -> None:
        def forget() -> Tensor:
            loss = -F.cross_entropy(model(xf), yf)
            loss.backward()
            return loss

        def retain() -> Tensor:
            loss = F.cross_entropy(model(xr), yr)
            loss.backward()
            return loss

        opt.zero_grad()
        if isinstance(opt, GRUOptimizer):
            opt.step(forget, retain)
        else:  # the same two backward passes, the plain step on their sum
            retain()
            forget()
            opt.step()

    iteration()  # warm-up (lazy state)
    times, per_step = [], []
    for _ in range(args.steps):
        counter.calls.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        with counter.patch():
            t0 = time.perf_counter()
            iteration()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        per_step.append(list(counter.calls))
    calls = per_step[-1]
    assert all(len(c) == len(calls) for c in per_step), "collectives differ between steps"
    return {
        "collectives": len(calls),
        "bytes": sum(b for _, b in calls),
        "calls": calls,
        "ms_per_step": 1e3 * statistics.median(times),
    }


def worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    backend = args.backend
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=300),
    )
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results: dict[str, Any] = {}
    try:
        for mode in args.modes:
            for name, gru in SETTINGS.items():
                results[f"{mode}|{name}"] = run_setting(mode, gru, args, device)
    except Exception:
        results = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    params = list(MLP(args.d, args.layers).parameters())
    n_params = sum(p.numel() for p in params)
    lines = [
        f"# Collectives per step, {args.world} processes ({args.backend}), MLP d={args.d} "
        f"layers={args.layers}: {n_params:,} parameters, {len(params)} tensors",
        "",
    ]
    for mode in args.modes:
        base = results[f"{mode}|plain AdamW (baseline)"]
        lines += [
            f"## {mode.upper()}",
            "",
            "| setting | collectives / step | bytes / step "
            "| GRU adds (collectives, bytes) | ms / step |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in SETTINGS:
            r = results[f"{mode}|{name}"]
            added = (r["collectives"] - base["collectives"], r["bytes"] - base["bytes"])
            lines.append(
                f"| {name} | {r['collectives']} | {r['bytes']:,} | "
                f"{added[0]:+d}, {added[1]:+,d} B | {r['ms_per_step']:.1f} |"
            )
        gru_calls = [
            c for c in results[f"{mode}|GRU global (default)"]["calls"] if c not in base["calls"]
        ]
        lines += ["", f"GRU's own calls (global, default): {gru_calls}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--modes", nargs="+", default=["fsdp2", "ddp"], choices=["fsdp2", "ddp"])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(worker, args=(args, port, out), nprocs=args.world)
        with open(out) as f:
            results = json.load(f)
    if "error" in results:
        raise SystemExit(results["error"])
    print(report(results, args))
    if args.json:
        payload = {"config": vars(args), "torch": torch.__version__, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
