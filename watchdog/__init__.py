"""Policy: sample the worker's process-tree memory, know the limits, decide when to shrink.

Imports nothing from ``worker`` or ``autotune``.
"""
