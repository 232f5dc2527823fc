"""The sides of a GRU step on a driver's own flat gradient fragments.

A driver that keeps its gradients itself (DeepSpeed's ZeRO partitions) hands them to the
engine as a :class:`~gru_optim.engine._sources.FragmentSource` and says how it runs one
pass (``open_pass``: a context that counts the pass's backward calls) and what loss
scale its gradients carry. :class:`FragmentSides` does the rest, for every such driver:

- the retain side: stale gradients dropped, the pass run, the fragments unscaled and
  folded into the memory once (:meth:`Engine.fold`), the retain-weight part kept and,
  where the driver may still skip the step (fp16 loss scaling), a snapshot of the memory;
- the forget side: the layout, then :meth:`Engine.rectify` (the rule, the skip, the clip,
  the driver's step through the source), the memory given back if the driver skipped,
  then the statistics;
- :meth:`FragmentSides.run`: ``step(forget_closure, retain_closure)``, as
  ``GRUOptimizer.step`` takes it;
- the memory per member and its checkpoint state (:mod:`._fragments`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor

from ._amp import AmpBoundary
from ._config import Settings
from ._engine import Closure, Engine, check_closures, check_loss
from ._fragments import load_fragments, save_fragments
from ._memory import RetainMemory
from ._sources import FragmentSource
from ._stats import SkipReason, plain_stats

__all__ = ["FragmentSides", "OpenPass"]

OpenPass = Callable[[str, "int | None"], AbstractContextManager[Any]]
"""``open_pass(what, micro_batches)``: a context for one pass of the driver's backward
calls (``what`` names it in errors), counting from the moment it is made."""


class FragmentSides:
    """A GRU step over the fragments of ``source``, with an engine built from the
    validated keywords ``s``.

    Args:
        source: the driver's gradients and step.
        s: :func:`~gru_optim.engine._config.settings`' result.
        open_pass: how the driver runs a pass (:data:`OpenPass`).
        loss_scale: the loss scale the fragments carry now (``None``: they carry none).
            A driver with a loss scale may skip its step after the fold (an overflow), so
            the memory is then snapshotted at each retain side and given back.
        owner: the driver object (held weakly by the AMP boundary).
        device: where the memory lives.
    """

    def __init__(
        self,
        source: FragmentSource,
        s: Settings,
        *,
        open_pass: OpenPass,
        loss_scale: Callable[[], float] | None,
        owner: Any,
        device: torch.device | str,
    ) -> None:
        if s.gamma is None or s.retain_weight is None:
            raise TypeError(
                "gamma and retain_weight must be numbers (gamma in (0, 1], retain_weight "
                f">= 0), got gamma={s.gamma!r}, retain_weight={s.retain_weight!r}"
            )
        self.source = source
        self.engine = Engine(
            rule=s.rule,
            memory=RetainMemory(s.ema_dtype, history=s.history),
            amp=AmpBoundary(None, owner),
            granularity=s.granularity,
            max_grad_norm=s.clip,
        )
        self.retain_weight = s.retain_weight
        self._open_pass = open_pass
        self._loss_scale = loss_scale
        self.keys = self.engine.memory.flat_keys([n for _, n in source.ranges], s.ema_dtype, device)
        """One memory key per member."""
        self._segments = self.engine.partition_of(self.keys, source.group_of)
        n = 1 if self._segments is None else len(self._segments)
        self._hyper = [s.rule.defaults()] * n
        self._gamma = {id(k): s.gamma for k in self.keys}
        self._forget: AbstractContextManager[Any] | None = None

    def scale(self) -> float:
        """The loss scale the fragments carry now."""
        return 1.0 if self._loss_scale is None else float(self._loss_scale())

    # ------------------------------------------------------------------ the step
    @contextmanager
    def retain_pass(self, micro_batches: int | None) -> Iterator[None]:
        """The retain pass as a context; on exit its gradient is folded and the forget
        pass opened (counted until :meth:`run`)."""
        self.engine.check_no_pending()
        self.source.discard()
        with self._open_pass("retain pass", micro_batches):
            yield
        self.retain_side(None)
        self._forget = self._open_pass("forget pass", micro_batches)

    def run(
        self,
        forget_closure: Closure | None,
        retain_closure: Closure | None,
        micro_batches: int | None,
    ) -> Any:
        """``step(forget_closure, retain_closure)``: both closures, or a forget closure
        (or nothing) after :meth:`retain_pass`; a plain step of the driver otherwise.
        Returns the forget loss."""
        check_closures(forget_closure=forget_closure, retain_closure=retain_closure)
        eng, loss = self.engine, None
        if retain_closure is not None and eng.pending is not None:
            raise RuntimeError("step() got a retain_closure after a retain_pass(); use one")
        if retain_closure is not None:
            self.source.discard()
            with self._open_pass("retain closure", micro_batches):
                retain_loss = check_loss(retain_closure(), "retain closure")
            self.retain_side(retain_loss)
        elif eng.pending is None:
            return self.plain_step(forget_closure, micro_batches)
        counter, self._forget = self._forget, None
        try:
            if counter is None and forget_closure is None:
                raise RuntimeError("no forget pass: give step() the forget closure")
            with counter or self._open_pass("forget closure", micro_batches):
                if forget_closure is not None:
                    loss = check_loss(forget_closure(), "forget closure")
            self.forget_side(loss)
        finally:
            eng.pending = None
        return loss

    def plain_step(self, forget_closure: Closure | None, micro_batches: int | None) -> Any:
        """The driver's own step (after the forget closure, if any)."""
        loss = None
        if forget_closure is not None:
            with self._open_pass("forget closure", micro_batches):
                loss = check_loss(forget_closure(), "forget closure")
        code = 0 if self.source.step_driver() else int(SkipReason.SCALER_OVERFLOW)
        device = self.keys[0].device if self.keys else torch.device("cpu")
        reason = torch.full((), code, device=device)
        self.engine.last_stats = plain_stats(device, loss, reason, clipping=False)
        return loss

    # ------------------------------------------------------------------ the two sides
    def retain_side(self, loss: Any) -> None:
        """Fold the fragments into the memory and zero them; leaves the step's record."""
        source, eng, scale = self.source, self.engine, self.scale()
        grads = source.read()
        with torch.no_grad():
            # Added after rectification in the units of the (scaled) forget gradient.
            kept = [g * self.retain_weight for g in grads] if self.retain_weight else None
            snapshot = eng.memory.snapshot(self.keys) if self._loss_scale is not None else None
            work = grads
            if scale != 1.0:
                work = [g.to(torch.float32, copy=True) for g in grads]
                torch._foreach_mul_(work, 1.0 / scale)
            have = [i for i, ok in enumerate(source.present) if ok]
            pending = eng.fold(
                [self.keys[i] for i in have],
                [work[i] for i in have],
                self.keys,
                self._gamma,
                loss,
                source.reducer,
            )
            pending.extra.update(kept=kept, snapshot=snapshot)
            source.clear(grads)
        eng.pending = pending

    def forget_side(self, loss: Any) -> None:
        """Rectify the fragments and step the driver; a step the driver skipped gives
        the memory back (where it was snapshotted) and is recorded as skipped."""
        source, eng, scale = self.source, self.engine, self.scale()
        pending = eng.pending
        assert pending is not None
        grads = source.read(fill=[eng.memory.get(k) is not None for k in self.keys])
        source.applied = False
        with torch.no_grad():
            layout = eng.layout(
                self.keys, self._segments, self._hyper, source.reducer, source.numels
            )
            kept = pending.extra["kept"]
            sol, reason, norm, clip = eng.rectify(
                layout, grads, None, pending.reason, source, kept=kept, scale=scale
            )
        if not source.applied:
            if not bool(reason != 0):
                reason = torch.full_like(reason, int(SkipReason.SCALER_OVERFLOW))
            if pending.extra["snapshot"] is not None:
                eng.memory.restore(pending.extra["snapshot"])
        eng.record(pending, loss, (sol, reason, norm, clip), inv=1.0 / scale)

    # ------------------------------------------------------------------ the memory
    def memory_of(self, i: int) -> Tensor | None:
        """This process's memory of member ``i`` (the live buffer), ``None`` before its
        first retain gradient."""
        return self.engine.memory.get(self.keys[i])

    def nbytes(self) -> int:
        """Bytes of the memory and GRU-k's recent gradients on this process."""
        return self.engine.memory.nbytes(self.keys)

    def memory_state(self, names: list[str], **extra: Any) -> dict[str, Any]:
        """This process's memory as a state to save (``names``: the members'; ``extra``
        recorded as given). Raises between a retain side and its step."""
        if self.engine.pending is not None:
            raise RuntimeError(
                "save_checkpoint() between retain_pass() and step(): the memory is one fold "
                "ahead of the weights; save after step()"
            )
        src = self.source
        return save_fragments(self.engine.memory, self.keys, names, src.numels, src.ranges, **extra)

    def load_memory(self, files: list[str], names: list[str]) -> None:
        """Load this process's part of the memory saved in ``files`` (every process's
        state from :meth:`memory_state`), re-partitioned; validated before it changes."""
        src = self.source
        load_fragments(files, self.engine.memory, self.keys, names, src.numels, src.ranges)
