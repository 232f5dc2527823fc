"""Hugging Face ``transformers`` integration (needs the ``hf`` extra:
``pip install gru-optim[hf]``): :class:`GRUTrainer` runs GRU with any objective of
:mod:`gru_optim.objectives` on paired forget/retain data."""

from ._hf import GRUTrainer, find_gru_optimizer, mean_answer_nll

__all__ = ["GRUTrainer", "find_gru_optimizer", "mean_answer_nll"]
