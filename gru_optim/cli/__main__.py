"""``python -m gru_optim.cli``: the ``gru-unlearn`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
