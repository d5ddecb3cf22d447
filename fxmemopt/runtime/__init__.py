"""What runs in the returned module: checkpoint regions and their invariants (``checkpoint``), spike packing
(``packing``), a loop over time taken apart in one operation (``steps``), and the rewrite that builds them into a
new GraphModule (``rewrite``).
"""
