"""``python -m pyroflows``: the command line (see :mod:`pyroflows.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
