"""The AMP boundary: everything GRU does with a ``torch.amp.GradScaler``.

GRU owns the unscaling when it is given the scaler (``GRUOptimizer(grad_scaler=...)``):
the retain gradient must be unscaled before it enters the memory, the forget gradient
before the rectification, each exactly once, and the scaler must count both for its
overflow bookkeeping. The scaler keys that bookkeeping by optimizer object, so the retain
gradient is unscaled on behalf of a stand-in object (:class:`_RetainGradients`) and the
forget gradient on behalf of the GRU optimizer itself. This module is the only place
that reads the scaler's private state.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["AmpBoundary"]


class _RetainGradients:
    """Stands for the retain gradient in ``GradScaler.unscale_`` (which keys its
    bookkeeping by object and reads only ``param_groups``); ``owner``: a weak
    reference to the optimizer."""

    def __init__(self, owner: Callable[[], Any]) -> None:
        self._owner = owner

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._owner().param_groups  # type: ignore[no-any-return]


class AmpBoundary:
    """GRU's use of one gradient scaler (or none) on behalf of ``owner``.

    The owner holds this boundary (through its engine); the boundary holds it back only
    weakly, so that a dropped optimizer, and its parameter-sized memory, is freed by
    reference counting, not left in a cycle for the garbage collector. A copy (deep copy,
    pickle) of the owner gets a boundary bound to the copy."""

    def __init__(self, scaler: Any, owner: Any) -> None:
        if scaler is not None and not (
            callable(getattr(scaler, "unscale_", None))
            and callable(getattr(scaler, "is_enabled", None))
        ):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}"
            )
        self.scaler = scaler
        self._bind(owner)

    def _bind(self, owner: Any) -> None:
        self._owner_ref = weakref.ref(owner)
        self._retain_owner = _RetainGradients(self._owner_ref)

    @property
    def _owner(self) -> Any:
        return self._owner_ref()

    def __getstate__(self) -> dict[str, Any]:
        return {"scaler": self.scaler, "owner": self._owner}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.scaler = state["scaler"]
        self._bind(state["owner"])

    @property
    def enabled(self) -> bool:
        return self.scaler is not None and bool(self.scaler.is_enabled())

    def _stage(self, owner: Any) -> str | None:
        states = getattr(self.scaler, "_per_optimizer_states", {})
        state = states.get(id(owner)) if isinstance(states, dict) else None
        return None if state is None else getattr(state.get("stage"), "name", None)

    def caller_unscaled(self) -> bool:
        """Whether the caller already unscaled the forget gradient (to clip it)."""
        return self.enabled and self._stage(self._owner) == "UNSCALED"

    def _unscale(self, owner: Any) -> None:
        try:
            self.scaler.unscale_(owner)
        except RuntimeError as e:
            raise RuntimeError(
                f"{e} With GRUOptimizer(grad_scaler=scaler) call scaler.update() once per "
                "iteration, after opt.step() (or scaler.step(opt))."
            ) from e

    def unscale_retain(self) -> None:
        """Unscale the retain gradient now in ``.grad`` (once per iteration)."""
        if self.enabled:
            self._unscale(self._retain_owner)

    def unscale_forget(self) -> None:
        """Unscale the forget gradient now in ``.grad``, unless the caller already did."""
        if self.enabled and not self.caller_unscaled():
            self._unscale(self._owner)

    def found_inf(self, device: torch.device) -> Tensor | None:
        """The scaler's overflow flag for the gradients unscaled so far this iteration
        (summed over both unscale calls), on ``device``; ``None`` without a scaler."""
        if not self.enabled:
            return None
        states = getattr(self.scaler, "_per_optimizer_states", {})
        total = torch.zeros((), device=device)
        for owner in (self._retain_owner, self._owner):
            state = states.get(id(owner), {})
            for v in state.get("found_inf_per_device", {}).values():
                total = total + v.to(device)
        return total > 0

    def scaled(self, value: float, device: torch.device) -> Tensor | float:
        """``value`` times the current scale (to keep a part of ``.grad`` scaled like the
        gradients a later scaled backward adds on top)."""
        if not self.enabled:
            return value
        return self.scaler.scale(torch.full((), value, device=device))  # type: ignore[no-any-return]

    def inv_scale(self, device: torch.device) -> Tensor | None:
        """``1 / scale`` as the scaler computes it for unscaling, or ``None``."""
        if not self.enabled:
            return None
        scale = self.scaler._scale  # noqa: SLF001 - the one read of the scale
        if scale is None:
            return None
        inv: Tensor = scale.double().reciprocal().float().to(device)
        return inv

    def reject_scaler_step(self, opt: Any) -> None:
        """``GradScaler.step(opt)`` on a GRU optimizer built without ``grad_scaler=``
        leaves ``found_inf``/``grad_scale`` on it (deleted only after a successful
        step): refuse, since the retain gradient would enter the memory scaled."""
        if "found_inf" in opt.__dict__ and self.scaler is None:
            opt.__dict__.pop("found_inf", None)
            opt.__dict__.pop("grad_scale", None)
            raise RuntimeError(
                "GradScaler.step() got a GRUOptimizer built without grad_scaler=: build it "
                "with GRUOptimizer(inner, grad_scaler=scaler) so that the retain gradient is "
                "unscaled before it enters the memory"
            )
