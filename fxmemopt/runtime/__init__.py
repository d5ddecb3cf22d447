"""What runs in the returned module: checkpoint regions and their invariants (``checkpoint``), spike packing
(``packing``), and the rewrite that builds them into a new GraphModule (``rewrite``).
"""
