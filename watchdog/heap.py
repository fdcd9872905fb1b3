"""Give freed memory back to the OS: what the worker does while the governor has it paused."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import os
from typing import Callable

from watchdog import procfs

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    # glibc only: musl and macOS have no malloc_trim; there gc.collect() is all we can do.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def trim_heap(*, collect: bool = True) -> int:
    """``gc.collect()`` then glibc ``malloc_trim(0)``; returns bytes freed (RSS before - after,
    0 when RSS did not drop or cannot be read). Never raises.

    Large decoded images are freed back to glibc arenas, which keep them (per-thread arenas,
    fragmentation above the top chunk) until trimmed; that is memory the OOM killer still counts.
    ``collect=False`` only trims: for a helper thread, where a collection would run whatever
    finalizers the collected cycles hold (a DataLoader iterator joining its workers) on that thread.
    """
    try:
        before_bytes = procfs.read_rss_bytes(os.getpid())
        collected = gc.collect() if collect else 0
        trim = _malloc_trim()
        released = trim(0) if trim is not None else 0
        after_bytes = procfs.read_rss_bytes(os.getpid())
    except Exception:  # called under memory pressure, it must not add a failure
        logger.exception("trim_heap failed")
        return 0
    freed_bytes = max(0, before_bytes - after_bytes) if before_bytes and after_bytes else 0
    logger.debug(
        "trim_heap: gc collected %d objects, malloc_trim released=%s, RSS -%d bytes",
        collected, bool(released), freed_bytes,
    )
    return freed_bytes
