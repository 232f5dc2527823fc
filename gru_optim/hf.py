"""Hugging Face ``transformers`` integration (needs the ``hf`` extra:
``pip install gru-optim[hf]``): :class:`GRUTrainer` runs GRU with any objective of
:mod:`gru_optim.objectives` on paired forget/retain data."""

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "gru_optim.hf needs Hugging Face transformers: install the 'hf' extra, "
        'pip install "gru-optim[hf]"'
    ) from e

from ._hf import GRUTrainer, find_gru_optimizer, mean_answer_nll

__all__ = ["GRUTrainer", "find_gru_optimizer", "mean_answer_nll"]
