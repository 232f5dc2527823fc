"""The memory of a driver that keeps flat fragments of its parameters (one per member,
at ``(start, length)`` in the flattened parameter, as DeepSpeed's ZeRO partitions), saved
one state per process and loaded onto another partitioning (another number of processes,
another ZeRO stage): every piece validated before the memory changes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._memory import RetainMemory

__all__ = ["load_fragments", "save_fragments"]

_FORMAT = 1


def save_fragments(
    memory: RetainMemory,
    keys: list[Tensor],
    names: list[str],
    numels: Sequence[int],
    ranges: Sequence[tuple[int, int]],
    **extra: Any,
) -> dict[str, Any]:
    """This process's memory of the flat members ``keys`` (``names``, full sizes
    ``numels``, fragments ``ranges``), as a state to save (``extra``: recorded as given)."""
    hist = memory.history
    return {
        "format": _FORMAT,
        "names": names,
        "numels": list(numels),
        "ranges": list(ranges),
        **extra,
        "memory": [memory.entry(k).detach().cpu() for k in keys],
        "history": (
            [[h.detach().cpu() for h in memory.history_entry(k)] for k in keys] if hist else None
        ),
    }


def _copy_overlap(dst: Tensor, start: int, src: Tensor, s_start: int, lo: int, hi: int) -> None:
    """``dst[lo - start : hi - start] = src[lo - s_start : hi - s_start]`` (flat tensors
    holding the elements ``start...`` and ``s_start...`` of one flattened parameter)."""
    dst.narrow(0, lo - start, hi - lo).copy_(src.narrow(0, lo - s_start, hi - lo))


def load_fragments(
    files: list[str],
    memory: RetainMemory,
    keys: list[Tensor],
    names: list[str],
    numels: Sequence[int],
    ranges: Sequence[tuple[int, int]],
) -> None:
    """Load this process's fragments (as :func:`save_fragments` describes them) from the
    saved states in ``files`` (all processes'), re-partitioned, into ``memory``."""
    n = len(keys)
    mem: list[Tensor | None] = [None] * n
    hist: list[list[Tensor] | None] = [None] * n
    covered = [0] * n
    for path in files:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if saved.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a GRU memory file of format {_FORMAT}")
        if saved["names"] != names or saved["numels"] != list(numels):
            raise ValueError(
                f"{path}: the memory was saved for other parameters "
                f"({len(saved['names'])} tensors); the checkpoint comes from another model"
            )
        if (saved["history"] is not None) != bool(memory.history):
            raise ValueError(
                f"{path}: saved with {'' if saved['history'] else 'no '}recent retain "
                "gradients (GRU-k); build the driver with the same directions="
            )
        for i, ((start, length), (s_start, s_len)) in enumerate(zip(ranges, saved["ranges"])):
            lo, hi = max(start, s_start), min(start + length, s_start + s_len)
            if hi <= lo:
                continue
            where = f"{names[i]} in {path}"
            src = RetainMemory.check_entry(
                torch.empty(s_len, device="meta"), saved["memory"][i].reshape(-1), where
            )
            m = mem[i]
            if m is None:
                m = mem[i] = torch.zeros(length, dtype=src.dtype)
            _copy_overlap(m, start, src, s_start, lo, hi)
            if saved["history"] is not None:
                olds = saved["history"][i]
                hs = hist[i] = hist[i] or [torch.zeros(length, dtype=src.dtype) for _ in olds]
                for h, old in zip(hs, olds):
                    _copy_overlap(h, start, old.reshape(-1), s_start, lo, hi)
            covered[i] += hi - lo
    missing = [names[i] for i in range(n) if covered[i] < ranges[i][1]]
    if missing:
        raise ValueError(
            f"the GRU memory files in {os.path.dirname(files[0])} do not cover this "
            f"rank's shards of {missing[:3]} (files of some ranks are missing)"
        )
    saved_mem = {k: m for k, m in zip(keys, mem) if m is not None}
    saved_hist = {k: h for k, h in zip(keys, hist) if h is not None}
    memory.commit(memory.prepare(saved_mem, saved_hist or None))
