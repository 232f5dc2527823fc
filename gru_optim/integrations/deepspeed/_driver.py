"""``GRUDeepSpeed``: the GRU engine driven on a DeepSpeed engine's gradient partitions.

DeepSpeed owns its step (ZeRO reduces the gradients into partitions in ``engine.backward``
and steps in ``engine.step()``), so GRU drives the engine instead of being its optimizer:
this driver counts the backward passes and sets the accumulation boundary (:class:`_Pass`)
and hands the reduced fragments (:mod:`._stages`) to the same
:class:`~gru_optim.engine._engine.Engine` as ``GRUOptimizer``, whose are the fold, the
rule, the skip decisions, the clip and the statistics.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ...engine._amp import AmpBoundary
from ...engine._config import settings
from ...engine._engine import Engine, check_closures, check_loss
from ...engine._fragments import load_fragments, save_fragments
from ...engine._memory import RetainMemory
from ...engine._stats import SkipReason, plain_stats
from ...rules import Rule
from ._stages import shards_of

__all__ = ["MEMORY_FILE", "GRUDeepSpeed"]

Closure = Callable[[], Any]

MEMORY_FILE = "gru_memory_rank{rank:05d}.pt"
"""Name of each rank's memory file inside a checkpoint's tag directory."""


class _Pass:
    """One retain or forget pass, as a context: counts ``engine.backward`` calls (the
    instance's attribute while it is open), sets the accumulation boundary on the last,
    and on a clean exit checks that there were ``micro_batches`` of them."""

    def __init__(self, engine: Any, what: str, micro_batches: int | None = None) -> None:
        if getattr(engine.__dict__.get("backward"), "gru_pass", False):
            raise RuntimeError("a GRU pass is already running")
        self.engine, self.what, self.count = engine, what, 0
        gas = engine.gradient_accumulation_steps() if micro_batches is None else micro_batches
        self.gas = int(gas)
        self._saved = engine.__dict__.get("backward")
        original = engine.backward

        def backward(loss: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.count >= self.gas:
                raise RuntimeError(
                    f"the {self.what} called engine.backward more than {self.gas} times "
                    "(gradient_accumulation_steps, or micro_batches): one backward per "
                    "micro-batch"
                )
            self.count += 1
            engine.set_gradient_accumulation_boundary(self.count == self.gas)
            return original(loss, *args, **kwargs)

        backward.gru_pass = True  # type: ignore[attr-defined]
        engine.backward = backward

    def __enter__(self) -> _Pass:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._saved is None:
            self.engine.__dict__.pop("backward", None)
        else:
            self.engine.backward = self._saved
        if exc_type is None and self.count != self.gas:
            raise RuntimeError(
                f"the {self.what} called engine.backward {self.count} time(s), expected "
                f"{self.gas}: one call per micro-batch, gradient_accumulation_steps of them "
                "per pass (or micro_batches=, for a shorter step); DeepSpeed divides each "
                "loss by gradient_accumulation_steps, do not divide it yourself"
            )


class GRUDeepSpeed:
    """Gradient Rectified Unlearning on a DeepSpeed engine (ZeRO stages 0 to 3).

    The rule and conventions of :class:`~gru_optim.GRUOptimizer`, on the reduced gradients
    where DeepSpeed keeps them, the memory sharded like them (replicated at stage 0). Each
    closure or pass calls ``engine.backward`` once per micro-batch (the loss undivided).
    DeepSpeed's clipping, loss scaling and overflow skipping act in ``engine.step()`` on
    the rectified gradient; a step it skips leaves the memory as it was under fp16.

    Args:
        engine: the ``DeepSpeedEngine`` from ``deepspeed.initialize(model=...,
            optimizer=<torch optimizer>, config=...)``.

    The keyword options ``gamma``, ``retain_weight``, ``granularity``, ``cos_clip``,
    ``directions``, ``rule``, ``ema_dtype`` and ``max_grad_norm`` are as in
    :class:`~gru_optim.GRUOptimizer` (``max_grad_norm`` must agree with DeepSpeed's
    ``gradient_clipping`` if both are set).

    ``gru.step(forget_closure, retain_closure)`` (closures call ``engine.backward`` and
    return the loss), or ``with gru.retain_pass(): engine.backward(retain_loss)``, then
    ``engine.backward(forget_loss)`` and ``gru.step()``. See ``docs/guides/deepspeed.md``.
    """

    def __init__(
        self,
        engine: Any,
        *,
        gamma: float = 0.8,
        retain_weight: float = 0.0,
        granularity: str = "global",
        max_grad_norm: float | None = None,
        cos_clip: float | None = None,
        directions: int = 1,
        rule: Rule | None = None,
        ema_dtype: torch.dtype | None = None,
    ) -> None:
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "gru_optim.deepspeed needs DeepSpeed: install the 'deepspeed' extra, "
                'pip install "gru-optim[deepspeed]"'
            ) from e
        if not all(
            hasattr(engine, a) for a in ("zero_optimization_stage", "backward", "step", "optimizer")
        ):
            raise TypeError(
                "GRUDeepSpeed drives a DeepSpeedEngine (from deepspeed.initialize), got "
                f"{type(engine).__name__}"
            )
        self.engine, self._shards = engine, shards_of(engine)
        self.stage, self._fp16 = self._shards.stage, bool(engine.fp16_enabled())
        s = settings(
            gamma=gamma,
            retain_weight=retain_weight,
            granularity=granularity,
            cos_clip=cos_clip,
            directions=directions,
            rule=rule,
            max_grad_norm=max_grad_norm,
            ema_dtype=ema_dtype,
            kept_in_grad=retain_weight != 0.0,
            float16_memory=False,
            driver_clip=float(engine.gradient_clipping() or 0.0),
            skips_after_fold=self._fp16,
        )
        self.gamma, self.retain_weight, self.granularity = s.gamma, s.retain_weight, granularity
        self.max_grad_norm = s.max_grad_norm
        self._engine = Engine(
            rule=s.rule,
            memory=RetainMemory(s.ema_dtype, history=s.history),
            amp=AmpBoundary(None, self),
            granularity=s.granularity,
            max_grad_norm=s.clip,
        )
        shards = self._shards
        self._keys = self._engine.memory.flat_keys(
            [n for _, n in shards.ranges], s.ema_dtype, engine.device
        )
        self._segments = self._engine.partition_of(self._keys, shards.group_of)
        self._hyper = [s.rule.defaults()] * (1 if self._segments is None else len(self._segments))
        self._gamma = {id(k): float(gamma) for k in self._keys}
        self._index = {id(p): i for i, p in enumerate(shards.members)}
        self._forget: _Pass | None = None

    # ------------------------------------------------------------------ introspection
    rule = property(lambda self: self._engine.rule, doc="The rectification rule.")
    last_stats = property(lambda self: self._engine.last_stats, doc="What the last step did.")

    def retain_memory(self, param: Tensor) -> Tensor | None:
        """This rank's shard of the memory of ``param`` (flat, the live buffer: do not
        modify it), ``None`` before its first retain gradient."""
        return self._engine.memory.get(self._keys[self._member(param)])

    def shard_range(self, param: Tensor) -> tuple[int, int]:
        """``(start, length)`` of this rank's shard inside the flattened ``param``."""
        return self._shards.ranges[self._member(param)]

    @property
    def memory_bytes(self) -> int:
        """Bytes of GRU's buffers on this rank (the memory and GRU-k's recent gradients)."""
        return self._engine.memory.nbytes(self._keys)

    def _member(self, param: Tensor) -> int:
        i = self._index.get(id(param))
        if i is None:
            raise KeyError("not a trainable parameter of the engine's optimizer")
        return i

    # ------------------------------------------------------------------ passes, step
    @contextmanager
    def retain_pass(self, micro_batches: int | None = None) -> Iterator[None]:
        """Back-propagate the retain loss inside (``engine.backward`` once per micro-batch;
        ``micro_batches``: how many, default ``gradient_accumulation_steps``); on exit it
        is folded into the memory, for the forget passes and :meth:`step`."""
        self._engine.check_no_pending()
        self._shards.discard()
        with _Pass(self.engine, "retain pass", micro_batches):
            yield
        self._retain_side(None)
        self._forget = _Pass(self.engine, "forget pass", micro_batches)

    def step(
        self,
        forget_closure: Closure | None = None,
        retain_closure: Closure | None = None,
        *,
        micro_batches: int | None = None,
    ) -> Any:
        """One GRU step, then ``engine.step()``, as :meth:`gru_optim.GRUOptimizer.step`;
        ``step(forget_closure)`` alone is a plain step. Returns the forget loss."""
        check_closures(forget_closure=forget_closure, retain_closure=retain_closure)
        eng, loss = self._engine, None
        if retain_closure is not None and eng.pending is not None:
            raise RuntimeError("step() got a retain_closure after a retain_pass(); use one")
        if retain_closure is not None:
            self._shards.discard()
            with _Pass(self.engine, "retain closure", micro_batches):
                retain_loss = check_loss(retain_closure(), "retain closure")
            self._retain_side(retain_loss)
        elif eng.pending is None:
            if forget_closure is not None:
                with _Pass(self.engine, "forget closure", micro_batches):
                    loss = check_loss(forget_closure(), "forget closure")
            code = 0 if self._shards.step_engine() else int(SkipReason.SCALER_OVERFLOW)
            reason = torch.full((), code, device=self.engine.device)
            eng.last_stats = plain_stats(self.engine.device, loss, reason, clipping=False)
            return loss
        counter, self._forget = self._forget, None
        try:
            if counter is None and forget_closure is None:
                raise RuntimeError("no forget pass: give step() the forget closure")
            with counter or _Pass(self.engine, "forget closure", micro_batches):
                if forget_closure is not None:
                    loss = check_loss(forget_closure(), "forget closure")
            self._forget_side(loss)
        finally:
            eng.pending = None
        return loss

    # ------------------------------------------------------------------ the two sides
    def _loss_scale(self) -> float:
        return float(getattr(self.engine.optimizer, "loss_scale", 1.0)) if self._fp16 else 1.0

    def _retain_side(self, loss: Any) -> None:
        shards, eng, scale = self._shards, self._engine, self._loss_scale()
        grads = shards.read()
        with torch.no_grad():
            # Added after rectification in the units of the (scaled) forget gradient; a
            # skipped fp16 step gives the memory back.
            kept = [g * self.retain_weight for g in grads] if self.retain_weight else None
            snapshot = eng.memory.snapshot(self._keys) if self._fp16 else None
            work = grads
            if scale != 1.0:
                work = [g.to(torch.float32, copy=True) for g in grads]
                torch._foreach_mul_(work, 1.0 / scale)
            have = [i for i, ok in enumerate(shards.present) if ok]
            pending = eng.fold(
                [self._keys[i] for i in have],
                [work[i] for i in have],
                self._keys,
                self._gamma,
                loss,
                shards.reducer,
            )
            pending.extra.update(kept=kept, snapshot=snapshot)
            shards.clear(grads)
        eng.pending = pending

    def _forget_side(self, loss: Any) -> None:
        shards, eng, scale = self._shards, self._engine, self._loss_scale()
        pending = eng.pending
        assert pending is not None
        grads = shards.read(fill=[eng.memory.get(k) is not None for k in self._keys])
        shards.applied = False
        with torch.no_grad():
            layout = eng.layout(
                self._keys, self._segments, self._hyper, shards.reducer, shards.numels
            )
            kept = pending.extra["kept"]
            sol, reason, norm, clip = eng.rectify(
                layout, grads, None, pending.reason, shards, kept=kept, scale=scale
            )
        if not shards.applied:
            if not bool(reason != 0):
                reason = torch.full_like(reason, int(SkipReason.SCALER_OVERFLOW))
            if pending.extra["snapshot"] is not None:
                eng.memory.restore(pending.extra["snapshot"])
        eng.record(pending, loss, (sol, reason, norm, clip), inv=1.0 / scale)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self, save_dir: str, tag: Any = None, client_state: dict[str, Any] | None = None, **kw: Any
    ) -> Any:
        """``engine.save_checkpoint(save_dir, tag, ...)``, then this rank's memory next to
        DeepSpeed's files (``<save_dir>/<tag>/gru_memory_rank<r>.pt``). Call it on every
        rank, after :meth:`step`. Returns what the engine's call returns."""
        import torch.distributed as dist

        if self._engine.pending is not None:
            raise RuntimeError(
                "save_checkpoint() between retain_pass() and step(): the memory is one fold "
                "ahead of the weights; save after step()"
            )
        tag = f"global_step{self.engine.global_steps}" if tag is None else tag
        out = self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, **kw)
        rank = dist.get_rank() if dist.is_initialized() else 0
        sh = self._shards
        state = save_fragments(self._engine.memory, self._keys, self._names(), sh.numels, sh.ranges)
        state.update(stage=self.stage, rank=rank, gamma=self.gamma, rule=self.rule.name)
        torch.save(state, os.path.join(save_dir, str(tag), MEMORY_FILE.format(rank=rank)))
        if dist.is_initialized():
            dist.barrier()
        return out

    def load_checkpoint(self, load_dir: str, tag: Any = None, **kwargs: Any) -> Any:
        """``engine.load_checkpoint(load_dir, tag, ...)``, then the memory saved by
        :meth:`save_checkpoint` (re-partitioned for another number of ranks or another
        stage), validated before the memory changes. Returns the engine's result."""
        if self._engine.pending is not None:
            raise RuntimeError("load_checkpoint() between retain_pass() and step()")
        out = self.engine.load_checkpoint(load_dir, tag=tag, **kwargs)
        load_path = out[0] if isinstance(out, tuple) else out
        if load_path is not None:
            tag_dir = os.path.dirname(str(load_path))
            files = sorted(glob.glob(os.path.join(tag_dir, MEMORY_FILE.replace("{rank:05d}", "*"))))
            if not files:
                raise FileNotFoundError(
                    f"no GRU memory in {tag_dir} (the checkpoint was not saved with "
                    "GRUDeepSpeed.save_checkpoint)"
                )
            self._load_memory(files)
        return out

    def _load_memory(self, files: list[str]) -> None:
        sh = self._shards
        load_fragments(files, self._engine.memory, self._keys, self._names(), sh.numels, sh.ranges)

    def _names(self) -> list[str]:
        names = {id(p): n for n, p in self.engine.module.named_parameters()}
        return [names.get(id(p), f"param{i}") for i, p in enumerate(self._shards.members)]
