"""GRU's passes on CPU tensors as compiled C++ (``csrc/gru_cpu.cpp``): the CPU's fused path.

The same four functions as the Triton kernels of :mod:`gru_optim.kernels._triton` (and the same
contract: one call per pass over all tensors of a group, sums in float64 in a fixed order
that does not depend on the number of threads, decisions read from 0-dim tensors), for CPU
tensors without Triton. A pass is one C++ call over every tensor of the group, threaded
over fixed chunks of elements with ``torch.get_num_threads()`` threads.

The library is built on first use with the system C++ compiler (``$CXX``, split into
words as a shell would, so a launcher such as ``ccache c++`` works; else ``c++``, ``g++``
or ``clang++``; plain C++17, no Python or torch headers, about 15 s) and cached by the
hash of its source, the compiler and the CPU under ``$GRU_OPTIM_CACHE`` (default
``~/.cache/gru_optim``). Where no compiler is found or the build fails, :func:`native_reason`
says why and ``GRUOptimizer`` uses the foreach path (with a
:class:`~gru_optim.kernels.KernelFallbackWarning`). ``GRU_OPTIM_NATIVE=0`` turns it off.
The tables the passes read come from :func:`gru_optim.kernels._plan.plan`, shared with
the Triton kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._plan import Plan, plan

__all__ = [
    "build",
    "fold_",
    "native_reason",
    "project_",
    "stats",
    "sum_squares",
    "turned_off",
]

_SOURCE = Path(__file__).with_name("csrc") / "gru_cpu.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-pthread"]
_ABI = 3
_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


def _cache_dir() -> Path:
    env = os.environ.get("GRU_OPTIM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gru_optim"


def _compiler() -> tuple[list[str] | None, str | None]:
    """The compiler command (``$CXX`` split as a shell would: ``ccache c++`` is a launcher
    and its compiler), or ``None`` and why not."""
    cxx = os.environ.get("CXX", "").strip()
    if not cxx:
        found = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if found is None:
            return None, "no C++ compiler found (set CXX) to build the CPU kernels"
        return [found], None
    try:
        words = shlex.split(cxx)
    except ValueError as e:
        return None, f"CXX={cxx!r} cannot be split into words ({e})"
    first = shutil.which(words[0]) or (words[0] if os.path.isfile(words[0]) else None)
    if first is None:
        if len(words) == 1:
            return None, f"the C++ compiler CXX={cxx!r} was not found"
        return None, f"the compiler launcher {words[0]!r} of CXX={cxx!r} was not found"
    return [first, *words[1:]], None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _build(cxx: Sequence[str]) -> Path:
    """Compile the library with the command ``cxx`` (or find it in the cache) and return
    its path."""
    version = subprocess.run(
        [*cxx, "--version"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    key = hashlib.sha256(
        b"\0".join(
            x.encode()
            for x in (
                _SOURCE.read_text(),
                shlex.join(cxx),
                version,
                " ".join(_FLAGS),
                _cpu_id(),
                str(_ABI),
            )
        )
    ).hexdigest()[:16]
    out = _cache_dir() / f"gru_cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed into place: processes that build at the
    # same time (two ranks) never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run(
            [*cxx, *_FLAGS, "-o", tmp, str(_SOURCE)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(cxx)} failed: {(res.stderr or res.stdout).strip()[-2000:]}"
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


_OFF = ("0", "false", "no", "off", "n")


def turned_off() -> bool:
    """Whether ``GRU_OPTIM_NATIVE=0`` (or another false value) turns the CPU kernels off."""
    return os.environ.get("GRU_OPTIM_NATIVE", "").strip().lower() in _OFF


@functools.cache
def _load() -> tuple[Any, str | None]:
    """The loaded library, or ``None`` and why not."""
    if turned_off():
        return None, "the CPU kernels are turned off (GRU_OPTIM_NATIVE=0)"
    cxx, why = _compiler()
    if cxx is None:
        return None, why
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"the CPU kernels could not be built: {e}"
    if lib.gru_cpu_abi() != _ABI:
        return None, "the cached CPU kernels are of another version"
    for name, args in {
        "gru_cpu_sumsq": [_I64, _P, _P, _INT, _P, _INT],
        "gru_cpu_stats": [_I64, _P, _P, _P, _INT, _INT, _P, _INT],
        "gru_cpu_fold": [_I64, _P, _P, _P, _INT, _INT, _P, _P, _P, _INT],
        "gru_cpu_project": [_I64, _P, _P, _P, _INT, _INT, _P, _P, _INT],
    }.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = _INT
    return lib, None


def native_reason() -> str | None:
    """Why the CPU kernels cannot run (``None``: they can). Builds them on first call."""
    return _load()[1]


def build() -> None:
    """Build the CPU kernels now (``make`` does, so that no test waits for the compiler);
    raises if they cannot be built."""
    reason = native_reason()
    if reason is not None:
        raise RuntimeError(reason)


def _lib() -> Any:
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(reason)
    return lib


def _accept(x: Tensor) -> None:
    if x.device.type != "cpu":
        raise ValueError("the CPU kernels need contiguous CPU tensors")
    if x.dtype not in _CODES:
        raise TypeError(f"the CPU kernels take floating tensors, not {x.dtype}")


def _tables(*roles: Sequence[Tensor]) -> Plan:
    """The pointer and size tables of ``roles`` (:func:`~gru_optim.kernels._plan.plan`)."""
    return plan(roles, accept=_accept)


def _ptr(t: Tensor) -> _P:
    return _P(t.data_ptr())


def _check(rc: int) -> None:
    if rc != 0:  # only an unknown dtype code: _tables refuses those first
        raise RuntimeError("the CPU kernels refused a dtype")


def sum_squares(tensors: Sequence[Tensor]) -> Tensor:
    """``|t|^2`` of every tensor (one group: same dtype), float64."""
    t = _tables(tensors)
    out = torch.empty(t.n, dtype=torch.float64)
    _check(
        _lib().gru_cpu_sumsq(
            t.n,
            _ptr(t.ptrs[0]),
            _ptr(t.sizes),
            _CODES[tensors[0].dtype],
            _ptr(out),
            torch.get_num_threads(),
        )
    )
    return out


def stats(grads: Sequence[Tensor], ema: Sequence[Tensor]) -> Tensor:
    """``(n, 3)`` float64: ``<g, m>``, ``|g|^2``, ``|m|^2`` per tensor pair, one pass."""
    t = _tables(grads, ema)
    out = torch.empty((t.n, 3), dtype=torch.float64)
    _check(
        _lib().gru_cpu_stats(
            t.n,
            _ptr(t.ptrs[0]),
            _ptr(t.ptrs[1]),
            _ptr(t.sizes),
            _CODES[grads[0].dtype],
            _CODES[ema[0].dtype],
            _ptr(out),
            torch.get_num_threads(),
        )
    )
    return out


def _scalars(values: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    v = values.detach().to("cpu", dtype).contiguous()
    if v.numel() != n:
        raise ValueError(f"expected {n} values, got {v.numel()}")
    return v


def _elementwise(
    name: str,
    grads: Sequence[Tensor],
    ema: Sequence[Tensor],
    values: Tensor,
    flag: Tensor,
    *extra: Any,
) -> None:
    """Run the pairwise elementwise pass ``name`` over (gradient, memory) pairs with one
    float64 value per pair and a 0-dim flag (``extra``: more arguments before the thread
    count)."""
    t = _tables(grads, ema)
    v = _scalars(values, t.n, torch.float64)
    f = _scalars(flag.reshape(1), 1, torch.int32)
    _check(
        getattr(_lib(), name)(
            t.n,
            _ptr(t.ptrs[0]),
            _ptr(t.ptrs[1]),
            _ptr(t.sizes),
            _CODES[grads[0].dtype],
            _CODES[ema[0].dtype],
            _ptr(v),
            _ptr(f),
            *extra,
            torch.get_num_threads(),
        )
    )


def fold_(
    ema: Sequence[Tensor],
    grads: Sequence[Tensor],
    gammas: Tensor,
    gate: Tensor,
    *,
    sq_norms: bool = False,
) -> Tensor | None:
    """``m <- lerp(m, g, gamma_i)`` for every pair where the 0-dim ``gate`` is true; with
    ``sq_norms``, also returns ``|g_i|^2`` (float64, as :func:`sum_squares` computes it)
    from the same pass, whatever the gate says."""
    out = torch.empty(len(grads), dtype=torch.float64) if sq_norms else None
    _elementwise("gru_cpu_fold", grads, ema, gammas, gate, _ptr(out) if out is not None else None)
    return out


def project_(grads: Sequence[Tensor], ema: Sequence[Tensor], coefs: Tensor, skip: Tensor) -> None:
    """``g_i <- g_i - coefs_i m_i`` unless the 0-dim ``skip`` is true (a tensor whose
    coefficient is zero in the compute dtype is not touched)."""
    _elementwise("gru_cpu_project", grads, ema, coefs, skip)
