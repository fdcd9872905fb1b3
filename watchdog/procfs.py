"""Per-process and system-wide memory readings from /proc and cgroup files.

Every reader returns None (or an empty result) when its process vanished or its file cannot be
read: loader workers come and go, and a sample must never raise because one of them exited.
Measured costs on a 6.x kernel: statm ~5 us, smaps_rollup ~8 us per MiB of RSS (it walks the
page tables), maps ~150 us, one readlink per fd ~3 us.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from watchdog.limits import CgroupPaths, PressureStats, parse_flat_keyed, parse_meminfo, parse_psi

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
SHM_PREFIX = "/dev/shm/"


def read_bytes(path: str | Path, chunk_bytes: int = 65536) -> bytes | None:
    """The whole file, or None when it cannot be opened or read (ENOENT, ESRCH, EACCES...)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    chunks = []
    try:
        while chunk := os.read(fd, chunk_bytes):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_rss_bytes(pid: int, proc_root: Path = Path("/proc")) -> int | None:
    """Resident set size from /proc/PID/statm (cheap: no page-table walk)."""
    data = read_bytes(f"{proc_root}/{pid}/statm")
    fields = data.split() if data else []
    return int(fields[1]) * PAGE_BYTES if len(fields) > 1 else None


def read_statm_bytes(pid: int, proc_root: Path = Path("/proc")) -> tuple[int, int] | None:
    """``(resident, shared)`` bytes from /proc/PID/statm; shared is file-backed plus shmem
    resident pages, so ``resident - shared`` is the anonymous memory."""
    data = read_bytes(f"{proc_root}/{pid}/statm")
    fields = data.split() if data else []
    return (int(fields[1]) * PAGE_BYTES, int(fields[2]) * PAGE_BYTES) if len(fields) > 2 else None


def read_pss_bytes(pid: int, proc_root: Path = Path("/proc")) -> int | None:
    """Proportional set size from /proc/PID/smaps_rollup; None when unreadable (kernel < 4.14,
    no ptrace permission, or the process is gone)."""
    parts = read_pss_parts(pid, proc_root)
    return parts[0] if parts is not None else None


def read_pss_parts(pid: int, proc_root: Path = Path("/proc")) -> tuple[int, int] | None:
    """``(Pss, Pss_Shmem)`` bytes from /proc/PID/smaps_rollup; Pss_Shmem is 0 on kernels that
    do not report it (< 5.9). None when unreadable."""
    data = read_bytes(f"{proc_root}/{pid}/smaps_rollup")
    if not data:
        return None
    pss_bytes: int | None = None
    shmem_bytes = 0
    for line in data.splitlines():
        if line.startswith(b"Pss:"):
            pss_bytes = int(line.split()[1]) * 1024
        elif line.startswith(b"Pss_Shmem:"):
            shmem_bytes = int(line.split()[1]) * 1024
    return (pss_bytes, shmem_bytes) if pss_bytes is not None else None


@dataclass(frozen=True)
class FdReading:
    """Open descriptors of one process and the /dev/shm files among them (inode -> size)."""

    open_fds: int
    shm_sizes: dict[int, int]


def read_fds(pid: int, proc_root: Path = Path("/proc")) -> FdReading | None:
    """Count /proc/PID/fd entries and size the /dev/shm files they hold.

    torch unlinks its shm segments right after creating them, so the link reads
    ``/dev/shm/torch_... (deleted)``; stat through the fd link still gives inode and size.
    """
    fd_dir = f"{proc_root}/{pid}/fd"
    try:
        entries = list(os.scandir(fd_dir))
    except OSError:
        return None
    shm_sizes: dict[int, int] = {}
    for entry in entries:
        try:
            if os.readlink(entry.path).startswith(SHM_PREFIX):
                stat = os.stat(entry.path)
                shm_sizes[stat.st_ino] = stat.st_size
        except OSError:
            continue  # closed since the listing
    return FdReading(open_fds=len(entries), shm_sizes=shm_sizes)


def _mapped_size(proc_dir: str, address_range: str, mapped_bytes: int) -> int:
    # map_files gives the real file size even for unlinked files, but needs CAP_SYS_ADMIN;
    # without it the mapped length is the best lower bound there is.
    try:
        return os.stat(f"{proc_dir}/map_files/{address_range}").st_size
    except OSError:
        return mapped_bytes


def shm_mapping(proc_dir: str, fields: list[str]) -> tuple[int, int] | None:
    """``(inode, file size)`` when ``fields`` (a maps/smaps mapping line split with
    ``maxsplit=5``) map a /dev/shm file, else None. ``proc_dir`` is the process's /proc entry."""
    if len(fields) < 6 or not fields[5].startswith(SHM_PREFIX):
        return None
    start, _, end = fields[0].partition("-")
    return int(fields[4]), _mapped_size(proc_dir, fields[0], int(end, 16) - int(start, 16))


def read_maps_shm(pid: int, proc_root: Path = Path("/proc")) -> dict[int, int]:
    """inode -> size of /dev/shm files mapped by ``pid`` ({} when none or the process is gone)."""
    data = read_bytes(f"{proc_root}/{pid}/maps")
    return maps_shm_sizes(f"{proc_root}/{pid}", data) if data else {}


def maps_shm_sizes(proc_dir: str, data: bytes) -> dict[int, int]:
    """inode -> size of the /dev/shm files that ``data`` (a maps file's bytes) maps; ``proc_dir``
    is the process's /proc entry."""
    prefix = SHM_PREFIX.encode()
    if prefix not in data:
        return {}
    sizes: dict[int, int] = {}
    for line in data.splitlines():
        if prefix not in line:  # a torch process maps thousands of other things: skip them undecoded
            continue
        segment = shm_mapping(proc_dir, line.decode(errors="replace").split(maxsplit=5))
        if segment is not None:
            inode, size = segment
            sizes[inode] = max(sizes.get(inode, 0), size)
    return sizes


def read_mem_available_bytes(proc_root: Path = Path("/proc")) -> int:
    """MemAvailable from /proc/meminfo (0 when the kernel does not report it)."""
    data = read_bytes(f"{proc_root}/meminfo") or b""
    return parse_meminfo(data.decode()).get("MemAvailable", 0)


def read_pressure(path: Path) -> PressureStats | None:
    """A PSI file; None when missing or disabled (reads fail with EOPNOTSUPP without psi=1)."""
    data = read_bytes(path)
    if not data:
        return None
    try:
        return parse_psi(data.decode())
    except (ValueError, KeyError):
        return None


def read_cgroup_usage_bytes(paths: CgroupPaths) -> int | None:
    """Working set of the cgroup: usage minus inactive page cache (which reclaim drops first).

    v1 uses ``total_inactive_file`` (hierarchical, like usage_in_bytes) when present; this is the
    number kubelet and cAdvisor evict and alert on. None when the files are unreadable.
    """
    usage = read_bytes(paths.usage_file)
    if not usage:
        return None
    stat = parse_flat_keyed((read_bytes(paths.stat_file) or b"").decode())
    inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    return max(0, int(usage) - inactive)
