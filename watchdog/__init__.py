"""Policy: sample the worker's process-tree memory, know the limits, decide when to shrink.

Imports nothing from ``worker`` or ``autotune``.
"""
from watchdog.governor import Decision, FetchLimits, Governor, GovernorConfig
from watchdog.heap import trim_heap
from watchdog.limits import CgroupPaths, Limits, find_cgroup, owns_cgroup, read_limits
from watchdog.sampler import MemorySnapshot, Sampler, sample_tree

__all__ = [
    "CgroupPaths",
    "Decision",
    "FetchLimits",
    "Governor",
    "GovernorConfig",
    "Limits",
    "MemorySnapshot",
    "Sampler",
    "find_cgroup",
    "owns_cgroup",
    "read_limits",
    "sample_tree",
    "trim_heap",
]
