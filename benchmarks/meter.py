"""The benchmarks' memory meter: a process tree's memory with shared-memory tensors counted.

PSS (``watchdog.sampler``) counts a page only where it is mapped AND touched. Decoded images
travel from loader workers to the main process in /dev/shm segments (torch's file-descriptor
sharing): queued batches are held by a descriptor, or mapped by the main process but not yet
read, so PSS misses them while the kernel holds (and a cgroup charges) every page. This meter
adds them back: the PSS of every mapping that is NOT a /dev/shm segment, plus the size of each
/dev/shm segment the tree holds or maps, once per inode. Reads /proc/PID/smaps once per process
(per-mapping PSS is needed; it also gives the total and the mapped segments) and the fd table:
tens of ms per sample for a GiB-sized tree, on the same cores as the worker it measures.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

from watchdog import procfs
from watchdog.proctree import tree_pids


@dataclass(frozen=True)
class SmapsReading:
    """One pass over /proc/PID/smaps: PSS in and out of /dev/shm mappings, and the segments mapped."""

    pss_bytes: int
    non_shm_pss_bytes: int
    shm_sizes: dict[int, int]  # inode -> segment size (``procfs.shm_mapping``)


# One scan of the whole text in C: each mapping's header line (its address range) and its Pss
# line. A line-by-line parse in Python cost the meter ~6% of a 2-core host's CPU, taken from the
# worker it measures (a torch process has thousands of mappings).
_PSS = rb"^Pss:\s+(\d+)"
_PSS_LINE = re.compile(_PSS, re.MULTILINE)
_SMAPS_LINE = re.compile(rb"^([0-9a-f]+-[0-9a-f]+ .*)$|" + _PSS, re.MULTILINE)
_SHM_PREFIX = procfs.SHM_PREFIX.encode()


def read_smaps(pid: int) -> SmapsReading:
    """Read smaps once (the kernel walks the page tables per read: a second read of
    smaps_rollup or maps would double the meter's cost on the cores it measures)."""
    data = procfs.read_bytes(f"/proc/{pid}/smaps")
    if not data:
        return SmapsReading(0, 0, {})
    if _SHM_PREFIX not in data:  # the common case: no segment mapped, the total is all non-shm
        pss_kb = sum(int(kb) for kb in _PSS_LINE.findall(data))
        return SmapsReading(pss_kb * 1024, pss_kb * 1024, {})
    pss_kb = non_shm_kb = 0
    shm_sizes: dict[int, int] = {}
    in_shm = False
    for header, kb in _SMAPS_LINE.findall(data):
        if kb:
            pss_kb += int(kb)
            if not in_shm:
                non_shm_kb += int(kb)
            continue
        in_shm = False
        if _SHM_PREFIX in header:
            segment = procfs.shm_mapping(f"/proc/{pid}", header.decode(errors="replace").split(maxsplit=5))
            in_shm = segment is not None
            if segment is not None:
                inode, size = segment
                shm_sizes[inode] = max(shm_sizes.get(inode, 0), size)
    return SmapsReading(pss_kb * 1024, non_shm_kb * 1024, shm_sizes)


@dataclass(frozen=True)
class TreeMemory:
    taken_at_s: float
    pss_bytes: int  # tree PSS (what smaps_rollup sums), shm as far as mapped and touched
    shm_bytes: int  # /dev/shm segments held or mapped by the tree, once per inode
    total_bytes: int  # non-shm PSS + shm_bytes: what the benchmark reports as memory


def read_tree_memory(root_pid: int) -> TreeMemory:
    pids = tree_pids(root_pid)
    shm: dict[int, int] = {}
    non_shm = pss = 0
    for pid in pids:
        fds = procfs.read_fds(pid)
        if fds is not None:
            shm.update(fds.shm_sizes)
        smaps = read_smaps(pid)
        for inode, size in smaps.shm_sizes.items():
            shm[inode] = max(shm.get(inode, 0), size)
        non_shm += smaps.non_shm_pss_bytes
        pss += smaps.pss_bytes
    shm_bytes = sum(shm.values())
    return TreeMemory(time.monotonic(), pss, shm_bytes, non_shm + shm_bytes)


@dataclass
class TreeMeterThread:
    """Samples ``read_tree_memory(pid)`` every ``interval_s`` until stopped; keeps the history."""

    pid: int
    interval_s: float = 0.2
    history: list[TreeMemory] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-meter", daemon=True)

    def start(self) -> "TreeMeterThread":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.history.append(read_tree_memory(self.pid))
            except (ProcessLookupError, FileNotFoundError):
                pass
            self._stop.wait(self.interval_s)

    @property
    def peak_total_bytes(self) -> int:
        return max((m.total_bytes for m in self.history), default=0)

    @property
    def peak_pss_bytes(self) -> int:
        return max((m.pss_bytes for m in self.history), default=0)
