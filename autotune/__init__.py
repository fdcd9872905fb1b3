"""Policy: measure a job (probe), model its memory and throughput, choose a LoaderPlan.

Imports nothing from ``worker`` or ``watchdog``: plain typed values in, plain typed values out.
"""
from autotune.plan import LoaderPlan

__all__ = ["LoaderPlan"]
