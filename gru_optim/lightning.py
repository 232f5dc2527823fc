"""PyTorch Lightning integration: :mod:`gru_optim.integrations.lightning`, re-exported
here so that ``gru_optim.lightning`` keeps working (needs the ``lightning`` extra)."""

from .integrations.lightning import (
    GRULightningModule,
    ResumableDataLoader,
    find_gru_optimizer,
    retain_closure,
)

__all__ = ["GRULightningModule", "ResumableDataLoader", "find_gru_optimizer", "retain_closure"]
