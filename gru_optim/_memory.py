"""The retain memory: one buffer per parameter, ``m_t = gamma g_r + (1 - gamma) m_{t-1}``.

It is kept here, never in the inner optimizer's ``state``: torch's optimizers (Adam,
AdamW, RMSprop, ...) initialise a parameter's state lazily when its entry is empty, so a
key written there before their first step would break them. ``state_dict()`` merges the
buffers into each parameter's entry under :data:`EMA_KEY`, and ``load_state_dict``
takes them out again.

Conventions, in this one place:

- dtype: float32, or the parameter's dtype when that is float64, unless ``ema_dtype``
  says otherwise (``torch.bfloat16`` halves the memory);
- a parameter gets a buffer at its first retain gradient; while it has none its memory
  decays by ``1 - gamma`` per fold (with ``gamma = 1`` it becomes exactly zero and is
  dropped); a frozen parameter (``requires_grad=False``) is left out of folds;
- an all-zero memory is no memory: ``state_dict`` writes zeros for trainable parameters
  without one (so a template from a fresh optimizer has every key), and loading reads
  zeros back as no memory;
- for DTensor parameters (FSDP2) the buffer is a DTensor sharded like the parameter, and
  every operation works on the local shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ._functional import ema_update_
from ._reduce import Reducer, local

__all__ = ["EMA_KEY", "RetainMemory"]

EMA_KEY = "gru_ema"
"""Key of the retain memory in each parameter's entry of ``state_dict()["state"]``."""


class RetainMemory:
    """The buffers of the retain memory, by parameter."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"ema_dtype must be a floating dtype or None, got {dtype!r}")
        self.dtype = dtype
        self._buffers: dict[Tensor, Tensor] = {}

    # ------------------------------------------------------------------ access
    def dtype_for(self, p: Tensor) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def get(self, p: Tensor) -> Tensor | None:
        return self._buffers.get(p)

    def __contains__(self, p: Tensor) -> bool:
        return p in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def params(self) -> list[Tensor]:
        return list(self._buffers)

    def locals(self, params: Sequence[Tensor]) -> list[Tensor | None]:
        """The local shard of each parameter's buffer (``None`` without one)."""
        return [None if (m := self._buffers.get(p)) is None else local(m) for p in params]

    def zeros(self, p: Tensor) -> Tensor:
        """A zero buffer for ``p`` (``m_0``)."""
        return torch.zeros_like(p, dtype=self.dtype_for(p), memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ the fold
    def overflow_risk(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor | None:
        """A 0-dim flag: folding ``grads`` would overflow a buffer's dtype.

        Only a memory dtype whose range is narrower than where the gradients' squared
        norms overflow (float16, max 65504) can overflow: a convex combination of finite
        values never leaves their range otherwise. ``None`` when no buffer is at risk.
        """
        risky = []
        limit = float("inf")
        for p, g in zip(params, grads):
            top = torch.finfo(self.dtype_for(p)).max
            if top < 1e19 and top < torch.finfo(g.dtype).max:
                risky.append(g)
                limit = min(limit, top)
        if not risky:
            return None
        peak = torch.stack([n.float() for n in torch._foreach_norm(risky, float("inf"))]).max()
        return peak > limit

    def fold_(
        self,
        with_grad: Sequence[Tensor],
        grads: Sequence[Tensor],
        trainable: Iterable[Tensor],
        gamma: dict[int, float],
        *,
        foreach: bool | None = None,
    ) -> None:
        """Fold this step's retain gradients (local shards ``grads`` of ``with_grad``)
        into the memory, each parameter with its own ``gamma[id(p)]``; trainable
        parameters with a memory but no retain gradient this step decay."""
        for p in with_grad:
            if p not in self._buffers:
                self._buffers[p] = self.zeros(p)
        by_gamma: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
        for p, g in zip(with_grad, grads):
            ms, gs = by_gamma.setdefault(gamma[id(p)], ([], []))
            ms.append(local(self._buffers[p]))
            gs.append(g)
        for gm, (ms, gs) in by_gamma.items():
            ema_update_(ms, gs, gm, foreach=foreach)
        present = {id(p) for p in with_grad}
        decay: dict[float, list[Tensor]] = {}
        for p in trainable:
            if p in self._buffers and id(p) not in present:
                gm = gamma[id(p)]
                if gm == 1.0:
                    # m = 1 * 0 + 0 * m is exactly zero: no memory, as a reloaded
                    # checkpoint reads an all-zero memory.
                    del self._buffers[p]
                else:
                    decay.setdefault(gm, []).append(local(self._buffers[p]))
        for gm, ms in decay.items():
            torch._foreach_mul_(ms, 1.0 - gm)

    # ------------------------------------------------------------------ checkpoints
    def entry(self, p: Tensor) -> Tensor:
        """What ``state_dict`` saves for ``p``: its buffer, or zeros."""
        m = self._buffers.get(p)
        return m if m is not None else self.zeros(p)

    @staticmethod
    def check_entry(p: Tensor, m: object, where: str) -> Tensor:
        """Validate a saved buffer for ``p`` (raises before anything is loaded)."""
        if not isinstance(m, Tensor):
            raise ValueError(
                f"retain memory of {where} is a {type(m).__name__}, not a tensor: the state "
                "dict is corrupt"
            )
        if not m.is_floating_point():
            raise ValueError(f"retain memory of {where} has dtype {m.dtype}, not a floating dtype")
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(
                f"retain memory of {where} has shape {tuple(m.shape)}, the parameter "
                f"{tuple(p.shape)}: the state dict comes from another model"
            )
        return m

    def prepare(self, saved: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """New buffers from validated saved entries (copies, in this memory's dtype);
        all-zero entries are no memory. Non-finite entries raise. The memory itself is
        not changed (:meth:`commit` installs the result). One host read, and one
        collective for sharded memories."""
        new: dict[Tensor, Tensor] = {}
        with torch.no_grad():
            for p, m in saved.items():
                buf = self.zeros(p)
                buf.copy_(m)
                new[p] = buf
            keys = list(new)
            if not keys:
                return new
            first = local(new[keys[0]]).device
            flags = torch.stack(
                [
                    torch.stack(
                        [
                            local(new[q]).ne(0).any().to(first, torch.float32),
                            (~torch.isfinite(local(new[q]))).any().to(first, torch.float32),
                        ]
                    )
                    for q in keys
                ]
            )
            Reducer.for_params(keys).sum_(flags)
            host = flags.tolist()
        bad = sum(1 for _, nf in host if nf > 0)
        if bad:
            raise ValueError(
                f"the retain memory of {bad} parameter(s) in the state dict is not finite "
                "(NaN or infinity): it would disable GRU for good; the checkpoint is corrupt"
            )
        return {q: new[q] for q, (nz, _) in zip(keys, host) if nz > 0}

    def commit(self, buffers: dict[Tensor, Tensor]) -> None:
        """Install buffers made by :meth:`prepare`."""
        self._buffers = buffers

    def drop(self, p: Tensor) -> None:
        self._buffers.pop(p, None)
