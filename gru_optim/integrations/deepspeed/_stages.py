"""Where each ZeRO stage keeps this rank's reduced gradient: the DeepSpeed gradient sources.

Per stage (DeepSpeed 0.19.8): stage 0, ``param.grad`` (all-reduced by the engine at the
accumulation boundary; the memory is replicated like it); stages 1 and 2,
``param._hp_mapping.get_lp_grad_fragment(param._index_in_param_group)``, this rank's
fragment of the reduced partition, at ``lp_fragment_address`` in the parameter (private:
DeepSpeed has no public per-rank gradient API there), groups from ``bit16_groups``;
stage 3, the public ``deepspeed.utils.safe_get_local_grad`` / ``safe_set_local_grad`` on
the padded local partition, ``ds_numel``, ``ds_tensor``, groups from ``fp16_groups`` and
``sub_group_to_group_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...engine._reduce import Reducer
from ...engine._sources import FragmentSource

__all__ = ["Shards", "shards_of"]


class Shards(FragmentSource):
    """One ZeRO stage's gradients (a :class:`~gru_optim.engine._sources.FragmentSource`),
    stepped by ``engine.step()``."""

    stage = 0

    def __init__(self, engine: Any, groups: Sequence[tuple[int, Sequence[Tensor]]]) -> None:
        super().__init__(groups)
        self.engine = engine

    def step_driver(self) -> bool:
        """``engine.step()`` at the accumulation boundary; whether it was applied."""
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        self.applied = bool(self.engine.was_step_applied())
        return self.applied


class _Replicated(Shards):
    """ZeRO stage 0: ``param.grad``, which the client optimizer steps; GRU skips itself."""

    skips_itself = False

    def __init__(self, engine: Any) -> None:
        super().__init__(
            engine, list(enumerate(g["params"] for g in engine.optimizer.param_groups))
        )

    def _read(self, fill: Sequence[bool] | None) -> list[Tensor]:
        out = []
        for i, p in enumerate(self.members):
            if p.grad is None and fill is not None and fill[i]:
                p.grad = torch.zeros_like(p)  # a zero forget gradient takes its correction
            self.present[i] = p.grad is not None
            out.append(p.grad.view(-1) if p.grad is not None else torch.zeros_like(p).view(-1))
        return out

    def clear(self, grads: list[Tensor]) -> None:
        self.discard()

    def discard(self) -> None:
        for p in self.members:
            p.grad = None

    def poison(self, grads: list[Tensor]) -> None:
        self.clear(grads)


class _Zero12(Shards):
    """ZeRO stages 1 and 2: one flat fp32 partition per group per rank (a parameter may be
    split between ranks), reached through each parameter's ``_hp_mapping``."""

    def __init__(self, engine: Any) -> None:
        opt = engine.optimizer
        super().__init__(engine, list(enumerate(opt.bit16_groups)))
        self.stage = int(engine.zero_optimization_stage())
        self.reducer = Reducer(opt.dp_process_group)
        self._empty = [
            torch.zeros(0, dtype=torch.float32, device=engine.device) for _ in self.members
        ]
        maps = [getattr(p, "_hp_mapping", None) for p in self.members]
        self.ranges = [
            (0, 0)
            if m is None
            else (int(m.lp_fragment_address.start), int(m.lp_fragment_address.numel))
            for m in maps
        ]

    def _read(self, fill: Sequence[bool] | None) -> list[Tensor]:
        out = []
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


class _Zero3(Shards):
    """ZeRO stage 3: every parameter partitioned (padded to a multiple of the number of
    ranks), read and written with DeepSpeed's public local-gradient API."""

    stage = 3

    def __init__(self, engine: Any) -> None:
        import torch.distributed as dist

        opt = engine.optimizer
        ids = opt.sub_group_to_group_id
        super().__init__(engine, [(int(ids[i]), g) for i, g in enumerate(opt.fp16_groups)])
        ds: list[Any] = self.members  # ZeRO-3 parameters (ds_numel, ds_tensor, ...)
        self.numels = [int(p.ds_numel) for p in ds]
        self.reducer = Reducer(opt.dp_process_group)
        rank = dist.get_rank(group=opt.dp_process_group)
        self._padded: list[Tensor] = []
        parts = [int(p.ds_tensor.numel()) for p in ds]
        starts = [min(rank * part, n) for part, n in zip(parts, self.numels)]
        self.ranges = [(s, min(part, n - s)) for s, part, n in zip(starts, parts, self.numels)]

    def _read(self, fill: Sequence[bool] | None) -> list[Tensor]:
        from deepspeed.utils import safe_get_local_grad

        # float32 views of the partitions (copies when DeepSpeed accumulates in another
        # dtype: write() stores them back); the padding past the parameter's end left out.
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
        # for: a parameter unused by the retain loss would keep the previous step's.
        self.read()
        self.clear([])

    def poison(self, grads: list[Tensor]) -> None:
        for g in self._padded:
            g.fill_(float("nan"))
        self.write(grads)


def shards_of(engine: Any) -> Shards:
    """The gradient source for ``engine``'s ZeRO stage (raises for what is unsupported)."""
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
