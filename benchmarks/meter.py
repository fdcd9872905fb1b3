"""The benchmarks' memory meter: a process tree's memory with shared-memory tensors counted.

PSS (``watchdog.sampler``) counts a page only where it is mapped AND touched. Decoded images
travel from loader workers to the main process in /dev/shm segments (torch's file-descriptor
sharing): queued batches are held by a descriptor, or mapped by the main process but not yet
read, so PSS misses them while the kernel holds (and a cgroup charges) every page. This meter
adds them back: the PSS of every mapping that is NOT a /dev/shm segment, plus the size of each
/dev/shm segment the tree holds or maps, once per inode.

Per process it reads smaps_rollup (the PSS, and the PSS of shmem pages), maps (which /dev/shm
segments are mapped; no page-table walk) and the fd table. PSS outside /dev/shm is then the PSS
less the shmem PSS. That holds only when every shared-memory page the process maps is a /dev/shm
file's: a process that also maps other shmem (shared anonymous memory, SysV or memfd segments:
see ``_other_shmem``) is read from /proc/PID/smaps instead, mapping by mapping, as
is every process on a kernel whose rollup has no Pss_Shmem (< 5.9). The full smaps costs about
twice the rollup and maps together (11.6 against 7.2 ms for one torch process here, before its
parse); a sample of a four-process worker took some 5% of a 2-core host's CPU at 0.5 s.

The rollup still walks every page table: 50-60 ms of this host's CPU per sample of a worker
tree, on the cores the worker runs on. So ``TreeMeterThread``, given the memory cgroup the tree
runs in, walks them only when memory can have moved (``needs_walk``): at the first sample, when
a process came or went (sharing changed), when the cgroup's charge less its shmem moved by
``WALK_GATE_BYTES`` since the last walk (a page faulted in or freed, a copy-on-write copy made),
and at least every ``WALK_MAX_AGE_S``. Between walks a sample re-reads what is cheap (the /dev/shm
segments each process holds or maps) and keeps each process's non-shm PSS from the last walk.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

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


_ROLLUP_PSS_SHMEM = re.compile(rb"^Pss_Shmem:\s+(\d+)", re.MULTILINE)
# A maps line: range, perms, offset, device, inode, then the path if any. Shared memory outside
# /dev/shm shows as a shared mapping of /dev/zero (shared anonymous), /SYSV..., /memfd:... or an
# unnamed one; all are "(deleted)" but for the unnamed. A shared read-only mapping of a file
# (glibc maps its gconv cache so in every process) is not shmem.
_MAPS_SHARED_PATH = re.compile(rb"^\S+ ...s \S+ \S+ \S+ *(.*)$", re.MULTILINE)


def _other_shmem(path: bytes) -> bool:
    return not path.startswith(_SHM_PREFIX) and (not path or path.endswith(b"(deleted)")
                                                 or path.startswith((b"/dev/zero", b"/SYSV", b"/memfd:")))


def read_process_memory(pid: int) -> SmapsReading:
    """The same reading as ``read_smaps``, from smaps_rollup and maps where that is exact."""
    rollup = procfs.read_bytes(f"/proc/{pid}/smaps_rollup")
    maps = procfs.read_bytes(f"/proc/{pid}/maps")
    if not rollup or maps is None:
        return SmapsReading(0, 0, {})
    pss = _PSS_LINE.search(rollup)
    shmem = _ROLLUP_PSS_SHMEM.search(rollup)
    if pss is None or shmem is None or any(_other_shmem(path.rstrip()) for path in _MAPS_SHARED_PATH.findall(maps)):
        return read_smaps(pid)
    pss_bytes = int(pss.group(1)) * 1024
    return SmapsReading(pss_bytes, pss_bytes - int(shmem.group(1)) * 1024, procfs.maps_shm_sizes(f"/proc/{pid}", maps))


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
    non_shm_by_pid: dict[int, int] = field(default_factory=dict)  # each process's share of non_shm
    walked: bool = True  # False: non-shm PSS (and pss_bytes) carried from the last page-table walk


def _add_shm(shm: dict[int, int], pid: int, mapped: dict[int, int]) -> None:
    """Add to ``shm`` (inode -> size) the /dev/shm segments ``pid`` holds open and ``mapped``."""
    fds = procfs.read_fds(pid)
    if fds is not None:
        shm.update(fds.shm_sizes)
    for inode, size in mapped.items():
        shm[inode] = max(shm.get(inode, 0), size)


def read_tree_memory(root_pid: int, pids: Optional[tuple[int, ...]] = None) -> TreeMemory:
    """``pids``: the tree's processes where the caller has just listed them."""
    shm: dict[int, int] = {}
    non_shm = pss = 0
    by_pid: dict[int, int] = {}
    for pid in tree_pids(root_pid) if pids is None else pids:
        smaps = read_process_memory(pid)
        _add_shm(shm, pid, smaps.shm_sizes)
        non_shm += smaps.non_shm_pss_bytes
        pss += smaps.pss_bytes
        by_pid[pid] = smaps.non_shm_pss_bytes
    shm_bytes = sum(shm.values())
    return TreeMemory(time.monotonic(), pss, shm_bytes, non_shm + shm_bytes, by_pid)


def read_tree_memory_unwalked(walked: TreeMemory) -> TreeMemory:
    """The tree's memory now, for the processes of ``walked`` (the last walk), without walking a
    page table: the /dev/shm segments each holds or maps, read anew, and each process's non-shm
    PSS as ``walked`` found it."""
    shm: dict[int, int] = {}
    for pid in walked.non_shm_by_pid:
        _add_shm(shm, pid, procfs.read_maps_shm(pid))
    shm_bytes = sum(shm.values())
    non_shm = sum(walked.non_shm_by_pid.values())
    return TreeMemory(time.monotonic(), walked.pss_bytes, shm_bytes, non_shm + shm_bytes,
                      dict(walked.non_shm_by_pid), walked=False)


# A sample walks the page tables again once the cgroup's charge less shmem has moved this far from
# where it was at the last walk (up or down), and at least this often.
WALK_GATE_BYTES = 4 * 1024 * 1024
WALK_MAX_AGE_S = 5.0


def needs_walk(last: Optional[TreeMemory], charge_at_last: Optional[int], pids: set[int],
               charge_bytes: Optional[int], now_s: float) -> bool:
    """Whether a sample must walk the tree's page tables (see the module docstring)."""
    return (last is None or charge_bytes is None or charge_at_last is None
            or set(last.non_shm_by_pid) != pids or abs(charge_bytes - charge_at_last) >= WALK_GATE_BYTES
            or now_s - last.taken_at_s >= WALK_MAX_AGE_S)


_STAT_SHMEM = re.compile(rb"^shmem (\d+)$", re.MULTILINE)


def read_non_shm_charge(cgroup_dir: Optional[Path]) -> Optional[int]:
    """A memory cgroup's charge less its shmem, in bytes (v1 ``memory.usage_in_bytes``, v2
    ``memory.current``, less ``shmem`` in ``memory.stat``); None without one or when it cannot
    be read.

    Less shmem because a sample between walks re-reads the /dev/shm segments and keeps only the
    non-shm PSS: segments filling while other memory is freed leave the whole charge where it was,
    and would leave the kept figure stale."""
    if cgroup_dir is None:
        return None
    usage = procfs.read_bytes(str(cgroup_dir / "memory.current")) or \
        procfs.read_bytes(str(cgroup_dir / "memory.usage_in_bytes"))
    stat = procfs.read_bytes(str(cgroup_dir / "memory.stat"))
    shmem = _STAT_SHMEM.search(stat) if stat else None
    if not usage or not usage.strip().isdigit() or shmem is None:
        return None
    return int(usage) - int(shmem.group(1))


def process_role(pid: int, root_pid: int) -> str:
    """What ``pid`` is in the worker tree rooted at ``root_pid``: main, fork server, loader worker
    (a process the fork server started), tracker (multiprocessing's resource tracker), other, or
    gone (it exited before it could be read)."""
    if pid == root_pid:
        return "main"
    try:
        process = psutil.Process(pid)
        command = " ".join(process.cmdline())
        parent = process.ppid()
    except psutil.Error:
        return "gone"
    if "resource_tracker" in command:
        return "tracker"
    if "forkserver" in command:
        return "fork server" if parent == root_pid else "loader worker"
    return "other"


@dataclass
class TreeMeterThread:
    """Samples the tree's memory every ``interval_s`` until stopped; keeps the history.

    With ``cgroup_dir`` (the memory cgroup the whole tree runs in, and nothing else) a sample
    walks the page tables only as ``needs_walk`` says, going by ``read_non_shm_charge``; without,
    every sample does (``read_tree_memory``)."""

    pid: int
    interval_s: float = 0.2
    cgroup_dir: Optional[Path] = None
    history: list[TreeMemory] = field(default_factory=list)
    roles: dict[int, str] = field(default_factory=dict)  # pid -> process_role, read when first seen
    costs: list[tuple[float, float]] = field(default_factory=list)  # (monotonic s, CPU s) of each reading

    def cpu_s(self, since_s: float = float("-inf"), until_s: float = float("inf")) -> float:
        """This thread's CPU time spent reading (on the cores the tree runs on) between the two times."""
        return sum(cpu_s for at_s, cpu_s in self.costs if since_s <= at_s <= until_s)

    def __post_init__(self) -> None:
        self._walked: Optional[TreeMemory] = None  # the last sample that walked the page tables
        self._charge_at_walk: Optional[int] = None  # read_non_shm_charge then
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-meter", daemon=True)

    def start(self) -> "TreeMeterThread":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _read(self) -> TreeMemory:
        charge_bytes = read_non_shm_charge(self.cgroup_dir)
        pids = tree_pids(self.pid)
        if self._walked is not None and not needs_walk(self._walked, self._charge_at_walk, set(pids), charge_bytes,
                                                       time.monotonic()):
            return read_tree_memory_unwalked(self._walked)
        reading = read_tree_memory(self.pid, pids)
        self._walked, self._charge_at_walk = reading, charge_bytes
        return reading

    @property
    def walks(self) -> int:
        """Samples that walked the page tables."""
        return sum(1 for reading in self.history if reading.walked)

    def _run(self) -> None:
        while not self._stop.is_set():
            started_cpu_s = time.thread_time()
            try:
                reading = self._read()
                self.history.append(reading)
                for pid in reading.non_shm_by_pid.keys() - self.roles.keys():
                    self.roles[pid] = process_role(pid, self.pid)
            except (ProcessLookupError, FileNotFoundError):
                pass
            finally:
                self.costs.append((time.monotonic(), time.thread_time() - started_cpu_s))
            self._stop.wait(self.interval_s)

    @property
    def peak_total_bytes(self) -> int:
        return max((m.total_bytes for m in self.history), default=0)

    @property
    def peak_pss_bytes(self) -> int:
        return max((m.pss_bytes for m in self.history), default=0)

    def peak_by_role(self) -> dict[str, int]:
        """The peak sample (``total_bytes``) split by process role (``process_role``, non-shm PSS
        summed over the processes of a role) plus ``shm``: what each part of the tree held when
        the tree held most. {} before any sample."""
        if not self.history:
            return {}
        peak = max(self.history, key=lambda reading: reading.total_bytes)
        return split_by_role(peak, self.roles)


def split_by_role(reading: TreeMemory, roles: dict[int, str]) -> dict[str, int]:
    """``reading``'s non-shm PSS summed by role (a pid without one counts as other), and ``shm``."""
    out: dict[str, int] = {}
    for pid, size in reading.non_shm_by_pid.items():
        role = roles.get(pid, "other")
        out[role] = out.get(role, 0) + size
    out["shm"] = reading.shm_bytes
    return out
