"""Planning on names and numbers: candidate regions (``regions``), plans (``plan``), the networkx cost graph and its
simulation (``costgraph``), the search over plans (``search``), and one rank's peak under FSDP2 (``sharding``).

Nothing here imports ``torch.fx`` (``tests/test_layout.py`` checks it): a cost graph can be built by hand, pickled to a
worker, drawn or saved.
"""
