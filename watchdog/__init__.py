"""Policy: sample the worker's process-tree memory, know the limits, decide when to shrink.

Imports nothing from ``worker`` or ``autotune``. Names are loaded lazily so that
``python -m watchdog.sampler`` does not find its own module imported by the package first.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at runtime __getattr__ imports on use
    from watchdog.governor import Decision, FetchLimits, Governor, GovernorConfig
    from watchdog.heap import trim_heap
    from watchdog.limits import CgroupPaths, Limits, find_cgroup, owns_cgroup, read_limits
    from watchdog.sampler import MemorySnapshot, Sampler, sample_tree

_EXPORTS = {
    "CgroupPaths": "watchdog.limits",
    "Limits": "watchdog.limits",
    "find_cgroup": "watchdog.limits",
    "owns_cgroup": "watchdog.limits",
    "read_limits": "watchdog.limits",
    "MemorySnapshot": "watchdog.sampler",
    "Sampler": "watchdog.sampler",
    "sample_tree": "watchdog.sampler",
    "Decision": "watchdog.governor",
    "FetchLimits": "watchdog.governor",
    "Governor": "watchdog.governor",
    "GovernorConfig": "watchdog.governor",
    "trim_heap": "watchdog.heap",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'watchdog' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
