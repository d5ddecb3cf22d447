"""The benchmark suite (same as ``python -m fxmemopt bench``; see :mod:`fxmemopt.tools.bench` for what it measures).

    python benchmarks/run_bench.py --json bench.json --markdown bench.md --plot scaling.png
    python benchmarks/run_bench.py --full            # the seed tutorial's GPU sizes
"""

import sys

from fxmemopt.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
