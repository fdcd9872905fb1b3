"""trim_heap: freed glibc memory goes back to the OS; failures never escape."""
from __future__ import annotations

import logging
import os

import pytest

from watchdog import heap, procfs
from watchdog_testing import MIB

pytestmark = pytest.mark.timeout(20)


def test_trim_heap_returns_freed_malloc_memory_to_the_os() -> None:
    if heap._malloc_trim() is None:
        pytest.skip("no glibc malloc_trim on this platform")
    # 100k objects of 2 KB: above pymalloc's 512-byte limit, so glibc malloc holds them, below
    # the mmap threshold, so they live in the heap. One object allocated after them pins the
    # heap top: free() then cannot shrink the heap by itself, only malloc_trim can.
    chunks = [bytes(2000) + bytes([i % 256]) for i in range(100_000)]
    pin = bytes(2000) + b"pin"
    del chunks
    before_bytes = procfs.read_rss_bytes(os.getpid())
    freed_bytes = heap.trim_heap()
    after_bytes = procfs.read_rss_bytes(os.getpid())
    assert freed_bytes >= 100 * MIB
    assert before_bytes - after_bytes >= 100 * MIB
    assert pin.endswith(b"pin")


def test_trim_heap_never_raises(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise OSError("libc went away")

    monkeypatch.setattr(heap, "_malloc_trim", broken)
    with caplog.at_level(logging.ERROR, logger="watchdog.heap"):
        assert heap.trim_heap() == 0
    assert "trim_heap failed" in caplog.text
