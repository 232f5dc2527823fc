"""DeepSpeed integration (the ``deepspeed`` extra, ``pip install "gru-optim[deepspeed]"``,
pins the tested DeepSpeed, 0.19.8): :class:`GRUDeepSpeed` drives a ``DeepSpeedEngine`` at
ZeRO stage 0 to 3 with the same engine as :class:`~gru_optim.GRUOptimizer`. The only
package that knows DeepSpeed: the stages' gradients (:mod:`._stages`), the passes, the
accumulation boundary and the checkpoint files (:mod:`._driver`).
"""

from ._driver import MEMORY_FILE, GRUDeepSpeed

__all__ = ["GRUDeepSpeed", "MEMORY_FILE", "TESTED_DEEPSPEED"]

TESTED_DEEPSPEED = "0.19.8"
"""The DeepSpeed release this integration is tested with (the ``deepspeed`` extra pins it)."""
