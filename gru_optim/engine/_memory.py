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
  dropped, or, with GRU-k, kept as zeros beside its recent raw gradients); a frozen
  parameter (``requires_grad=False``) is left out of folds;
- an all-zero memory is no memory: ``state_dict`` writes zeros for trainable parameters
  without one (so a template from a fresh optimizer has every key), and loading reads
  zeros back as no memory (with GRU-k: zeros in the buffer and in every recent raw
  gradient);
- for DTensor parameters (FSDP2) the buffer is a DTensor sharded like the parameter, and
  every operation works on the local shard.

With ``history = k - 1 > 0`` (GRU-k) the memory also keeps the ``k - 1`` most recent raw
retain gradients of every parameter (exactly what each fold folded in: after
accumulation and unscaling, before any ``retain_weight`` scaling; zeros for a step in
which the parameter had no retain gradient), in ``k - 1`` buffers per parameter in the
memory's dtype, written as a ring (no copies on a fold).
They are handed to the rule oldest first, and saved under :data:`HISTORY_KEY`, oldest
first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ..functional import ema_update_
from ..kernels import stack_scalars as _stack_scalars
from ._reduce import Reducer, local

__all__ = ["EMA_KEY", "HISTORY_KEY", "RetainMemory"]

EMA_KEY = "gru_ema"
"""Key of the retain memory in each parameter's entry of ``state_dict()["state"]``."""
HISTORY_KEY = "gru_history"
"""Key of the recent raw retain gradients (GRU-k, ``directions > 1``), a list oldest
first, in each parameter's entry of ``state_dict()["state"]``."""


class RetainMemory:
    """The buffers of the retain memory, by parameter."""

    def __init__(self, dtype: torch.dtype | None = None, history: int = 0) -> None:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"ema_dtype must be a floating dtype or None, got {dtype!r}")
        self.dtype = dtype
        self.history = history
        self._buffers: dict[Tensor, Tensor] = {}
        # Per parameter, ``history`` separately allocated local tensors used as a ring (one
        # allocation each, so every slot has the same alignment: dot products do not
        # depend on which slot a gradient landed in, and resuming is bitwise).
        self._hist: dict[Tensor, list[Tensor]] = {}
        self._slot = 0  # the ring's next slot to write: the oldest

    # ------------------------------------------------------------------ access
    def dtype_for(self, p: Tensor) -> torch.dtype:
        """The buffer's dtype for ``p``; complex like a complex parameter (the complex
        dtype of what a real one would get: ``complex64``, or ``complex128`` for
        ``complex128``; torch has no complex bfloat16, so ``ema_dtype=torch.bfloat16``
        gives ``complex64``)."""
        real = p.dtype.to_real() if p.is_complex() else p.dtype
        if self.dtype is not None:
            dtype = self.dtype
        else:
            dtype = torch.float64 if real == torch.float64 else torch.float32
        return dtype.to_complex() if p.is_complex() else dtype

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

    def histories(self, params: Sequence[Tensor]) -> list[list[Tensor] | None]:
        """Each parameter's recent raw retain gradients, local shards, oldest first
        (``None`` without a memory)."""
        order = [(self._slot + i) % self.history for i in range(self.history)]
        out: list[list[Tensor] | None] = []
        for p in params:
            h = self._hist.get(p) if p in self._buffers else None
            out.append(None if h is None else [h[i] for i in order])
        return out

    def history_of(self, p: Tensor) -> list[Tensor]:
        """The recent raw retain gradients of ``p``, oldest first, as tensors shaped like
        ``p`` (DTensors for DTensor parameters): views of the live buffer."""
        hs = self.histories([p])[0]
        if hs is None:
            return [self.zeros(p) for _ in range(self.history)]
        return [self._wrap(p, h) for h in hs]

    @staticmethod
    def _wrap(p: Tensor, h: Tensor) -> Tensor:
        if p.is_complex():  # the ring holds real views (see _reduce.local)
            h = torch.view_as_complex(h)
        if getattr(p, "to_local", None) is None:
            return h
        from torch.distributed.tensor import DTensor

        assert isinstance(p, DTensor)
        return DTensor.from_local(h, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())

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
        fused: bool = False,
        gate: Tensor | None = None,
        sq_norms: bool = False,
    ) -> Tensor | None:
        """Fold this step's retain gradients (local shards ``grads`` of ``with_grad``)
        into the memory, each parameter with its own ``gamma[id(p)]``; trainable
        parameters with a memory but no retain gradient this step decay.

        ``sq_norms`` (only without ``gate``): also return ``|grads[i]|^2`` for every ``i``
        (see :func:`~gru_optim.functional.ema_update_`: from the fold's own pass on the
        fused path).

        With ``gate`` (a 0-dim tensor) the fold happens only if it is true. The fused path
        decides on the device, unless the structure of the memory changes (a parameter's
        first retain gradient, a decaying or vanishing memory): then the gate is read on
        the host, as the other paths always do."""
        present = {id(p) for p in with_grad}
        new = [p for p in with_grad if p not in self._buffers]
        absent = [p for p in trainable if p in self._buffers and id(p) not in present]
        if sq_norms and gate is not None:
            raise ValueError("fold_: sq_norms needs gate=None")
        if gate is not None and (new or absent or not fused):
            if not bool(gate):
                return None
            gate = None
        for p in new:
            self._buffers[p] = self.zeros(p)
            if self.history:
                lp = local(self._buffers[p])
                self._hist[p] = [torch.zeros_like(lp) for _ in range(self.history)]
        by_gamma: dict[float, tuple[list[Tensor], list[Tensor], list[int]]] = {}
        for i, (p, g) in enumerate(zip(with_grad, grads)):
            ms, gs, idx = by_gamma.setdefault(gamma[id(p)], ([], [], []))
            ms.append(local(self._buffers[p]))
            gs.append(g)
            idx.append(i)
        norms: list[Tensor | None] = [None] * len(grads)
        whole: Tensor | None = None  # one gamma: the norms come back in order already
        for gm, (ms, gs, idx) in by_gamma.items():
            sq = ema_update_(ms, gs, gm, foreach=foreach, fused=fused, gate=gate, sq_norms=sq_norms)
            if sq is not None and len(by_gamma) == 1:
                whole = sq
            elif sq is not None:
                for i, v in zip(idx, sq.unbind()):
                    norms[i] = v
        decay: dict[float, list[Tensor]] = {}
        for p in absent:
            gm = gamma[id(p)]
            if gm == 1.0 and not self.history:
                # m = 1 * 0 + 0 * m is exactly zero: no memory, as a reloaded checkpoint
                # reads an all-zero memory.
                del self._buffers[p]
            elif gm == 1.0:
                # GRU-k: the older raw gradients still count, so the buffer stays (zero).
                local(self._buffers[p]).zero_()
            else:
                decay.setdefault(gm, []).append(local(self._buffers[p]))
        for gm, ms in decay.items():
            torch._foreach_mul_(ms, 1.0 - gm)
        if self.history:
            # The raw retain gradient of this fold replaces the oldest one (zeros for a
            # parameter without a retain gradient this step).
            slot = self._slot
            dst = [self._hist[p][slot] for p in with_grad]
            if dst:
                torch._foreach_copy_(dst, list(grads))
            for p in self._hist:
                if id(p) not in present and p in self._buffers:
                    self._hist[p][slot].zero_()
            self._slot = (slot + 1) % self.history
        if not sq_norms:
            return None
        if whole is not None:
            return whole
        if not grads:
            return torch.zeros(0)
        return _stack_scalars(norms, grads[0].device)

    # ------------------------------------------------------------------ checkpoints
    def history_entry(self, p: Tensor) -> list[Tensor]:
        """What ``state_dict`` saves under :data:`HISTORY_KEY` for ``p``: oldest first."""
        return self.history_of(p)

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
        if not (m.is_floating_point() or (m.is_complex() and p.is_complex())):
            raise ValueError(
                f"retain memory of {where} has dtype {m.dtype}, not a floating dtype"
                + (" (complex like the parameter)" if p.is_complex() else "")
            )
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(
                f"retain memory of {where} has shape {tuple(m.shape)}, the parameter "
                f"{tuple(p.shape)}: the state dict comes from another model"
            )
        return m

    def prepare(
        self, saved: dict[Tensor, Tensor], histories: dict[Tensor, list[Tensor]] | None = None
    ) -> tuple[dict[Tensor, Tensor], dict[Tensor, list[Tensor]]]:
        """New buffers from validated saved entries (copies, in this memory's dtype), and
        the stacked histories (oldest first; zeros where none was saved); all-zero
        memories are no memory. Non-finite entries raise. The memory itself is not
        changed (:meth:`commit` installs the result). One host read, and one collective
        for sharded memories."""
        new: dict[Tensor, Tensor] = {}
        hist: dict[Tensor, list[Tensor]] = {}
        histories = histories or {}
        with torch.no_grad():
            for p, m in saved.items():
                buf = self.zeros(p)
                buf.copy_(m)
                new[p] = buf
                if self.history:
                    lm = local(buf)
                    h = [torch.zeros_like(lm) for _ in range(self.history)]
                    for i, t in enumerate(histories.get(p, [])):
                        h[i].copy_(local(t))
                    hist[p] = h
            keys = list(new)
            if not keys:
                return new, hist
            first = local(new[keys[0]]).device

            def nonfinite(q: Tensor) -> Tensor:
                bad = (~torch.isfinite(local(new[q]))).any()
                for h in hist.get(q, []):
                    bad = bad | (~torch.isfinite(h)).any()
                return bad.to(first, torch.float32)

            def nonzero(q: Tensor) -> Tensor:
                # A memory counts if the buffer or (GRU-k) any recent raw gradient is not
                # all zero: a zero EMA can sit beside a history that still constrains.
                nz = local(new[q]).ne(0).any()
                for h in hist.get(q, []):
                    nz = nz | h.ne(0).any()
                return nz.to(first, torch.float32)

            flags = torch.stack([torch.stack([nonzero(q), nonfinite(q)]) for q in keys])
            Reducer.for_params(keys).sum_(flags)
            host = flags.tolist()
        bad = sum(1 for _, nf in host if nf > 0)
        if bad:
            raise ValueError(
                f"the retain memory of {bad} parameter(s) in the state dict is not finite "
                "(NaN or infinity): it would disable GRU for good; the checkpoint is corrupt"
            )
        keep = [q for q, (nz, _) in zip(keys, host) if nz > 0]
        return {q: new[q] for q in keep}, {q: hist[q] for q in keep if q in hist}

    def check_history(self, p: Tensor, h: object, where: str) -> list[Tensor]:
        """Validate a saved history for ``p``: a list of ``self.history`` tensors shaped
        like ``p``."""
        if self.history == 0:
            raise ValueError(
                f"the state dict keeps recent retain gradients ({HISTORY_KEY}) for {where}: it "
                "comes from a GRU-k optimizer; build this one with the same directions="
            )
        if not isinstance(h, (list, tuple)) or len(h) != self.history:
            n = len(h) if isinstance(h, (list, tuple)) else type(h).__name__
            raise ValueError(
                f"{HISTORY_KEY} of {where} has {n} entries, this optimizer keeps "
                f"{self.history} (directions={self.history + 1})"
            )
        return [self.check_entry(p, t, f"{where} ({HISTORY_KEY})") for t in h]

    def commit(self, prepared: tuple[dict[Tensor, Tensor], dict[Tensor, list[Tensor]]]) -> None:
        """Install what :meth:`prepare` made (histories oldest first: the ring restarts)."""
        self._buffers, self._hist = prepared
        self._slot = 0

    def drop(self, p: Tensor) -> None:
        self._buffers.pop(p, None)
        self._hist.pop(p, None)

    def snapshot(self, params: Sequence[Tensor]) -> dict[Tensor, Tensor | None]:
        """Copies of the memory of ``params`` (``None`` where there is none), for
        :meth:`restore` (a driver whose step may be skipped after the fold)."""
        return {p: (None if (m := self.get(p)) is None else m.clone()) for p in params}

    def restore(self, snapshot: dict[Tensor, Tensor | None]) -> None:
        """Give the memory back its state at :meth:`snapshot`."""
        for p, m in snapshot.items():
            buf = self.get(p)
            if m is None:
                self.drop(p)
            elif buf is not None:
                buf.copy_(m)

    @staticmethod
    def flat_keys(
        lengths: Sequence[int], dtype: torch.dtype | None, device: torch.device | str
    ) -> list[Tensor]:
        """One stable key per flat member of the given lengths (a driver's own fragments):
        zero-stride views of one element, so that each buffer is allocated contiguous, of
        that shape, in ``dtype`` (``None``: float32)."""
        base = torch.zeros((), dtype=dtype or torch.float32, device=device)
        return [base.expand(n) for n in lengths]

    def nbytes(self, params: Sequence[Tensor]) -> int:
        """Bytes of the buffers of ``params`` (the memory and the recent retain gradients)."""
        bufs = [m for p in params if (m := self.get(p)) is not None]
        for hs in self.histories(params) if self.history else []:
            bufs += hs or []
        return sum(b.numel() * b.element_size() for b in bufs)
