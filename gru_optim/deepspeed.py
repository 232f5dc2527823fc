"""DeepSpeed integration (needs the ``deepspeed`` extra: ``pip install "gru-optim[deepspeed]"``,
which pins the tested DeepSpeed, 0.19.8).

:class:`GRUDeepSpeed` drives an engine made by ``deepspeed.initialize(model=...,
optimizer=<a torch optimizer>, config=...)`` at ZeRO stage 0, 1, 2 or 3. A DeepSpeed
engine owns its step (the ZeRO optimizer wraps the client optimizer, reduces the gradients
into partitions during ``engine.backward`` and steps in ``engine.step()``), so GRU cannot
be the client optimizer: it drives the engine instead, between the backward passes and the
engine's step, on the gradients where DeepSpeed keeps them.

This module is the only one that knows DeepSpeed: where each stage keeps this rank's
reduced gradient (:class:`_Shards`), the accumulation boundary (:class:`_Pass`), the loss
scale and overflow skipping, and the checkpoint files. The arithmetic is the package's
own: :class:`~gru_optim._memory.RetainMemory` holds the memory, the rules of
:mod:`gru_optim.rules` rectify, and :class:`~gru_optim._reduce.Reducer` sums the partial
sums across the data-parallel ranks with one packed all-reduce.

What it relies on, per stage (DeepSpeed 0.19.8):

- stage 0: ``param.grad`` of the model's parameters (all-reduced by the engine at the
  accumulation boundary); the memory is replicated, like the gradients.
- stages 1 and 2: ``param._hp_mapping.get_lp_grad_fragment(param._index_in_param_group)``,
  the part of the reduced gradient partition that holds ``param``'s fragment on this rank
  (what ``deepspeed.utils.safe_get_full_grad`` reads before its all-reduce), with
  ``lp_fragment_address`` its place in the parameter; the parameter groups from
  ``engine.optimizer.bit16_groups``. Private attributes: DeepSpeed has no public
  per-rank gradient API for these stages.
- stage 3: ``deepspeed.utils.safe_get_local_grad`` / ``safe_set_local_grad`` (public), on
  the padded local partition; ``param.ds_numel`` and ``param.ds_tensor``; the groups from
  ``engine.optimizer.fp16_groups`` and ``sub_group_to_group_id``.
- all stages: ``engine.set_gradient_accumulation_boundary``, ``engine.was_step_applied``,
  ``engine.optimizer.loss_scale`` (fp16), ``engine.optimizer.dp_process_group``.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._groups import check_gamma, check_retain_weight, real
from ._memory import RetainMemory
from ._partition import PARTITIONS
from ._reduce import Reducer
from ._rules import Cone, CosClip, Rule, make_rule
from ._sides import check_loss
from ._stats import SkipReason, plain_stats, reason_of, step_stats
from .functional import clip_coefficient, sum_sq, total_norm

__all__ = ["GRUDeepSpeed", "MEMORY_FILE", "TESTED_DEEPSPEED"]

TESTED_DEEPSPEED = "0.19.8"
"""The DeepSpeed release this integration is tested with (the ``deepspeed`` extra pins it)."""

MEMORY_FILE = "gru_memory_rank{rank:05d}.pt"
"""Name of each rank's memory shard inside a checkpoint's tag directory."""

_FORMAT = 1

Closure = Callable[[], Any]


def _deepspeed() -> Any:
    """The ``deepspeed`` package, imported on first use."""
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            "gru_optim.deepspeed needs DeepSpeed: install the 'deepspeed' extra, "
            'pip install "gru-optim[deepspeed]"'
        ) from e
    return deepspeed


# --------------------------------------------------------------------------- the shards
class _Shards:
    """Where one ZeRO stage keeps this rank's reduced gradient, one flat tensor per member.

    ``members`` are the trainable parameters of the engine's optimizer, in the same order
    on every rank (the packed sums of the rules line up across ranks); a member with no
    fragment on this rank has an empty one. ``ranges[i]`` is (start, length) of this
    rank's fragment inside the flattened parameter; ``numels[i]`` its full size.
    """

    stage: int

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.members: list[Tensor] = []
        self.group_of: list[int] = []
        self.numels: list[int] = []
        self.ranges: list[tuple[int, int]] = []
        self.reducer = Reducer(None)
        self.present: list[bool] = []

    def read(self, fill: Sequence[bool] | None = None) -> list[Tensor]:
        """This rank's fragments of the reduced gradient, flat, writable in place.

        ``present[i]`` then says whether member ``i`` has a gradient in DeepSpeed; where it
        has none (stage 0 only), the fragment is zeros, attached as its gradient if
        ``fill[i]`` (it will take a correction), a scratch tensor otherwise."""
        raise NotImplementedError

    def write(self, grads: list[Tensor]) -> None:
        """Store ``grads`` (from :meth:`read`, changed in place) where DeepSpeed reads them."""

    def clear(self, grads: list[Tensor]) -> None:
        """Zero the gradients so that the next pass starts from nothing."""
        torch._foreach_zero_(grads)
        self.write(grads)

    def discard(self) -> None:
        """Before a retain pass: drop what no pass of this step computed (stale gradients)."""

    def poison(self, grads: list[Tensor]) -> None:
        """Make DeepSpeed's overflow check skip this step (NaN everywhere)."""
        for g in grads:
            g.fill_(float("nan"))
        self.write(grads)

    @property
    def skips_itself(self) -> bool:
        """Whether DeepSpeed's step skips non-finite gradients (ZeRO stages 1-3 do)."""
        return True

    def _layout(self, groups: Sequence[tuple[int, Sequence[Tensor]]]) -> None:
        seen: set[int] = set()
        for gi, params in groups:
            for p in params:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self.members.append(p)
                    self.group_of.append(gi)


class _Replicated(_Shards):
    """ZeRO stage 0: the client optimizer steps the model's parameters; the engine
    all-reduces (averages) ``param.grad`` at the accumulation boundary."""

    stage = 0

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self._layout([(i, g["params"]) for i, g in enumerate(engine.optimizer.param_groups)])
        self.numels = [p.numel() for p in self.members]
        self.ranges = [(0, n) for n in self.numels]

    def read(self, fill: Sequence[bool] | None = None) -> list[Tensor]:
        out = []
        self.present = []
        for i, p in enumerate(self.members):
            if p.grad is None and fill is not None and fill[i]:
                p.grad = torch.zeros_like(p)  # a zero forget gradient takes its correction
            self.present.append(p.grad is not None)
            out.append(p.grad.view(-1) if p.grad is not None else torch.zeros_like(p).view(-1))
        return out

    def clear(self, grads: list[Tensor]) -> None:
        self.discard()

    def discard(self) -> None:
        for p in self.members:
            p.grad = None

    def poison(self, grads: list[Tensor]) -> None:
        self.clear(grads)

    @property
    def skips_itself(self) -> bool:
        return False


class _Zero12(_Shards):
    """ZeRO stages 1 and 2: one flat fp32 partition per parameter group per rank; a
    parameter may be split between ranks. The reduced gradient of this rank's partition is
    ``engine.optimizer.averaged_gradients``, one fragment per parameter, reached through the
    fragment mapping DeepSpeed attaches to each parameter (``_hp_mapping``)."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        opt = engine.optimizer
        self.stage = int(engine.zero_optimization_stage())
        self._layout(list(enumerate(opt.bit16_groups)))
        self.numels = [p.numel() for p in self.members]
        self.reducer = Reducer(opt.dp_process_group)
        self._empty = [
            torch.zeros(0, dtype=torch.float32, device=engine.device) for _ in self.members
        ]
        for p in self.members:
            m = getattr(p, "_hp_mapping", None)
            if m is None:
                self.ranges.append((0, 0))
            else:
                self.ranges.append(
                    (int(m.lp_fragment_address.start), int(m.lp_fragment_address.numel))
                )

    def read(self, fill: Sequence[bool] | None = None) -> list[Tensor]:
        out = []
        self.present = [True] * len(self.members)
        for i, p in enumerate(self.members):
            m = getattr(p, "_hp_mapping", None)
            if m is None:
                out.append(self._empty[i])
                continue
            try:
                frag = m.get_lp_grad_fragment(p._index_in_param_group)  # type: ignore[attr-defined]
            except ValueError as e:  # averaged_gradients is None: no boundary backward yet
                raise RuntimeError(
                    "no reduced gradient in the engine: every pass must end with an "
                    "engine.backward at the accumulation boundary (GRUDeepSpeed sets it; "
                    "call engine.backward through the engine, once per micro-batch)"
                ) from e
            out.append(frag.view(-1))
        return out


class _Zero3(_Shards):
    """ZeRO stage 3: every parameter is partitioned (padded to a multiple of the number of
    ranks); the reduced gradient of this rank's partition is read and written with
    DeepSpeed's public local-gradient API."""

    stage = 3

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        import torch.distributed as dist

        opt = engine.optimizer
        groups = [(int(opt.sub_group_to_group_id[i]), g) for i, g in enumerate(opt.fp16_groups)]
        self._layout(groups)
        ds: list[Any] = self.members  # ZeRO-3 parameters (ds_numel, ds_tensor, ...)
        self.numels = [int(p.ds_numel) for p in ds]
        self.reducer = Reducer(opt.dp_process_group)
        rank = dist.get_rank(group=opt.dp_process_group)
        self._padded: list[Tensor] = []
        for p, n in zip(ds, self.numels):
            part = int(p.ds_tensor.numel())
            start = min(rank * part, n)
            self.ranges.append((start, min(part, n - start)))

    def read(self, fill: Sequence[bool] | None = None) -> list[Tensor]:
        from deepspeed.utils import safe_get_local_grad

        self.present = [True] * len(self.members)
        # float32 views of the partitions (copies when DeepSpeed accumulates in another
        # dtype: write() stores them back); the padding past the parameter's end is left out.
        self._padded = [safe_get_local_grad(p).view(-1) for p in self.members]
        return [g.narrow(0, 0, r[1]) for g, r in zip(self._padded, self.ranges)]

    def write(self, grads: list[Tensor]) -> None:
        from deepspeed.utils import safe_set_local_grad

        for p, g in zip(self.members, self._padded):
            safe_set_local_grad(p, g)

    def clear(self, grads: list[Tensor]) -> None:
        torch._foreach_zero_(self._padded)
        self.write(grads)

    def discard(self) -> None:
        # A backward overwrites a partition only for the parameters it computes a gradient
        # for: without this, a parameter unused by the retain loss would keep the previous
        # step's (forget) gradient in its partition.
        self.read()
        self.clear([])

    def poison(self, grads: list[Tensor]) -> None:
        for g in self._padded:
            g.fill_(float("nan"))
        self.write(grads)


def _shards(engine: Any) -> _Shards:
    stage = int(engine.zero_optimization_stage())
    if getattr(engine, "pipeline_parallelism", False) or getattr(engine, "has_moe_layers", False):
        raise NotImplementedError(
            "GRUDeepSpeed supports data-parallel engines (no pipeline parallelism, no MoE)"
        )
    if stage > 0 and engine.zero_cpu_offload():
        raise NotImplementedError(
            "GRUDeepSpeed does not support ZeRO optimizer offload (offload_optimizer)"
        )
    if stage == 0:
        if engine.fp16_enabled() or engine.bfloat16_enabled():
            raise NotImplementedError(
                "GRUDeepSpeed at ZeRO stage 0 supports fp32 training; for fp16 or bf16 use "
                "ZeRO stage 1, 2 or 3"
            )
        return _Replicated(engine)
    if stage in (1, 2):
        return _Zero12(engine)
    if stage == 3:
        return _Zero3(engine)
    raise NotImplementedError(f"unknown ZeRO stage {stage}")


# --------------------------------------------------------------------------- the passes
class _Pass:
    """One retain or forget pass: counts the engine's backward calls and sets DeepSpeed's
    accumulation boundary on the last of ``gradient_accumulation_steps`` of them.

    While the pass is open, ``engine.backward`` is this pass's wrapper (an attribute of the
    engine instance, removed by :meth:`close`).
    """

    def __init__(self, engine: Any, what: str, micro_batches: int | None = None) -> None:
        self.engine = engine
        self.what = what
        gas = engine.gradient_accumulation_steps() if micro_batches is None else micro_batches
        self.gas = int(gas)
        self.count = 0
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

        engine.backward = backward

    def close(self) -> None:
        if self._saved is None:
            self.engine.__dict__.pop("backward", None)
        else:
            self.engine.backward = self._saved

    def check(self) -> None:
        if self.count != self.gas:
            raise RuntimeError(
                f"the {self.what} called engine.backward {self.count} time(s), expected "
                f"{self.gas}: one call per micro-batch, gradient_accumulation_steps of them "
                "per pass (or micro_batches=, for a shorter step); DeepSpeed divides each "
                "loss by gradient_accumulation_steps, do not divide it yourself"
            )


@dataclass
class _Pending:
    """What the retain side leaves for the step."""

    loss: Tensor | None
    grad_norm: Tensor
    reason: Tensor
    kept: list[Tensor] | None = None
    snapshot: dict[Tensor, Tensor | None] | None = None
    forget: _Pass | None = None


# --------------------------------------------------------------------------- GRUDeepSpeed
class GRUDeepSpeed:
    """Gradient Rectified Unlearning on a DeepSpeed engine (ZeRO stages 0 to 3).

    Each step folds the retain gradient into the memory ``m`` (``m = gamma g_r + (1 -
    gamma) m``), rectifies the forget gradient against it (``g - min(<g, m>, 0) /
    ||m||^2 m``) and steps the engine: the same rule and conventions as
    :class:`~gru_optim.GRUOptimizer`, on the reduced gradients where DeepSpeed keeps them.

    - The memory is sharded like DeepSpeed's gradients: at stages 1-3 each rank keeps the
      memory of its own gradient partition (1/world of the model, float32), at stage 0
      (replicated gradients) the whole of it.
    - ``<g, m>``, ``||m||^2`` and ``||g||^2`` are partial sums over the local partitions,
      summed with one packed all-reduce (3 floats per segment); one more float per step
      tells every rank whether the retain gradient is finite. Nothing is gathered.
    - Gradient accumulation: each closure (or pass) calls ``engine.backward`` once per
      micro-batch, ``gradient_accumulation_steps`` times, without dividing the loss
      (DeepSpeed divides it); GRUDeepSpeed sets the accumulation boundary on the last one.
    - DeepSpeed's own gradient clipping (``gradient_clipping``, default 1.0), loss scaling
      and overflow skipping act in ``engine.step()``, on the rectified gradient. A step
      DeepSpeed skips leaves the memory as it was under fp16 loss scaling (and whenever the
      retain gradient is not finite).

    Args:
        engine: the ``DeepSpeedEngine`` from ``deepspeed.initialize(model=...,
            optimizer=<torch optimizer>, config=...)``.
        gamma: weight of the new retain gradient in the memory, in ``(0, 1]``.
        retain_weight: add this multiple of the retain gradient after rectification (the
            authors' ``+ce``); keeps one more buffer the size of the local partition.
        granularity: ``"global"`` (the paper), ``"group"`` (per parameter group) or
            ``"tensor"`` (per parameter).
        max_grad_norm: clip the final gradient to this norm before the engine's step.
            DeepSpeed's ``gradient_clipping`` does exactly that already: with it set to a
            different positive value this raises (set one of them); ``None`` leaves
            clipping to DeepSpeed.
        cos_clip: the authors' partial projection (a cosine threshold in ``[-1, 0]``).
        directions: ``k > 1`` for GRU-k (the memory and the ``k - 1`` most recent retain
            gradients; ``k - 1`` more buffers the size of the local partition).
        rule: a :class:`~gru_optim.rules.Rule` instead of ``cos_clip`` / ``directions``.
        ema_dtype: dtype of the memory (``None``: float32; ``torch.bfloat16`` halves it).

    Use it with closures::

        def retain_closure():
            loss = retain_loss(engine(batch_r))
            engine.backward(loss)
            return loss

        gru.step(forget_closure, retain_closure)

    or without::

        with gru.retain_pass():
            engine.backward(retain_loss)
        engine.backward(forget_loss)
        gru.step()
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
        _deepspeed()
        for attr in ("zero_optimization_stage", "backward", "step", "optimizer"):
            if not hasattr(engine, attr):
                raise TypeError(
                    "GRUDeepSpeed drives a DeepSpeedEngine (from deepspeed.initialize), got "
                    f"{type(engine).__name__}"
                )
        self.gamma = check_gamma(gamma)
        self.retain_weight = check_retain_weight(retain_weight)
        if granularity not in PARTITIONS:
            raise ValueError(
                f"granularity must be one of {', '.join(map(repr, PARTITIONS))}, "
                f"got {granularity!r}"
            )
        self.granularity = granularity
        rule = make_rule(directions=directions, cos_clip=cos_clip, rule=rule)
        self._rule: Rule = rule
        if self.retain_weight != 0.0 and isinstance(rule, CosClip):
            raise ValueError(
                "cos_clip needs the norm of the forget gradient alone: use retain_weight=0 "
                "with cos_clip"
            )
        self.engine = engine
        self._shards = _shards(engine)
        self.stage = self._shards.stage
        self._fp16 = bool(engine.fp16_enabled())
        history = rule.directions - 1 if isinstance(rule, Cone) else 0
        if history and self._fp16:
            raise NotImplementedError(
                "GRU-k (directions > 1) with fp16 loss scaling is not supported: a skipped "
                "step could not give the recent retain gradients back"
            )
        ds_clip = float(engine.gradient_clipping() or 0.0)
        if max_grad_norm is not None:
            max_grad_norm = real("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
            if ds_clip > 0.0 and ds_clip != max_grad_norm:
                raise ValueError(
                    f"max_grad_norm={max_grad_norm} but the DeepSpeed config clips at "
                    f"gradient_clipping={ds_clip}; both clip the rectified gradient before "
                    "the step: set one of them (gradient_clipping=0 lets GRU clip)"
                )
        # GRU clips only where DeepSpeed does not already clip at the same place.
        self.max_grad_norm = max_grad_norm
        self._clip = max_grad_norm if ds_clip == 0.0 else None
        if ema_dtype == torch.float16:
            raise ValueError(
                "ema_dtype=torch.float16 can overflow (65504); use float32 or bfloat16"
            )
        self._memory = RetainMemory(ema_dtype, history=history)
        key_dtype = ema_dtype or torch.float32
        # One stable key per member, shaped like this rank's fragment (a zero-stride view
        # of one element: RetainMemory allocates each buffer contiguous, of that shape).
        base = torch.zeros((), dtype=key_dtype, device=engine.device)
        self._keys = [base.expand(length) for _, length in self._shards.ranges]
        groups: dict[int, list[Tensor]] = {}
        for k, gi in zip(self._keys, self._shards.group_of):
            groups.setdefault(gi, []).append(k)
        self._segments = PARTITIONS[granularity](
            self._keys, [{"params": groups[g]} for g in sorted(groups)]
        )
        n_seg = 1 if self._segments is None else len(self._segments)
        self._hyper = [rule.defaults()] * n_seg
        self._gamma = {id(k): self.gamma for k in self._keys}
        self._index = {id(p): i for i, p in enumerate(self._shards.members)}
        self._pending: _Pending | None = None
        self._in_pass = False
        self.last_stats: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ introspection
    @property
    def rule(self) -> Rule:
        return self._rule

    def retain_memory(self, param: Tensor) -> Tensor | None:
        """This rank's shard of the memory of ``param`` (flat, the live buffer: do not
        modify it), ``None`` before its first retain gradient. :meth:`shard_range` says
        where it lies in the flattened parameter."""
        return self._memory.get(self._keys[self._member(param)])

    def shard_range(self, param: Tensor) -> tuple[int, int]:
        """``(start, length)`` of this rank's shard inside the flattened ``param``."""
        return self._shards.ranges[self._member(param)]

    @property
    def memory_bytes(self) -> int:
        """Bytes of GRU's buffers on this rank (the memory and, for GRU-k, the recent
        retain gradients; transient per-step buffers are not counted)."""
        total = 0
        for k in self._keys:
            m = self._memory.get(k)
            if m is not None:
                total += m.numel() * m.element_size()
        for hs in self._memory.histories(self._keys) if self._memory.history else []:
            total += sum(h.numel() * h.element_size() for h in hs or [])
        return total

    def _member(self, param: Tensor) -> int:
        i = self._index.get(id(param))
        if i is None:
            raise KeyError("not a trainable parameter of the engine's optimizer")
        return i

    def _loss_scale(self) -> float:
        return float(getattr(self.engine.optimizer, "loss_scale", 1.0)) if self._fp16 else 1.0

    # ------------------------------------------------------------------ passes
    @contextlib.contextmanager
    def _counted(self, what: str, micro_batches: int | None) -> Iterator[_Pass]:
        if self._in_pass:
            raise RuntimeError("a GRU pass is already running")
        self._in_pass = True
        counter = _Pass(self.engine, what, micro_batches)
        try:
            yield counter
        finally:
            counter.close()
            self._in_pass = False
        counter.check()

    @contextlib.contextmanager
    def retain_pass(self, micro_batches: int | None = None) -> Iterator[None]:
        """Back-propagate the retain loss inside (``engine.backward``, once per
        micro-batch). On exit the retain gradient is folded into the memory and the
        gradients are cleared; the forget backward passes follow, then :meth:`step`.

        ``micro_batches``: how many ``engine.backward`` calls each pass of this step makes
        (default: the engine's ``gradient_accumulation_steps``; fewer for the short last
        step of an epoch). GRUDeepSpeed sets the accumulation boundary on the last one."""
        if self._pending is not None:
            raise RuntimeError(
                "retain_pass entered twice before step(): put all retain micro-batches in "
                "one retain_pass, then back-propagate the forget loss and call step()"
            )
        self._shards.discard()
        with self._counted("retain pass", micro_batches):
            yield
        pending = self._retain_side(None)
        # Count the forget backward passes that follow, until step().
        pending.forget = _Pass(self.engine, "forget pass", micro_batches)

    def step(
        self,
        forget_closure: Closure | None = None,
        retain_closure: Closure | None = None,
        *,
        micro_batches: int | None = None,
    ) -> Any:
        """One GRU step, then ``engine.step()``.

        - ``step(forget_closure, retain_closure)``: runs the retain closure, folds its
          gradient into the memory, clears the gradients, runs the forget closure,
          rectifies and steps. Each closure computes its loss, calls ``engine.backward``
          (once per micro-batch) and returns the loss. Returns the forget loss.
        - ``step()`` (or ``step(forget_closure)``) after :meth:`retain_pass`: rectifies
          what the forget backward passes since then left, and steps.
        - ``step(forget_closure)`` alone: a plain step of the engine (nothing rectified).

        ``micro_batches`` as in :meth:`retain_pass`, for the closures.
        """
        for name, fn in (("forget_closure", forget_closure), ("retain_closure", retain_closure)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable (a closure), got {type(fn).__name__}")
        if retain_closure is not None and self._pending is not None:
            raise RuntimeError("step() got a retain_closure after a retain_pass(); use one")
        loss: Any = None
        if retain_closure is not None:
            self._shards.discard()
            with self._counted("retain closure", micro_batches):
                retain_loss = check_loss(retain_closure(), "retain closure")
            self._retain_side(retain_loss)
        elif self._pending is None:
            if forget_closure is not None:
                with self._counted("forget closure", micro_batches):
                    loss = check_loss(forget_closure(), "forget closure")
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.step()
            code = 0 if self.engine.was_step_applied() else int(SkipReason.SCALER_OVERFLOW)
            reason = torch.full((), code, device=self.engine.device)
            self.last_stats = plain_stats(self.engine.device, loss, reason, clipping=False)
            return loss
        pending = self._pending
        assert pending is not None
        try:
            counter = pending.forget
            if counter is not None:
                pending.forget = None
                try:
                    if forget_closure is not None:
                        loss = check_loss(forget_closure(), "forget closure")
                finally:
                    counter.close()
                counter.check()
            elif forget_closure is not None:
                with self._counted("forget closure", micro_batches):
                    loss = check_loss(forget_closure(), "forget closure")
            else:
                raise RuntimeError("no forget pass: give step() the forget closure")
            self._forget_side(pending, loss)
        finally:
            if pending.forget is not None:
                pending.forget.close()
            self._pending = None
        return loss

    # ------------------------------------------------------------------ the two sides
    def _retain_side(self, loss: Any) -> _Pending:
        shards = self._shards
        grads = shards.read()
        scale = self._loss_scale()
        with torch.no_grad():
            total = sum_sq(grads, all_reduce=shards.reducer.fn)  # (scaled) ||g_r||^2
            device = total.device
            reason = reason_of((~torch.isfinite(total), SkipReason.RETAIN_NONFINITE), device=device)
            pending = _Pending(
                loss=loss.detach().reshape(()) if isinstance(loss, Tensor) else None,
                grad_norm=total.sqrt() / scale,
                reason=reason,
            )
            if not bool(reason != 0):  # the retain side's one host read
                if self.retain_weight != 0.0:
                    # Added after rectification, in the units of the (scaled) forget gradient.
                    pending.kept = [g * self.retain_weight for g in grads]
                if self._fp16:
                    # fp16 steps are skipped on overflow: keep what to give back.
                    pending.snapshot = {
                        k: (None if (m := self._memory.get(k)) is None else m.clone())
                        for k in self._keys
                    }
                work = grads
                if scale != 1.0:
                    work = [g.to(torch.float32, copy=True) for g in grads]
                    torch._foreach_mul_(work, 1.0 / scale)
                have = [i for i, ok in enumerate(shards.present) if ok]
                self._memory.fold_(
                    [self._keys[i] for i in have],
                    [work[i] for i in have],
                    self._keys,
                    self._gamma,
                )
            shards.clear(grads)
        self._pending = pending
        return pending

    def _forget_side(self, pending: _Pending, loss: Any) -> None:
        shards = self._shards
        engine = self.engine
        grads = shards.read(fill=[self._memory.get(k) is not None for k in self._keys])
        scale = self._loss_scale()
        clipping = self.max_grad_norm is not None
        grad_norm = clip = None
        with torch.no_grad():
            directions = self._memory.locals(self._keys)
            history = self._memory.histories(self._keys) if self._memory.history else None
            sol = self._rule.solve(
                grads,
                directions,
                self._segments,
                shards.reducer,
                hyper=self._hyper,
                numels=shards.numels,
                history=history,
            )
            device = sol.coef.device
            reason = reason_of(
                (pending.reason.to(device) != 0, SkipReason.RETAIN_NONFINITE),
                (~torch.isfinite(sol.stats.grad_sq_norm).all(), SkipReason.FORGET_NONFINITE),
                (~sol.ok, SkipReason.OUT_OF_RANGE),
                device=device,
            )
            skip = bool(reason != 0)  # the step's one host read
            if skip:
                # Hand the step to DeepSpeed's overflow handling (skipped, loss scale
                # lowered); at stage 0, which has no such check, GRU skips it itself.
                shards.poison(grads)
            else:
                self._rule.apply_(grads, directions, sol, self._segments, history=history)
                if pending.kept is not None:
                    torch._foreach_add_(grads, pending.kept)
                if self._clip is not None:
                    grad_norm = total_norm(grads, all_reduce=shards.reducer.fn) / scale
                    clip = clip_coefficient(grad_norm, self._clip)
                    torch._foreach_mul_(grads, clip)
                shards.write(grads)
        if skip and not shards.skips_itself:
            applied = False
        else:
            engine.set_gradient_accumulation_boundary(True)
            engine.step()
            applied = bool(engine.was_step_applied())
        if not applied:
            if not skip:
                reason = torch.full_like(reason, int(SkipReason.SCALER_OVERFLOW))
            if pending.snapshot is not None:
                self._restore(pending.snapshot)
        inv = 1.0 / scale  # the sums of a scaled forget gradient, in unscaled units
        self.last_stats = step_stats(
            loss=loss,
            retain_loss=pending.loss,
            retain_grad_norm=pending.grad_norm,
            dot=sol.stats.dot * inv,
            ema_sq_norm=sol.stats.ema_sq_norm,
            grad_sq_norm=sol.stats.grad_sq_norm * inv**2,
            coef=sol.coef * inv,
            reason=reason,
            grad_norm=grad_norm,
            clip_coef=clip,
            active=sol.active,
            min_slack=sol.min_slack * inv,
            clipping=clipping and self._clip is not None,
        )

    def _restore(self, snapshot: dict[Tensor, Tensor | None]) -> None:
        """Give the memory back its state before this step's fold."""
        for k, m in snapshot.items():
            if m is None:
                self._memory.drop(k)
            else:
                buf = self._memory.get(k)
                assert buf is not None
                buf.copy_(m)

    # ------------------------------------------------------------------ checkpoints
    def _files(self, tag_dir: str, rank: int) -> str:
        return os.path.join(tag_dir, MEMORY_FILE.format(rank=rank))

    def save_checkpoint(
        self,
        save_dir: str,
        tag: Any = None,
        client_state: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``engine.save_checkpoint(save_dir, tag, ...)``, then this rank's memory shard
        next to DeepSpeed's files (``<save_dir>/<tag>/gru_memory_rank<r>.pt``). Call it on
        every rank, after :meth:`step`. Returns what the engine's call returns."""
        import torch.distributed as dist

        if self._pending is not None:
            raise RuntimeError(
                "save_checkpoint() between retain_pass() and step(): the memory is one fold "
                "ahead of the weights; save after step()"
            )
        if tag is None:
            tag = f"global_step{self.engine.global_steps}"  # the engine's default tag
        out = self.engine.save_checkpoint(
            save_dir, tag=tag, client_state=client_state or {}, **kwargs
        )
        rank = dist.get_rank() if dist.is_initialized() else 0
        state = {
            "format": _FORMAT,
            "stage": self.stage,
            "rank": rank,
            "names": self._names(),
            "numels": list(self._shards.numels),
            "ranges": list(self._shards.ranges),
            "gamma": self.gamma,
            "rule": self._rule.name,
            "memory": [self._memory.entry(k).detach().cpu() for k in self._keys],
            "history": (
                [[h.detach().cpu() for h in self._memory.history_entry(k)] for k in self._keys]
                if self._memory.history
                else None
            ),
        }
        path = self._files(os.path.join(save_dir, str(tag)), rank)
        torch.save(state, path)
        if dist.is_initialized():
            dist.barrier()
        return out

    def load_checkpoint(self, load_dir: str, tag: Any = None, **kwargs: Any) -> Any:
        """``engine.load_checkpoint(load_dir, tag, ...)``, then the memory shards saved by
        :meth:`save_checkpoint` (re-partitioned when the number of ranks or the ZeRO stage
        differ). Everything is validated before the memory changes. Returns what the
        engine's call returns."""
        if self._pending is not None:
            raise RuntimeError("load_checkpoint() between retain_pass() and step()")
        out = self.engine.load_checkpoint(load_dir, tag=tag, **kwargs)
        load_path = out[0] if isinstance(out, tuple) else out
        if load_path is None:
            return out
        tag_dir = os.path.dirname(str(load_path))
        files = sorted(glob.glob(os.path.join(tag_dir, MEMORY_FILE.replace("{rank:05d}", "*"))))
        if not files:
            raise FileNotFoundError(
                f"no GRU memory in {tag_dir} (the checkpoint was not saved with "
                "GRUDeepSpeed.save_checkpoint)"
            )
        self._load_memory(files)
        return out

    def _names(self) -> list[str]:
        names = {id(p): n for n, p in self.engine.module.named_parameters()}
        return [names.get(id(p), f"param{i}") for i, p in enumerate(self._shards.members)]

    def _load_memory(self, files: list[str]) -> None:
        names, numels = self._names(), self._shards.numels
        ranges = self._shards.ranges
        n = len(self._keys)
        mem: list[Tensor | None] = [None] * n
        hist: list[list[Tensor] | None] = [None] * n
        covered = [0] * n
        for path in files:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if saved.get("format") != _FORMAT:
                raise ValueError(f"{path}: not a GRU memory file of format {_FORMAT}")
            if saved["names"] != names or saved["numels"] != numels:
                raise ValueError(
                    f"{path}: the memory was saved for other parameters "
                    f"({len(saved['names'])} tensors); the checkpoint comes from another model"
                )
            if (saved["history"] is not None) != bool(self._memory.history):
                raise ValueError(
                    f"{path}: saved with {'' if saved['history'] else 'no '}recent retain "
                    "gradients (GRU-k); build GRUDeepSpeed with the same directions="
                )
            for i, ((start, length), (s_start, s_len)) in enumerate(zip(ranges, saved["ranges"])):
                lo, hi = max(start, s_start), min(start + length, s_start + s_len)
                if hi <= lo:
                    continue
                where = f"{names[i]} in {path}"
                src = RetainMemory.check_entry(
                    torch.empty(s_len, device="meta"), saved["memory"][i].reshape(-1), where
                )
                if mem[i] is None:
                    mem[i] = torch.zeros(length, dtype=src.dtype)
                _copy_overlap(mem[i], start, src, s_start, lo, hi)
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
        saved_mem = {k: m for k, m in zip(self._keys, mem) if m is not None}
        saved_hist = {k: h for k, h in zip(self._keys, hist) if h is not None}
        self._memory.commit(self._memory.prepare(saved_mem, saved_hist or None))


def _copy_overlap(
    dst: Tensor | None, start: int, src: Tensor, s_start: int, lo: int, hi: int
) -> None:
    """``dst[lo - start : hi - start] = src[lo - s_start : hi - s_start]`` (flat tensors
    holding the elements ``start...`` and ``s_start...`` of one flattened parameter)."""
    assert dst is not None
    dst.narrow(0, lo - start, hi - lo).copy_(src.narrow(0, lo - s_start, hi - lo))
