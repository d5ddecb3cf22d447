"""Measuring: the storage tracker and one training step (``measure``), the recorded step the cost graph is built from
(``record``), worker processes (``workers``), and the bitwise equivalence check (``verify``).
"""
