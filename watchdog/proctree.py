"""Which processes form the worker's tree: the root pid and all its descendants.

This kernel family often lacks /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN), so the tree
is found by reading each process's parent pid from /proc/PID/stat. ``ProcessTree`` keeps a
pid -> ppid index and reads stat only for pids it has not seen, which turns a scan of every
process on the host (~10 us each) into one directory listing per sample.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from pathlib import Path

logger = logging.getLogger(__name__)


def read_ppid(pid: int, proc_root: Path = Path("/proc")) -> int | None:
    """Parent pid of ``pid`` from /proc/PID/stat; None when the process is gone."""
    try:
        fd = os.open(f"{proc_root}/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may hold spaces and parentheses; fields after its last ")" don't.
    fields = data.rpartition(b")")[2].split()
    return int(fields[1]) if len(fields) > 1 else None


def list_pids(proc_root: Path = Path("/proc")) -> set[int]:
    return {int(name) for name in os.listdir(proc_root) if name.isdigit()}


def _descendants(root_pid: int, parents: dict[int, int]) -> tuple[int, ...]:
    children: dict[int, list[int]] = defaultdict(list)
    for pid, ppid in parents.items():
        children[ppid].append(pid)
    found = [root_pid]
    for pid in found:  # breadth first; the list grows while it is walked
        found.extend(sorted(children.get(pid, ())))
    return tuple(found)


def tree_pids(root_pid: int, *, proc_root: Path = Path("/proc")) -> tuple[int, ...]:
    """``root_pid`` followed by all its descendants, from a full scan of ``proc_root``.

    Raises ProcessLookupError when ``root_pid`` does not exist.
    """
    return ProcessTree(proc_root=proc_root).members(root_pid)


def read_last_pid(proc_root: Path = Path("/proc")) -> int | None:
    """The most recently created pid (last field of /proc/loadavg); None when unreadable."""
    try:
        fd = os.open(f"{proc_root}/loadavg", os.O_RDONLY)
    except OSError:
        return None
    try:
        fields = os.read(fd, 256).split()
    finally:
        os.close(fd)
    return int(fields[-1]) if len(fields) == 5 else None


class ProcessTree:
    """An incremental pid -> ppid index of ``proc_root``.

    When /proc/loadavg's last-created pid has not moved, no process was created anywhere, so the
    previous members are returned without listing /proc (the listing is most of a sample's cost).
    Processes that exited since are still listed then: readers skip pids they cannot read.
    Parent pids of known pids are trusted until ``full_refresh_s`` (default 5 s) has passed,
    then the index is rebuilt: that bounds how long a reused pid or a reparented orphan can be
    misattributed.
    """

    def __init__(self, *, proc_root: Path = Path("/proc"), full_refresh_s: float = 5.0) -> None:
        self._proc_root = proc_root
        self._full_refresh_s = full_refresh_s
        self._parents: dict[int, int] = {}
        self._refreshed_at_s = float("-inf")
        self._last_pid: int | None = None
        self._root_pid: int | None = None
        self._members: tuple[int, ...] = ()

    def members(self, root_pid: int) -> tuple[int, ...]:
        """``root_pid`` first, then its descendants; ProcessLookupError if the root is gone
        (detected at the next listing, so possibly one call late)."""
        last_pid = read_last_pid(self._proc_root)
        now_s = time.monotonic()
        refresh_due = now_s - self._refreshed_at_s >= self._full_refresh_s
        if not refresh_due and last_pid is not None and last_pid == self._last_pid and root_pid == self._root_pid:
            return self._members
        if refresh_due:
            self._parents.clear()
            self._refreshed_at_s = now_s
        self._update(list_pids(self._proc_root))
        if root_pid not in self._parents:
            raise ProcessLookupError(f"process {root_pid} not found under {self._proc_root}")
        members = _descendants(root_pid, self._parents)
        self._members, self._last_pid, self._root_pid = members, last_pid, root_pid
        return members

    def _update(self, live: set[int]) -> None:
        for pid in self._parents.keys() - live:
            del self._parents[pid]
        for pid in live - self._parents.keys():
            ppid = read_ppid(pid, self._proc_root)
            if ppid is not None:  # vanished between listing and reading: normal
                self._parents[pid] = ppid
