"""Tools built on the pipeline: the command line (``cli``), the benchmark suite (``bench``), the manual checkpoint API
(``manual``) and the trade-off front (``tradeoffs``).
"""
