"""DeepSpeed integration (needs the ``deepspeed`` extra: ``pip install "gru-optim[deepspeed]"``,
which pins the tested DeepSpeed, 0.19.8).

:class:`GRUDeepSpeed` drives an engine made by ``deepspeed.initialize(model=...,
optimizer=<a torch optimizer>, config=...)`` at ZeRO stage 0, 1, 2 or 3 with the same
:class:`~gru_optim.engine._engine.Engine` as :class:`~gru_optim.GRUOptimizer`. This
package is the only one that knows DeepSpeed: where each stage keeps this rank's reduced
gradient (:mod:`._stages`), the accumulation boundary and the passes (:mod:`._driver`),
and the checkpoint files (:mod:`._checkpoint`). Besides those, it relies on
``engine.set_gradient_accumulation_boundary``, ``engine.was_step_applied``,
``engine.optimizer.loss_scale`` (fp16) and ``engine.optimizer.dp_process_group``.
"""

from ._checkpoint import MEMORY_FILE
from ._driver import GRUDeepSpeed

__all__ = ["GRUDeepSpeed", "MEMORY_FILE", "TESTED_DEEPSPEED"]

TESTED_DEEPSPEED = "0.19.8"
"""The DeepSpeed release this integration is tested with (the ``deepspeed`` extra pins it)."""
