"""``python -m fxmemopt``: the command line (:mod:`fxmemopt.tools.cli`)."""

import sys

from fxmemopt.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
