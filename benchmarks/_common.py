"""Shared pieces of the benchmarks: model shapes, interleaved timing, output files.

Everything here is deliberately small and dependency-free (torch only; matplotlib is
imported lazily by the plotting helper).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DOC = ROOT / "docs" / "benchmarks.md"

if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """A GPT-style decoder: token and position embeddings, ``layers`` blocks of
    (LayerNorm, fused QKV, output projection, LayerNorm, 4x MLP), a final LayerNorm.
    The LM head is tied to the token embedding (as in GPT-2)."""

    name: str
    d: int
    layers: int
    vocab: int
    ctx: int = 1024

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        d = self.d
        out: list[tuple[str, tuple[int, ...]]] = [
            ("wte", (self.vocab, d)),
            ("wpe", (self.ctx, d)),
        ]
        for i in range(self.layers):
            out += [
                (f"h{i}.ln1.w", (d,)),
                (f"h{i}.ln1.b", (d,)),
                (f"h{i}.attn.qkv.w", (3 * d, d)),
                (f"h{i}.attn.qkv.b", (3 * d,)),
                (f"h{i}.attn.out.w", (d, d)),
                (f"h{i}.attn.out.b", (d,)),
                (f"h{i}.ln2.w", (d,)),
                (f"h{i}.ln2.b", (d,)),
                (f"h{i}.mlp.fc.w", (4 * d, d)),
                (f"h{i}.mlp.fc.b", (4 * d,)),
                (f"h{i}.mlp.proj.w", (d, 4 * d)),
                (f"h{i}.mlp.proj.b", (d,)),
            ]
        out += [("lnf.w", (d,)), ("lnf.b", (d,))]
        return out

    @property
    def numel(self) -> int:
        total = 0
        for _, s in self.shapes():
            n = 1
            for k in s:
                n *= k
            total += n
        return total

    @property
    def n_tensors(self) -> int:
        return len(self.shapes())


# The sizes of the scaling sweep. "30M" (100 tensors) is the headline case of issue 6.
SHAPES: dict[str, ModelShape] = {
    "1M": ModelShape("1M", d=128, layers=4, vocab=4096, ctx=256),
    "10M": ModelShape("10M", d=320, layers=6, vocab=8192, ctx=512),
    "30M": ModelShape("30M", d=512, layers=8, vocab=8192, ctx=1024),
    "100M": ModelShape("100M", d=768, layers=12, vocab=32768, ctx=1024),
    "300M": ModelShape("300M", d=1024, layers=24, vocab=32768, ctx=1024),
}
# A tiny case for smoke tests (a few hundred thousand parameters).
TINY = ModelShape("tiny", d=64, layers=2, vocab=1024, ctx=64)


def make_params(
    shape: ModelShape, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _, s in shape.shapes():
        t = torch.randn(s, generator=g, dtype=torch.float32).mul_(0.02)
        out.append(torch.nn.Parameter(t.to(device=device, dtype=dtype)))
    return out


def store_grads(params: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """Stand in for a backward pass: leave ``src`` in ``.grad`` as autograd would, in a
    new tensor where ``.grad`` is ``None`` (GRU clears the retain gradient that way), in
    place otherwise. Not timed by the benchmarks."""
    for p, s in zip(params, src):
        if p.grad is None:
            p.grad = s.detach().clone()
        else:
            p.grad.copy_(s)


# --------------------------------------------------------------------------- timing
def sync(device: str | torch.device = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], float]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each ``fn`` (which returns its own measured seconds) in the order
    A, B, C, A, B, C, ... ``repeats`` times after ``warmup`` rounds; return all samples.

    Interleaving spreads the noise of a shared machine evenly over the methods; the
    caller reports medians.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(fn())
    return samples


def summarize(samples: Sequence[float]) -> dict[str, float]:
    s = sorted(samples)
    n = len(s)
    q1 = s[max(0, (n - 1) // 4)]
    q3 = s[min(n - 1, (3 * (n - 1) + 3) // 4)]
    return {
        "median_s": statistics.median(s),
        "min_s": s[0],
        "q1_s": q1,
        "q3_s": q3,
        "n": n,
    }


def clock() -> float:
    return time.perf_counter()


# --------------------------------------------------------------------------- env
def environment(device: str = "cpu") -> dict[str, Any]:
    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
        if m:
            env["cpu_model"] = m.group(1).strip()
    except OSError:
        pass
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- output
def write_json(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    out = (out_dir or RESULTS) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "n/a"
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(v) for v in r) + " |")
    return "\n".join(lines)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n## {title}\n")
    print(markdown_table(headers, rows))
    print(flush=True)


def write_markdown(name: str, text: str, out_dir: Path | None = None) -> Path:
    out = (out_dir or RESULTS) / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.rstrip() + "\n")
    return out


def update_doc_section(marker: str, text: str, doc: Path = DOC) -> bool:
    """Replace the text between ``<!-- BEGIN marker -->`` and ``<!-- END marker -->``
    in ``doc`` (the generated parts of docs/benchmarks.md). Returns whether it did."""
    if not doc.exists():
        return False
    src = doc.read_text()
    begin, end = f"<!-- BEGIN {marker} -->", f"<!-- END {marker} -->"
    i, j = src.find(begin), src.find(end)
    if i < 0 or j < i:
        return False
    new = src[: i + len(begin)] + "\n" + text.rstrip() + "\n" + src[j:]
    if new != src:
        doc.write_text(new)
    return True


def mib(n: float) -> float:
    return n / 2**20


def gib(n: float) -> float:
    return n / 2**30


# --------------------------------------------------------------------------- threads
DEFAULT_THREADS = int(os.environ.get("GRU_BENCH_THREADS", "1"))


def set_threads(n: int | None) -> int:
    """Use ``n`` intra-op threads (default 1, or $GRU_BENCH_THREADS).

    One thread by default: on a small machine shared with other jobs, every OpenMP
    parallel region waits at a barrier for a thread that the kernel has descheduled,
    which makes each kernel launch cost milliseconds and measures the neighbours, not
    the code. All methods run with the same setting, so the ratios stay like for like.
    """
    n = DEFAULT_THREADS if n is None else n
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()
