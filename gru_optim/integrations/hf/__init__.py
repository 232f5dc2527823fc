"""Hugging Face ``transformers`` integration (4.45 through 5.x): :class:`GRUMixin` and
:func:`with_gru` give GRU to any ``Trainer`` subclass; :class:`GRUTrainer` is the mixin over
the library's objective trainer. The public import path is :mod:`gru_optim.hf`."""

from ._mixin import GRUMixin, find_gru_optimizer, gru_option_names, with_gru
from ._trainer import GRUTrainer, ObjectiveTrainer, mean_answer_nll

__all__ = [
    "GRUMixin",
    "GRUTrainer",
    "ObjectiveTrainer",
    "find_gru_optimizer",
    "gru_option_names",
    "mean_answer_nll",
    "with_gru",
]
