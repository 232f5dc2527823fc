"""``gru-unlearn`` (also ``python -m gru_optim.cli``): unlearn a saved Hugging Face model
from forget/retain rows with GRU, evaluate it before and after, save the result.

Needs the ``cli`` extra (``pip install "gru-optim[cli]"``). See
``docs/guides/cli.md`` and ``gru-unlearn --help``. From Python: :func:`unlearn` takes the
command's arguments and returns the output directory (raising :class:`UsageError` for bad
input); :func:`main` is the console script.
"""

from ._config import OPTIONS, UsageError
from ._main import main, unlearn

__all__ = ["OPTIONS", "UsageError", "main", "unlearn"]
