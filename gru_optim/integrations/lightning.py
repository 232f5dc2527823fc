"""PyTorch Lightning integration (needs the ``lightning`` extra:
``pip install "gru-optim[lightning]"``, which brings ``pytorch-lightning`` 2.6).

- :class:`GRULightningModule`: a ``LightningModule`` whose automatic optimization steps
  GRU. Define ``training_step`` (the forget loss, the one minimised), ``retain_step``
  (the retain loss) and ``configure_optimizers`` (returning a
  :class:`~gru_optim.GRUOptimizer`).
- :func:`retain_closure`: the retain closure it passes to ``optimizer.step``, for a
  ``optimizer_step`` of your own.
- :func:`find_gru_optimizer`: the ``GRUOptimizer`` inside Lightning's optimizer wrapper,
  for manual optimization (``retain_pass()`` must be entered on it, not on the wrapper).
- :class:`ResumableDataLoader`: a ``DataLoader`` that ``Trainer.fit(ckpt_path=...)``
  resumes in the middle of an epoch where it stopped, instead of replaying the epoch.

``docs/guides/lightning.md`` shows all four, under DDP and through a checkpoint resume.
Only ``pytorch_lightning`` is supported (not the ``lightning.pytorch`` namespace of the
``lightning`` package, whose classes are distinct).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader

try:
    import pytorch_lightning as pl
    from pytorch_lightning.core.optimizer import LightningOptimizer
except ImportError as e:  # pragma: no cover - exercised by tests/test_lightning.py
    raise ImportError(
        "gru_optim.lightning needs PyTorch Lightning: install the 'lightning' extra, "
        'pip install "gru-optim[lightning]"'
    ) from e

from .._optimizer import GRUOptimizer

__all__ = ["GRULightningModule", "ResumableDataLoader", "find_gru_optimizer", "retain_closure"]


def find_gru_optimizer(optimizer: Any) -> GRUOptimizer:
    """The :class:`~gru_optim.GRUOptimizer` itself: ``optimizer``, or the optimizer inside
    Lightning's ``LightningOptimizer`` (what ``self.optimizers()`` returns and
    ``optimizer_step`` receives).

    The wrapper passes ``isinstance(opt, GRUOptimizer)`` and has GRU's methods (they
    act on the real optimizer, see ``GRUOptimizer._real``); keep calling ``step()`` on
    Lightning's wrapper (its progress counters and hooks).

    Raises:
        TypeError: there is no ``GRUOptimizer`` there.
    """
    while isinstance(optimizer, LightningOptimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, GRUOptimizer):
        raise TypeError(
            f"expected a GRUOptimizer (configure_optimizers must return one), got "
            f"{type(optimizer).__name__}"
        )
    return optimizer


def retain_closure(
    module: pl.LightningModule, *args: Any, step: str = "retain_step", **kwargs: Any
) -> Callable[[], Tensor]:
    """A retain closure for ``optimizer.step(closure=optimizer_closure,
    retain_closure=...)`` in a ``LightningModule.optimizer_step`` (automatic
    optimization).

    Calling it runs ``module.<step>(*args, **kwargs)`` (by default ``retain_step``, which
    returns the scalar retain loss) the way Lightning runs ``training_step``: inside the
    precision plugin's train-step context, and through the module the strategy runs
    forward through (``trainer.strategy.model``). Under DDP that is the
    ``DistributedDataParallel`` wrapper, whose forward arms the all-reduce of the next
    backward: every rank then folds the same, global retain gradient into its memory,
    and the replicas stay identical. (Calling ``module.retain_step`` directly, the bare
    module, would fold each rank's local gradient: the replicas drift apart.) It then
    back-propagates the loss with the strategy's ``backward`` (so
    ``LightningModule.backward`` and the ``on_before_backward`` / ``on_after_backward``
    hooks run for it, as for the forget loss) and returns the loss, detached.
    """

    def closure() -> Tensor:
        strategy = module.trainer.strategy
        with strategy.precision_plugin.train_step_context():
            wrapper = strategy.model
            if wrapper is not None and wrapper is not module:
                # The route Strategy.training_step takes (Lightning 2.6): the method is
                # called from inside the wrapper's forward.
                loss = strategy._forward_redirection(wrapper, module, step, *args, **kwargs)
            else:
                loss = getattr(module, step)(*args, **kwargs)
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"{type(module).__name__}.{step} must return the retain loss (a scalar "
                f"tensor), got {type(loss).__name__}"
            )
        strategy.backward(loss, None)
        return loss.detach()

    return closure


class GRULightningModule(pl.LightningModule):
    """A ``LightningModule`` whose automatic optimization steps GRU.

    Subclass it instead of ``LightningModule`` and define ``training_step`` (returns the
    forget loss: the loss minimised, e.g. ``-cross_entropy`` for gradient ascent),
    :meth:`retain_step` (returns the retain loss of the same batch) and
    ``configure_optimizers`` (returns one :class:`~gru_optim.GRUOptimizer`). Each
    optimizer step then is ``optimizer.step(closure=optimizer_closure,
    retain_closure=retain_closure(self, batch, batch_idx))``: GRU runs the retain step
    first (through DDP's forward under DDP, see :func:`retain_closure`), folds its
    gradient into the memory, then runs Lightning's closure (``training_step``,
    ``zero_grad``, which GRU leaves alone there, and ``backward``), rectifies and steps.
    Gradients left over from the previous step are cleared by GRU before the retain
    side. The result equals ``opt.zero_grad(); opt.step(forget_closure,
    retain_closure)`` in a plain loop (``tests/test_lightning.py``).

    The batch reaches :meth:`optimizer_step` through :meth:`on_train_batch_start`: an
    override of that hook must call ``super().on_train_batch_start(batch, batch_idx)``.

    Refused, with an error at the first step, because Lightning would compute something
    else than GRU: ``Trainer(accumulate_grad_batches > 1)`` (the forget micro-batches
    are back-propagated before the retain side, which clears them; accumulate inside
    ``training_step`` / ``retain_step``, or use manual optimization),
    ``Trainer(gradient_clip_val=...)`` (Lightning would clip the unrectified forget
    gradient; use ``GRUOptimizer(max_grad_norm=...)``) and a precision with a gradient
    scaler, ``"16-mixed"`` (Lightning runs the closure before ``optimizer.step``; use
    ``"bf16-mixed"``, ``"32-true"`` or ``"64-true"``).
    """

    _gru_batch: tuple[Any, int] | None = None

    def retain_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The retain loss of ``batch`` (a scalar tensor). Do not call ``backward``."""
        raise NotImplementedError(
            f"{type(self).__name__} must define retain_step(batch, batch_idx), returning "
            "the retain loss"
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """Keeps the batch (already on the device) for :meth:`optimizer_step`."""
        self._gru_batch = (batch, batch_idx)
        return None

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Optimizer | LightningOptimizer,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """``optimizer.step(closure=optimizer_closure, retain_closure=...)`` with the
        retain closure of this batch (:func:`retain_closure` over :meth:`retain_step`).

        Raises:
            TypeError: the optimizer is not a ``GRUOptimizer``.
            ValueError: the Trainer accumulates, clips or scales gradients (see above).
            RuntimeError: ``on_train_batch_start`` did not record this batch.
        """
        gru = find_gru_optimizer(optimizer)
        trainer = self.trainer
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "GRULightningModule does not support Trainer(accumulate_grad_batches > 1): "
                "Lightning back-propagates the forget micro-batches before GRU's retain "
                "side, which clears them. Accumulate inside training_step/retain_step, or "
                "use manual optimization with retain_pass()"
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                "Trainer(gradient_clip_val=...) would clip the forget gradient before GRU "
                "rectifies it; use GRUOptimizer(..., max_grad_norm=...) instead"
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "a precision with a gradient scaler ('16-mixed') runs Lightning's closure "
                "before optimizer.step, after which GRU's retain side would clear the "
                "forget gradient; use 'bf16-mixed', '32-true' or '64-true'"
            )
        recorded = self._gru_batch
        if recorded is None or recorded[1] != batch_idx:
            raise RuntimeError(
                "the batch of this step was not recorded: an override of "
                "on_train_batch_start must call super().on_train_batch_start(batch, batch_idx)"
            )
        self._gru_batch = None
        # Lightning hands its wrapper (whose step runs the strategy and precision plugin).
        stepper = optimizer if isinstance(optimizer, LightningOptimizer) else gru
        stepper.step(
            closure=optimizer_closure,
            retain_closure=retain_closure(self, recorded[0], batch_idx),
        )


class ResumableDataLoader(DataLoader[Any]):
    """A ``DataLoader`` that ``Trainer.fit(ckpt_path=...)`` resumes where it stopped.

    Lightning keeps the ``state_dict()`` of a loader that has one in its checkpoints and
    loads it back before iterating again. A plain ``DataLoader`` has none: a resume from a
    checkpoint taken in the middle of an epoch replays that epoch from its first batch
    (Lightning warns that the dataloader "is not resumable"), so the resumed run trains on
    other batches than the uninterrupted one.

    The state here is the number of batches the current epoch has yielded. After
    :meth:`load_state_dict`, the next iteration skips that many batches of the epoch
    (they are still loaded, then dropped) and yields the rest; a state taken at the end
    of an epoch starts the next epoch from its beginning. This is exact when the order
    of an epoch's batches is a function of the epoch alone: a sequential sampler, or one
    that shuffles by epoch (``DistributedSampler``, whose ``set_epoch`` Lightning calls),
    not one drawing from a global random state. It needs a dataset with a length
    (Lightning prefetches a batch of a loader without one, which then counts as
    yielded).
    """

    _yielded = 0
    _resume_at = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        for batch in itertools.islice(super().__iter__(), start, None):
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"batches": n}``: the current epoch has yielded ``n`` batches."""
        return {"batches": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next iteration skip the ``state_dict["batches"]`` batches already
        trained on (none when they were the whole epoch)."""
        n = int(state_dict["batches"])
        self._resume_at = n if n < len(self) else 0
