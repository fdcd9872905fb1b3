"""The benchmarks' memory meter: a process tree's memory with shared-memory tensors counted.

PSS (``watchdog.sampler``) counts a page only where it is mapped AND touched. Decoded images
travel from loader workers to the main process in /dev/shm segments (torch's file-descriptor
sharing): queued batches are held by a descriptor, or mapped by the main process but not yet
read, so PSS misses them while the kernel holds (and a cgroup charges) every page. This meter
adds them back: the PSS of every mapping that is NOT a /dev/shm segment, plus the size of each
/dev/shm segment the tree holds or maps, once per inode. Reads /proc/PID/smaps (not the
rollup): tens of ms per read for a GiB-sized tree, fine from outside the worker.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from watchdog import procfs
from watchdog.proctree import tree_pids

SHM_PREFIX = "/dev/shm/"


def non_shm_pss_bytes(pid: int) -> int:
    """Sum of Pss over mappings that are not /dev/shm segments (0 when the process is gone)."""
    data = procfs.read_bytes(f"/proc/{pid}/smaps")
    if not data:
        return 0
    total_kb = 0
    in_shm = False
    for line in data.decode(errors="replace").splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split(" ", 1)[0]:
            fields = line.split(maxsplit=5)
            in_shm = len(fields) >= 6 and fields[5].startswith(SHM_PREFIX)
        elif line.startswith("Pss:") and not in_shm:
            total_kb += int(line.split()[1])
    return total_kb * 1024


@dataclass(frozen=True)
class TreeMemory:
    taken_at_s: float
    pss_bytes: int  # demo-style tree PSS (smaps_rollup), shm as far as mapped and touched
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
        for inode, size in procfs.read_maps_shm(pid).items():
            shm[inode] = max(shm.get(inode, 0), size)
        non_shm += non_shm_pss_bytes(pid)
        pss += procfs.read_pss_bytes(pid) or 0
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
