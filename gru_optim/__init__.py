"""gru_optim: Gradient Rectified Unlearning (GRU) as a drop-in ``torch.optim`` wrapper.

Wrap any optimizer, give ``step`` a forget closure and a retain closure (or use
``retain_pass`` in loops that call ``backward`` themselves), and every update is the
forget gradient with its conflict against the retain gradient's memory projected out.

``gru_optim.objectives`` holds the unlearning objectives, ``gru_optim.data`` paired
forget/retain data, and ``gru_optim.hf`` (``hf`` extra, imported on demand) the Hugging
Face ``GRUTrainer``.
"""

from . import data, functional, objectives
from ._optimizer import EMA_KEY, GRUOptimizer, RetainPass
from ._version import __version__

__all__ = ["EMA_KEY", "GRUOptimizer", "RetainPass", "__version__", "data", "functional", "objectives"]
