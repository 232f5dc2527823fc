"""DeepSpeed integration: :mod:`gru_optim.integrations.deepspeed`, re-exported here so
that ``gru_optim.deepspeed`` keeps working (needs the ``deepspeed`` extra)."""

from .integrations.deepspeed import MEMORY_FILE, TESTED_DEEPSPEED, GRUDeepSpeed

__all__ = ["GRUDeepSpeed", "MEMORY_FILE", "TESTED_DEEPSPEED"]
