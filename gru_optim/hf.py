"""Hugging Face ``transformers`` integration (needs the ``hf`` extra, transformers 4.45
through 5.x; see docs/guides/huggingface.md for installing from a checkout or a wheel).

- :class:`GRUMixin`: GRU for any ``transformers.Trainer`` subclass, listed first among its
  bases (``class GRUNPO(GRUMixin, NPO): ...``); :func:`with_gru` builds that subclass.
- :class:`GRUTrainer`: the mixin over the library's objective trainer: GRU with any
  objective of :mod:`gru_optim.objectives` on paired forget/retain data.
"""

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "gru_optim.hf needs Hugging Face transformers (4.45 or later): install the 'hf' "
        'extra with the package, pip install "./gru-optim[hf]" from a checkout (or '
        '"gru_optim-<version>-py3-none-any.whl[hf]" from a built wheel)'
    ) from e

from .integrations.hf import (
    GRUMixin,
    GRUTrainer,
    ObjectiveTrainer,
    find_gru_optimizer,
    gru_option_names,
    mean_answer_nll,
    with_gru,
)

__all__ = [
    "GRUMixin",
    "GRUTrainer",
    "ObjectiveTrainer",
    "find_gru_optimizer",
    "gru_option_names",
    "mean_answer_nll",
    "with_gru",
]
