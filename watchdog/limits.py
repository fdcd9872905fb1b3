"""How much memory the worker may use: /proc/meminfo, cgroup v1/v2 (and hybrid) limits, PSI.

Every parser takes text so it can be tested on fixture files; the ``find_``/``read_`` functions
take ``proc_root`` and ``cgroup_root`` so they can be pointed at a fake tree.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from watchdog.proctree import tree_pids

logger = logging.getLogger(__name__)

MIB = 1 << 20

# cgroup v1 says "no limit" with PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB pages; the
# exact number depends on the page size), so anything this large means no limit.
_V1_UNLIMITED_FLOOR_BYTES = 1 << 60


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse /proc/meminfo into ``{field: value}``; ``kB`` values are converted to bytes.

    Fields without a unit (``HugePages_Total``...) are page counts and are returned as they are.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts:
            continue
        scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
        values[name.strip()] = int(parts[0]) * scale
    return values


@dataclass(frozen=True)
class PressureStats:
    """Memory pressure stall information (percent of wall time over 10 s / 60 s windows).

    ``full_*`` is None where the kernel reports no ``full`` line (it always does for memory
    since 5.x, but the parser is shared with cpu pressure files of older kernels).
    """

    some_avg10: float
    some_avg60: float
    full_avg10: float | None
    full_avg60: float | None
    some_total_us: int
    full_total_us: int | None


def parse_psi(text: str) -> PressureStats:
    """Parse a PSI file (/proc/pressure/memory or a v2 cgroup's memory.pressure).

    Raises ValueError when there is no ``some`` line.
    """
    rows: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        rows[kind] = dict(field.split("=", 1) for field in rest.split() if "=" in field)
    some = rows.get("some")
    if some is None:
        raise ValueError(f"PSI text has no 'some' line: {text[:80]!r}")
    full = rows.get("full")
    return PressureStats(
        some_avg10=float(some["avg10"]),
        some_avg60=float(some["avg60"]),
        full_avg10=float(full["avg10"]) if full else None,
        full_avg60=float(full["avg60"]) if full else None,
        some_total_us=int(some["total"]),
        full_total_us=int(full["total"]) if full else None,
    )


@dataclass(frozen=True)
class CgroupMembership:
    """Which cgroups a process is in, from /proc/PID/cgroup.

    ``v1_paths`` holds ``(controller, path)`` pairs; a line naming ``cpu,cpuacct`` gives one pair
    per controller. ``unified_path`` is the ``0::`` line's path (v2 or the hybrid unified tree).
    """

    v1_paths: tuple[tuple[str, str], ...]
    unified_path: str | None

    def v1_path(self, controller: str) -> str | None:
        return next((path for name, path in self.v1_paths if name == controller), None)


def parse_proc_cgroup(text: str) -> CgroupMembership:
    """Parse /proc/PID/cgroup lines ``hierarchy-id:controllers:path`` (v1, v2 or hybrid)."""
    v1_paths: list[tuple[str, str]] = []
    unified_path: str | None = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            unified_path = path
            continue
        v1_paths.extend((name, path) for name in controllers.split(",") if name)
    return CgroupMembership(v1_paths=tuple(v1_paths), unified_path=unified_path)


@dataclass(frozen=True)
class CgroupPaths:
    """Where the worker's memory cgroup files are.

    ``directory`` is ``mount / relative_path``, or the mount root when that path is not visible
    (a container without a cgroup namespace sees its own cgroup mounted as the root):
    ``visible`` says which.
    """

    version: int
    mount: Path
    relative_path: str
    directory: Path
    visible: bool

    @property
    def limit_file(self) -> Path:
        return self.directory / ("memory.limit_in_bytes" if self.version == 1 else "memory.max")

    @property
    def usage_file(self) -> Path:
        return self.directory / ("memory.usage_in_bytes" if self.version == 1 else "memory.current")

    @property
    def stat_file(self) -> Path:
        return self.directory / "memory.stat"

    @property
    def procs_file(self) -> Path:
        return self.directory / "cgroup.procs"

    @property
    def pressure_file(self) -> Path | None:
        """v2 only: a v1 memory cgroup has no PSI file, so callers use /proc/pressure/memory."""
        return self.directory / "memory.pressure" if self.version == 2 else None

    @property
    def is_root(self) -> bool:
        """True for the host's root cgroup (which holds every process not placed elsewhere).

        A v2 cgroup namespace also shows ``/``, but its root has ``memory.max``; the real root
        has none. A fallback to the mount root (``visible`` False) is a container's own cgroup.
        """
        if not self.visible or self.relative_path != "/":
            return False
        return self.version == 1 or not (self.directory / "memory.max").exists()


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _controllers(mount: Path) -> set[str]:
    return set((_read_text(mount / "cgroup.controllers") or "").split())


def _locate(version: int, mount: Path, relative_path: str) -> CgroupPaths | None:
    if not mount.is_dir():
        return None
    directory = mount / relative_path.lstrip("/")
    visible = directory.is_dir()
    if not visible:
        logger.debug("cgroup %s not visible under %s, using the mount root", relative_path, mount)
    return CgroupPaths(version, mount, relative_path, directory if visible else mount, visible)


def find_cgroup(
    proc_root: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    pid: int | str = "self",
) -> CgroupPaths | None:
    """Find the memory cgroup of ``pid``; None when there is no memory controller to read.

    A v1 memory controller (pure v1, or hybrid hosts where it sits at ``<root>/memory`` next to
    ``<root>/unified``) wins, because a controller is bound to one hierarchy only. Otherwise the
    unified path is looked up under ``cgroup_root`` (pure v2) or ``cgroup_root/unified``
    (hybrid with the memory controller moved to v2).
    """
    text = _read_text(proc_root / str(pid) / "cgroup")
    if text is None:
        return None
    membership = parse_proc_cgroup(text)
    v1_path = membership.v1_path("memory")
    if v1_path is not None:
        return _locate(1, cgroup_root / "memory", v1_path)
    if membership.unified_path is None:
        return None
    for mount in (cgroup_root, cgroup_root / "unified"):
        if "memory" in _controllers(mount):
            return _locate(2, mount, membership.unified_path)
    return None


def parse_limit_value(text: str) -> int | None:
    """A cgroup limit file's value in bytes; None for v2 ``max`` and v1's huge "no limit"."""
    value = text.strip()
    if value in ("", "max"):
        return None
    number = int(value)
    return None if number >= _V1_UNLIMITED_FLOOR_BYTES else number


@dataclass(frozen=True)
class CgroupLimits:
    """``limit_bytes`` is memory.max / memory.limit_in_bytes, ``high_bytes`` v2's memory.high."""

    limit_bytes: int | None
    high_bytes: int | None


def _min_present(*values: int | None) -> int | None:
    present = [value for value in values if value is not None]
    return min(present) if present else None


def _file_limit(path: Path | None) -> int | None:
    text = _read_text(path) if path is not None else None
    return parse_limit_value(text) if text is not None else None


def _v1_limits(paths: CgroupPaths) -> CgroupLimits:
    # With use_hierarchy an ancestor's smaller limit binds; v1 reports it in memory.stat.
    stat = parse_flat_keyed(_read_text(paths.stat_file) or "")
    hierarchical = stat.get("hierarchical_memory_limit")
    if hierarchical is not None and hierarchical >= _V1_UNLIMITED_FLOOR_BYTES:
        hierarchical = None
    return CgroupLimits(_min_present(_file_limit(paths.limit_file), hierarchical), None)


def _v2_limits(paths: CgroupPaths) -> CgroupLimits:
    # v2 has no hierarchical summary: every ancestor up to the mount can hold the binding limit.
    limit_bytes: int | None = None
    high_bytes: int | None = None
    directory = paths.directory
    while True:
        limit_bytes = _min_present(limit_bytes, _file_limit(directory / "memory.max"))
        high_bytes = _min_present(high_bytes, _file_limit(directory / "memory.high"))
        if directory == paths.mount or paths.mount not in directory.parents:
            return CgroupLimits(limit_bytes, high_bytes)
        directory = directory.parent


def read_cgroup_limits(paths: CgroupPaths) -> CgroupLimits:
    """The binding limits of the cgroup at ``paths`` (unreadable files count as no limit).

    v1: min of memory.limit_in_bytes and memory.stat's hierarchical_memory_limit.
    v2: min of memory.max (and of memory.high) over the cgroup and its ancestors.
    """
    return _v1_limits(paths) if paths.version == 1 else _v2_limits(paths)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse ``key value`` lines (memory.stat); lines that are not that shape are skipped."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


@dataclass(frozen=True)
class Limits:
    """The memory the worker may use and the caps policy acts on.

    ``effective_limit_bytes`` is the smallest of the present limits (MemTotal is always present);
    on a tie the earlier of configured, cgroup high, cgroup limit, MemTotal names the source.
    Caps are fractions of it: soft (default 0.70) starts shrinking, hard (default 0.85) pauses.
    """

    mem_total_bytes: int
    cgroup_version: int | None = None
    cgroup_limit_bytes: int | None = None
    cgroup_high_bytes: int | None = None
    configured_max_bytes: int | None = None
    soft_cap_fraction: float = 0.70
    hard_cap_fraction: float = 0.85

    def __post_init__(self) -> None:
        if not 0 < self.soft_cap_fraction < self.hard_cap_fraction <= 1:
            raise ValueError(
                "need 0 < AMI_WATCHDOG_SOFT_CAP_FRACTION < AMI_WATCHDOG_HARD_CAP_FRACTION <= 1, got "
                f"soft={self.soft_cap_fraction} hard={self.hard_cap_fraction}"
            )
        if self.configured_max_bytes is not None and self.configured_max_bytes <= 0:
            raise ValueError(f"AMI_MAX_MEMORY_BYTES must be > 0, got {self.configured_max_bytes}")
        if self.mem_total_bytes <= 0:
            raise ValueError(f"mem_total_bytes must be > 0, got {self.mem_total_bytes}")

    def _candidates(self) -> list[tuple[int, str]]:
        cgroup_source = f"cgroup-v{self.cgroup_version}"
        pairs = [
            (self.configured_max_bytes, "AMI_MAX_MEMORY_BYTES"),
            (self.cgroup_high_bytes, cgroup_source),
            (self.cgroup_limit_bytes, cgroup_source),
            (self.mem_total_bytes, "meminfo"),
        ]
        return [(value, source) for value, source in pairs if value is not None]

    @property
    def effective_limit_bytes(self) -> int:
        return min(value for value, _ in self._candidates())

    @property
    def limit_source(self) -> str:
        """``meminfo``, ``cgroup-v1``, ``cgroup-v2`` or ``AMI_MAX_MEMORY_BYTES``."""
        limit = self.effective_limit_bytes
        return next(source for value, source in self._candidates() if value == limit)

    @property
    def soft_cap_bytes(self) -> int:
        return int(self.effective_limit_bytes * self.soft_cap_fraction)

    @property
    def hard_cap_bytes(self) -> int:
        return int(self.effective_limit_bytes * self.hard_cap_fraction)

    def describe(self) -> str:
        def mib(value: int | None) -> str:
            return "-" if value is None else f"{value / MIB:.1f} MiB"

        return (
            f"limit {mib(self.effective_limit_bytes)} from {self.limit_source} "
            f"(mem_total {mib(self.mem_total_bytes)}, cgroup {mib(self.cgroup_limit_bytes)}, "
            f"high {mib(self.cgroup_high_bytes)}, configured {mib(self.configured_max_bytes)}); "
            f"soft {self.soft_cap_fraction:.0%} = {mib(self.soft_cap_bytes)}, "
            f"hard {self.hard_cap_fraction:.0%} = {mib(self.hard_cap_bytes)}"
        )


def read_limits(
    *,
    configured_max_bytes: int | None = None,
    soft_cap_fraction: float = 0.70,
    hard_cap_fraction: float = 0.85,
    proc_root: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    pid: int | str = "self",
) -> Limits:
    """Read MemTotal and ``pid``'s cgroup limits into :class:`Limits`.

    ``configured_max_bytes`` is the operator's AMI_MAX_MEMORY_BYTES (read by the caller's
    settings, never here). Raises OSError when /proc/meminfo is unreadable and ValueError for
    bad fractions.
    """
    mem_total_bytes = parse_meminfo((proc_root / "meminfo").read_text())["MemTotal"]
    paths = find_cgroup(proc_root, cgroup_root, pid)
    cgroup = read_cgroup_limits(paths) if paths is not None else CgroupLimits(None, None)
    return Limits(
        mem_total_bytes=mem_total_bytes,
        cgroup_version=paths.version if paths is not None else None,
        cgroup_limit_bytes=cgroup.limit_bytes,
        cgroup_high_bytes=cgroup.high_bytes,
        configured_max_bytes=configured_max_bytes,
        soft_cap_fraction=soft_cap_fraction,
        hard_cap_fraction=hard_cap_fraction,
    )


def _cgroup_subtree_pids(paths: CgroupPaths) -> set[int] | None:
    # Usage is hierarchical, so processes in child cgroups count too.
    pids: set[int] = set()
    for directory, _, _ in os.walk(paths.directory):
        text = _read_text(Path(directory) / "cgroup.procs")
        if text is None:
            return None
        pids.update(int(line) for line in text.split())
    return pids


def owns_cgroup(
    paths: CgroupPaths, *, root_pid: int | None = None, proc_root: Path = Path("/proc")
) -> bool:
    """True when ``paths`` is not the root cgroup and holds exactly ``root_pid``'s process tree.

    Only then does the cgroup's usage measure the worker alone (and include what PSS misses:
    page cache, kernel memory, /dev/shm held only by fds). ``root_pid`` defaults to this process.
    A point-in-time check: call it at start, before loader workers are forked into the cgroup.
    """
    if paths.is_root:
        return False
    root_pid = os.getpid() if root_pid is None else root_pid
    members = _cgroup_subtree_pids(paths)
    if members is None:
        return False
    try:
        tree = set(tree_pids(root_pid, proc_root=proc_root))
    except ProcessLookupError:
        return False
    owned = members == tree
    logger.debug("cgroup %s members=%d tree=%d owned=%s", paths.directory, len(members), len(tree), owned)
    return owned
