"""Capture and analysis: trace the model into an fx graph under guards (``trace``), record what each node produces as
plain data (``annotate``, ``facts``), and snapshot/restore model state (``state``).

Only these modules and :mod:`fxmemopt.runtime.rewrite` touch fx objects.
"""
