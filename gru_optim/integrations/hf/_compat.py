"""What differs between the supported ``transformers`` releases (4.45 through 5.x), decided
once, here."""

from __future__ import annotations

import inspect

from transformers import Trainer

#: ``Trainer.training_step(model, inputs, num_items_in_batch)`` (4.46 and later) or
#: ``training_step(model, inputs)`` (4.45).
TRAINING_STEP_TAKES_NUM_ITEMS = (
    "num_items_in_batch" in inspect.signature(Trainer.training_step).parameters
)

#: The Trainer clips through an overridable ``_clip_grad_norm`` method (5.x); before, the
#: clipping is written inline in the training loop and only ``args.max_grad_norm`` turns
#: it off.
TRAINER_CLIPS_IN_A_METHOD = hasattr(Trainer, "_clip_grad_norm")


def accepts_keyword(fn: object, name: str) -> bool:
    """Whether the callable ``fn`` takes the keyword argument ``name`` (or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
