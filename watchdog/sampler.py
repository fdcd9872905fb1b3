"""Sample the memory of the worker's process tree: one function, a metered reader and a thread.

PSS is the right tree total (a page shared by N processes counts 1/N in each, so the sum counts
it once) but smaps_rollup walks page tables: ~8 us per MiB of RSS, so a 6 GiB tree costs ~50 ms
per read. ``TreeMeter`` therefore reads RSS (statm, ~5 us) every sample and re-reads PSS, fds and
/dev/shm in a "deep" pass only when a process joined or left the tree or a CPU budget allows; in between,
each process's PSS is carried forward with its RSS change (new private pages count fully).

PSS misses /dev/shm pages no process maps: torch's shared tensors in transit between processes
(a DataLoader batch in the pipe is held by a file descriptor only) can be most of a loader's
memory. Without an owned cgroup, ``used_bytes`` is therefore each process's PSS less its shmem
part, plus every /dev/shm file the tree holds (mapped or by fd) counted once; the fds are listed
at every sample (~3 us each), so in-transit tensors are seen at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from watchdog import procfs
from watchdog.limits import MIB, CgroupPaths
from watchdog.proctree import ProcessTree

logger = logging.getLogger(__name__)

# Where a snapshot's PSS came from: every process's smaps_rollup, RSS for all (no rollup readable), or both.
PssSource = Literal["smaps_rollup", "rss", "mixed"]


@dataclass(frozen=True)
class MemorySnapshot:
    """The worker tree's memory at ``taken_at_s`` (time.monotonic()).

    ``used_bytes`` is what policy compares with the caps: ``cgroup_usage_bytes`` when the caller
    passed an owned cgroup, else ``tree_private_bytes`` plus ``shm_bytes`` (see the module
    docstring). ``tree_private_bytes`` is the tree's PSS without shmem (where PSS is unreadable,
    RSS stands in and mapped shm counts twice: an over-count), read with or without a cgroup.
    ``pss_source`` is ``smaps_rollup``, ``rss`` (smaps_rollup unreadable: RSS over-counts shared
    pages) or ``mixed``. ``tree_pss_bytes`` comes from the last deep pass, ``pss_age_s`` old (PSS
    carried forward by RSS deltas since). ``shm_bytes`` counts each /dev/shm file once (by inode)
    whether mapped or only held open; it and ``open_fds`` are read at every sample without an
    owned cgroup, at deep passes with one. PSI fields are None where the kernel has PSI disabled.
    """

    taken_at_s: float
    used_bytes: int
    tree_pss_bytes: int
    tree_rss_bytes: int
    process_count: int
    mem_available_bytes: int
    open_fds: int
    shm_bytes: int
    tree_private_bytes: int
    pss_source: PssSource = "smaps_rollup"
    pss_age_s: float = 0.0
    cgroup_usage_bytes: int | None = None
    psi_some_avg10: float | None = None
    psi_full_avg10: float | None = None


@dataclass(frozen=True)
class _DeepReading:
    pss_bytes: int | None
    pss_shmem_bytes: int
    rss_bytes: int
    anon_bytes: int
    open_fds: int
    shm_sizes: dict[int, int]
    maps_only_shm: dict[int, int]  # mapped, no fd held: semaphores, closed SharedMemory fds


def _deep_read(pid: int, statm: tuple[int, int], proc_root: Path) -> _DeepReading:
    # A process that vanished (or a zombie, whose fd table is gone) reads as no fds, no shm and
    # no PSS; it drops out at the next sample when its RSS can no longer be read.
    fds = procfs.read_fds(pid, proc_root) or procfs.FdReading(open_fds=0, shm_sizes={})
    shm_sizes = dict(fds.shm_sizes)
    maps_shm = procfs.read_maps_shm(pid, proc_root)
    for inode, size in maps_shm.items():
        shm_sizes[inode] = max(shm_sizes.get(inode, 0), size)
    parts = procfs.read_pss_parts(pid, proc_root)
    pss_bytes, pss_shmem_bytes = parts if parts is not None else (None, 0)
    rss_bytes, shared_bytes = statm
    maps_only = {inode: size for inode, size in maps_shm.items() if inode not in fds.shm_sizes}
    return _DeepReading(pss_bytes, pss_shmem_bytes, rss_bytes, rss_bytes - shared_bytes, fds.open_fds,
                        shm_sizes, maps_only)


class TreeMeter:
    """Reads snapshots of one process tree, keeping the expensive part within a CPU budget.

    A deep pass (smaps_rollup, fd links, maps) runs on the first read and whenever a process
    joins or leaves the tree: a fresh fork's RSS counts every page it shares with its parent
    (a phantom spike), and when a sharer exits the survivors' PSS rises with no RSS change.
    Otherwise it runs once its own measured CPU cost divided by ``deep_budget_fraction``
    (default 0.25% of a core) has passed, and at least every ``max_deep_interval_s`` (10 s).
    ``deep_budget_fraction=None`` makes every read a deep pass.
    """

    def __init__(
        self,
        root_pid: int,
        *,
        cgroup: CgroupPaths | None = None,
        proc_root: Path = Path("/proc"),
        deep_budget_fraction: float | None = 0.0025,
        max_deep_interval_s: float = 10.0,
    ) -> None:
        self.root_pid = root_pid
        self._cgroup = cgroup
        self._proc_root = proc_root
        self._budget = deep_budget_fraction
        self._max_deep_interval_s = max_deep_interval_s
        self._tree = ProcessTree(proc_root=proc_root)
        self._deep: dict[int, _DeepReading] = {}
        self._deep_at_s = float("-inf")
        self._next_deep_s = float("-inf")
        self.deep_passes = 0
        self.deep_cpu_seconds = 0.0

    def read(self) -> MemorySnapshot:
        """One snapshot; ProcessLookupError when the root process is gone."""
        pids = self._tree.members(self.root_pid)
        statm = {pid: value for pid in pids if (value := procfs.read_statm_bytes(pid, self._proc_root)) is not None}
        if self.root_pid not in statm:
            raise ProcessLookupError(f"process {self.root_pid} is gone")
        now_s = time.monotonic()
        membership_changed = statm.keys() != self._deep.keys()
        deep = self._budget is None or membership_changed or now_s >= self._next_deep_s
        if deep:
            self._deep_pass(statm, now_s)
        fds = None if deep or self._cgroup else self._read_fds(statm)
        return self._snapshot(statm, fds, time.monotonic())

    def _read_fds(self, statm: dict[int, tuple[int, int]]) -> dict[int, procfs.FdReading]:
        return {pid: procfs.read_fds(pid, self._proc_root) or procfs.FdReading(0, {}) for pid in statm}

    def _deep_pass(self, statm: dict[int, tuple[int, int]], now_s: float) -> None:
        started_cpu_s = time.thread_time()
        self._deep = {pid: _deep_read(pid, value, self._proc_root) for pid, value in statm.items()}
        cost_s = time.thread_time() - started_cpu_s
        self._deep_at_s = now_s
        if self._budget is not None:
            self._next_deep_s = now_s + min(cost_s / self._budget, self._max_deep_interval_s)
        self.deep_passes += 1
        self.deep_cpu_seconds += cost_s

    def _tree_pss(self, rss: dict[int, int]) -> tuple[int, PssSource]:
        total = 0
        from_rollup = 0
        for pid, rss_bytes in rss.items():
            deep = self._deep.get(pid)
            if deep is None or deep.pss_bytes is None:
                total += rss_bytes
                continue
            total += max(0, deep.pss_bytes + rss_bytes - deep.rss_bytes)
            from_rollup += 1
        source = "smaps_rollup" if from_rollup == len(rss) else "rss" if from_rollup == 0 else "mixed"
        return total, source

    def _tree_private(self, statm: dict[int, tuple[int, int]]) -> int:
        """PSS without shmem, carried forward by the anonymous RSS change since the deep pass."""
        total = 0
        for pid, (rss_bytes, shared_bytes) in statm.items():
            deep = self._deep.get(pid)
            if deep is None or deep.pss_bytes is None:
                total += rss_bytes
                continue
            anon_change = rss_bytes - shared_bytes - deep.anon_bytes
            total += max(0, deep.pss_bytes - deep.pss_shmem_bytes + anon_change)
        return total

    def _snapshot(self, statm: dict[int, tuple[int, int]], fds: dict[int, procfs.FdReading] | None,
                  now_s: float) -> MemorySnapshot:
        rss = {pid: value[0] for pid, value in statm.items()}
        tree_pss_bytes, pss_source = self._tree_pss(rss)
        live_deep = [self._deep[pid] for pid in rss]  # a deep pass ran if the pids changed
        shm_sizes: dict[int, int] = {}
        if fds is None:
            for deep in live_deep:
                shm_sizes.update(deep.shm_sizes)  # same inode in several processes: one file
            open_fds = sum(deep.open_fds for deep in live_deep)
        else:
            for pid, reading in fds.items():
                shm_sizes.update(self._deep[pid].maps_only_shm)
                shm_sizes.update(reading.shm_sizes)
            open_fds = sum(reading.open_fds for reading in fds.values())
        shm_bytes = sum(shm_sizes.values())
        cgroup_usage = procfs.read_cgroup_usage_bytes(self._cgroup) if self._cgroup else None
        psi = procfs.read_pressure(self._pressure_path())
        private_bytes = self._tree_private(statm)
        return MemorySnapshot(
            taken_at_s=now_s,
            used_bytes=cgroup_usage if cgroup_usage is not None else private_bytes + shm_bytes,
            tree_pss_bytes=tree_pss_bytes,
            tree_rss_bytes=sum(rss.values()),
            process_count=len(rss),
            mem_available_bytes=procfs.read_mem_available_bytes(self._proc_root),
            open_fds=open_fds,
            shm_bytes=shm_bytes,
            tree_private_bytes=private_bytes,
            pss_source=pss_source,
            pss_age_s=max(0.0, now_s - self._deep_at_s),
            cgroup_usage_bytes=cgroup_usage,
            psi_some_avg10=psi.some_avg10 if psi else None,
            psi_full_avg10=psi.full_avg10 if psi else None,
        )

    def _pressure_path(self) -> Path:
        cgroup_file = self._cgroup.pressure_file if self._cgroup else None
        return cgroup_file if cgroup_file is not None else self._proc_root / "pressure" / "memory"


def sample_tree(
    root_pid: int, *, cgroup: CgroupPaths | None = None, proc_root: Path = Path("/proc")
) -> MemorySnapshot:
    """One exact snapshot of ``root_pid`` and its descendants (full deep pass, no carrying).

    Pass ``cgroup`` only when the worker owns it (see ``limits.owns_cgroup``): its usage then
    becomes ``used_bytes``. Raises ProcessLookupError when ``root_pid`` is gone; descendants
    that exit mid-sample are simply left out.
    """
    meter = TreeMeter(root_pid, cgroup=cgroup, proc_root=proc_root, deep_budget_fraction=None)
    return meter.read()


class Sampler:
    """A daemon thread reading a ``TreeMeter`` every ``interval_s`` (default 0.25 s).

    ``on_sample(snapshot)`` runs on the sampler thread after each sample; its exceptions are
    logged and sampling goes on. ``deep_budget_fraction`` and ``max_deep_interval_s`` are passed
    to the ``TreeMeter`` (``meter``). ``cpu_seconds`` is the thread CPU time spent reading (not in the
    callback). ``history`` keeps the last ``history_len`` (taken_at_s, used_bytes) pairs.
    """

    def __init__(
        self,
        root_pid: int,
        *,
        interval_s: float = 0.25,
        cgroup: CgroupPaths | None = None,
        on_sample: Callable[[MemorySnapshot], None] | None = None,
        history_len: int = 10_000,
        proc_root: Path = Path("/proc"),
        deep_budget_fraction: float | None = 0.0025,
        max_deep_interval_s: float = 10.0,
    ) -> None:
        self.interval_s = interval_s
        self.meter = TreeMeter(
            root_pid, cgroup=cgroup, proc_root=proc_root,
            deep_budget_fraction=deep_budget_fraction, max_deep_interval_s=max_deep_interval_s,
        )
        self._on_sample = on_sample
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._history: deque[tuple[float, int]] = deque(maxlen=history_len)
        self._latest: MemorySnapshot | None = None
        self._peak: MemorySnapshot | None = None
        self._samples_taken = 0
        self._cpu_seconds = 0.0
        self._failing = False

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Sampler already started")
        self._thread = threading.Thread(target=self._run, name="watchdog-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop and join the thread (waits at most ``timeout_s`` for a sample in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def latest(self) -> MemorySnapshot | None:
        return self._latest

    @property
    def peak_snapshot(self) -> MemorySnapshot | None:
        return self._peak

    @property
    def peak_used_bytes(self) -> int:
        """Highest ``used_bytes`` since start or ``reset_peak()``; 0 before the first sample."""
        peak = self._peak
        return peak.used_bytes if peak is not None else 0

    def reset_peak(self) -> None:
        with self._lock:
            self._peak = self._latest

    @property
    def samples_taken(self) -> int:
        return self._samples_taken

    @property
    def cpu_seconds(self) -> float:
        return self._cpu_seconds

    @property
    def history(self) -> tuple[tuple[float, int], ...]:
        with self._lock:
            return tuple(self._history)

    def _run(self) -> None:
        next_s = time.monotonic()
        while not self._stop.is_set():
            snapshot = self._read()
            if snapshot is not None:
                self._record(snapshot)
                self._notify(snapshot)
            next_s += self.interval_s
            delay_s = next_s - time.monotonic()
            if delay_s < 0:  # fell behind (a slow deep pass, a stalled host): skip, don't burst
                next_s, delay_s = time.monotonic(), 0.0
            self._stop.wait(delay_s)

    def _read(self) -> MemorySnapshot | None:
        started_cpu_s = time.thread_time()
        try:
            snapshot = self.meter.read()
        except Exception as exc:  # the thread must outlive any one bad read
            log = logger.debug if self._failing else logger.warning
            log("memory sample of pid %d failed: %s", self.meter.root_pid, exc)
            self._failing = True
            return None
        finally:
            self._cpu_seconds += time.thread_time() - started_cpu_s
        self._failing = False
        return snapshot

    def _record(self, snapshot: MemorySnapshot) -> None:
        with self._lock:
            self._latest = snapshot
            if self._peak is None or snapshot.used_bytes > self._peak.used_bytes:
                self._peak = snapshot
            self._history.append((snapshot.taken_at_s, snapshot.used_bytes))
            self._samples_taken += 1

    def _notify(self, snapshot: MemorySnapshot) -> None:
        if self._on_sample is None:
            return
        try:
            self._on_sample(snapshot)
        except Exception:  # a policy bug must not stop the measuring
            logger.exception("on_sample callback failed; sampling continues")


@dataclass(frozen=True)
class CostReport:
    """What sampling one tree cost: ``cpu_fraction`` of one core over ``wall_s``."""

    process_count: int
    tree_pss_bytes: int
    interval_s: float
    wall_s: float
    samples_taken: int
    deep_passes: int
    deep_cpu_seconds: float
    cpu_seconds: float

    @property
    def cpu_fraction(self) -> float:
        return self.cpu_seconds / self.wall_s

    @property
    def light_cpu_seconds(self) -> float:
        """CPU time of the samples that were not deep passes."""
        return self.cpu_seconds - self.deep_cpu_seconds

    def describe(self) -> str:
        return (
            f"sampler cost {self.cpu_fraction:.3%} of one core at {self.interval_s * 1000:.0f} ms: "
            f"{self.process_count} processes, tree PSS {self.tree_pss_bytes / MIB:.0f} MiB, "
            f"{self.samples_taken} samples in {self.wall_s:.1f} s; {self.deep_passes} deep passes "
            f"{self.deep_cpu_seconds * 1000 / max(1, self.deep_passes):.2f} ms each, other samples "
            f"{self.light_cpu_seconds * 1000 / max(1, self.samples_taken - self.deep_passes):.2f} ms each"
        )


def measure_cost(
    root_pid: int, *, seconds: float = 10.0, interval_s: float = 0.25, warmup_s: float = 1.0
) -> CostReport:
    """Run a Sampler on ``root_pid``'s tree and report its CPU cost over ``seconds`` of steady
    state, after ``warmup_s`` (which holds the first, forced deep pass)."""
    sampler = Sampler(root_pid, interval_s=interval_s)
    sampler.start()
    try:
        time.sleep(warmup_s)
        start = (time.monotonic(), sampler.cpu_seconds, sampler.samples_taken, sampler.meter.deep_passes,
                 sampler.meter.deep_cpu_seconds)
        time.sleep(seconds)
        end = (time.monotonic(), sampler.cpu_seconds, sampler.samples_taken, sampler.meter.deep_passes,
               sampler.meter.deep_cpu_seconds)
    finally:
        sampler.stop()
    wall_s, cpu_s, samples, deep_passes, deep_cpu_s = (b - a for a, b in zip(start, end))
    latest = sampler.latest
    return CostReport(
        process_count=latest.process_count if latest else 0,
        tree_pss_bytes=latest.tree_pss_bytes if latest else 0,
        interval_s=interval_s,
        wall_s=wall_s,
        samples_taken=int(samples),
        deep_passes=int(deep_passes),
        deep_cpu_seconds=deep_cpu_s,
        cpu_seconds=cpu_s,
    )


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m watchdog.sampler")
    parser.add_argument("--measure", action="store_true", help="measure sampling cost on a spawned tree")
    parser.add_argument("--processes", type=int, default=6, help="tree size including this process")
    parser.add_argument("--child-mib", type=int, default=200, help="touched memory per child")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval-s", type=float, default=0.25)
    args = parser.parse_args()
    if not args.measure:
        print(sample_tree(os.getpid()))
        return
    from watchdog.ballast import hold_children  # only the measurement spawns processes

    with hold_children(args.processes - 1, child_bytes=args.child_mib * MIB):
        print(measure_cost(os.getpid(), seconds=args.seconds, interval_s=args.interval_s).describe())


if __name__ == "__main__":
    _main()
