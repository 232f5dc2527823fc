"""``GRUDeepSpeed``: the GRU engine driven on a DeepSpeed engine's gradient partitions.

DeepSpeed owns its step (ZeRO reduces the gradients into partitions in ``engine.backward``
and steps in ``engine.step()``), so GRU drives the engine instead of being its optimizer:
this driver counts the backward passes and sets the accumulation boundary (:class:`_Pass`),
and hands the reduced fragments (:mod:`._stages`) to the engine's fragment sides
(:class:`~gru_optim.engine._fragment_sides.FragmentSides`), which run the step's flow, the
fold, the rule, the skip decisions, the clip and the statistics as for ``GRUOptimizer``.
"""

from __future__ import annotations

import glob
import os
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from ...engine._config import settings
from ...engine._engine import Closure
from ...engine._fragment_sides import FragmentSides
from ...rules import Rule
from ._stages import shards_of

__all__ = ["MEMORY_FILE", "GRUDeepSpeed"]

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
        self.engine, shards = engine, shards_of(engine)
        self.stage, fp16 = shards.stage, bool(engine.fp16_enabled())
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
            skips_after_fold=fp16,
        )
        self.gamma, self.retain_weight, self.granularity = s.gamma, s.retain_weight, granularity
        self.max_grad_norm = s.max_grad_norm

        self._sides = FragmentSides(
            shards,
            s,
            open_pass=lambda what, micro_batches: _Pass(engine, what, micro_batches),
            loss_scale=(lambda: float(engine.optimizer.loss_scale)) if fp16 else None,
            owner=self,
            device=engine.device,
        )
        self._index = {id(p): i for i, p in enumerate(shards.members)}

    rule = property(lambda self: self._sides.engine.rule, doc="The rectification rule.")
    last_stats = property(lambda self: self._sides.engine.last_stats, doc="What the last step did.")
    memory_bytes = property(
        lambda self: self._sides.nbytes(),
        doc="Bytes of GRU's buffers on this rank (the memory and GRU-k's recent gradients).",
    )

    def retain_memory(self, param: Tensor) -> Tensor | None:
        """This rank's shard of the memory of ``param`` (flat, the live buffer: do not
        modify it), ``None`` before its first retain gradient."""
        return self._sides.memory_of(self._member(param))

    def shard_range(self, param: Tensor) -> tuple[int, int]:
        """``(start, length)`` of this rank's shard inside the flattened ``param``."""
        return self._sides.source.ranges[self._member(param)]

    def _member(self, param: Tensor) -> int:
        i = self._index.get(id(param))
        if i is None:
            raise KeyError("not a trainable parameter of the engine's optimizer")
        return i

    def retain_pass(self, micro_batches: int | None = None) -> AbstractContextManager[None]:
        """Back-propagate the retain loss inside (``engine.backward`` once per micro-batch;
        ``micro_batches``: how many, default ``gradient_accumulation_steps``); on exit it
        is folded into the memory, for the forget passes and :meth:`step`."""
        return self._sides.retain_pass(micro_batches)

    def step(
        self,
        forget_closure: Closure | None = None,
        retain_closure: Closure | None = None,
        *,
        micro_batches: int | None = None,
    ) -> Any:
        """One GRU step, then ``engine.step()``, as :meth:`gru_optim.GRUOptimizer.step`;
        ``step(forget_closure)`` alone is a plain step. Returns the forget loss."""
        return self._sides.run(forget_closure, retain_closure, micro_batches)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self, save_dir: str, tag: Any = None, client_state: dict[str, Any] | None = None, **kw: Any
    ) -> Any:
        """``engine.save_checkpoint(save_dir, tag, ...)``, then this rank's memory next to
        DeepSpeed's files (``<save_dir>/<tag>/gru_memory_rank<r>.pt``). Call it on every
        rank, after :meth:`step`. Returns what the engine's call returns."""
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        meta = dict(stage=self.stage, rank=rank, gamma=self.gamma, rule=self.rule.name)
        state = self._sides.memory_state(self._names(), **meta)
        tag = f"global_step{self.engine.global_steps}" if tag is None else tag
        out = self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, **kw)
        torch.save(state, os.path.join(save_dir, str(tag), MEMORY_FILE.format(rank=rank)))
        if dist.is_initialized():
            dist.barrier()
        return out

    def load_checkpoint(self, load_dir: str, tag: Any = None, **kwargs: Any) -> Any:
        """``engine.load_checkpoint(load_dir, tag, ...)``, then the memory saved by
        :meth:`save_checkpoint` (re-partitioned for another number of ranks or another
        stage), validated before the memory changes. Returns the engine's result."""
        if self._sides.engine.pending is not None:
            raise RuntimeError("load_checkpoint() between retain_pass() and step()")
        out = self.engine.load_checkpoint(load_dir, tag=tag, **kwargs)
        load_path = out[0] if isinstance(out, tuple) else out
        if load_path is not None:
            self.load_memory(os.path.dirname(str(load_path)))
        return out

    def load_memory(self, tag_dir: str) -> None:
        """Load only the memory saved in ``tag_dir`` by :meth:`save_checkpoint` (every
        rank's file, re-partitioned for this engine's ranks and stage), e.g. beside weights
        restored another way; validated before the memory changes."""
        if self._sides.engine.pending is not None:
            raise RuntimeError("loading the memory between retain_pass() and step()")
        pattern = os.path.join(glob.escape(tag_dir), MEMORY_FILE.replace("{rank:05d}", "*"))
        files = sorted(glob.glob(pattern))
        if not files:
            raise FileNotFoundError(
                f"no GRU memory in {tag_dir} (the checkpoint was not saved with "
                "GRUDeepSpeed.save_checkpoint)"
            )
        self._sides.load_memory(files, self._names())

    def _names(self) -> list[str]:
        names = {id(p): n for n, p in self.engine.module.named_parameters()}
        return [names.get(id(p), f"param{i}") for i, p in enumerate(self._sides.source.members)]
