"""What users read: the :class:`~fxmemopt.report.summary.Summary` (``summary``) and its views: explain table, graph
dump, memory timeline (``render``).
"""
