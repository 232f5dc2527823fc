"""gru_optim: Gradient Rectified Unlearning (GRU) as a drop-in ``torch.optim`` wrapper.

Wrap any optimizer, give ``step`` a forget closure and a retain closure (or use
``retain_pass`` in loops that call ``backward`` themselves), and every update is the
forget gradient with its conflict against the retain gradient's memory projected out.

``gru_optim.objectives`` holds the unlearning objectives, ``gru_optim.data`` paired
forget/retain data, ``gru_optim.rules`` the rectification rules, and ``gru_optim.hf``
(``hf`` extra, imported on demand) the Hugging Face ``GRUTrainer``; the ``gru-unlearn``
command (``gru_optim.cli``, ``cli`` extra) unlearns a saved model from forget/retain files.
"""

from . import data, functional, objectives, rules
from ._optimizer import GRUOptimizer
from ._version import __version__
from .engine._groups import GAMMA_KEY, RETAIN_WEIGHT_KEY
from .engine._memory import EMA_KEY
from .engine._pending import RetainPass
from .engine._policy import PlainStepWarning
from .engine._stats import SkipReason
from .kernels import KernelFallbackWarning
from .rules import COS_CLIP_KEY

__all__ = [
    "COS_CLIP_KEY",
    "EMA_KEY",
    "GAMMA_KEY",
    "GRUOptimizer",
    "KernelFallbackWarning",
    "PlainStepWarning",
    "RETAIN_WEIGHT_KEY",
    "RetainPass",
    "SkipReason",
    "__version__",
    "data",
    "functional",
    "objectives",
    "rules",
]
