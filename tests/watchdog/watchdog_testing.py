"""Helpers shared by the watchdog tests (a uniquely named module: ``conftest`` is ambiguous
when several test folders have one)."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


@dataclass
class FakeHost:
    """A fake ``proc`` and ``sys/fs/cgroup`` under tmp_path; write files with ``put``."""

    proc: Path
    cgroup: Path

    def put(self, relative: str, text: str) -> Path:
        path = self.proc.parent / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def process(self, pid: int, ppid: int, *, rss_pages: int = 0, pss_kib: int | None = None) -> None:
        """A fake /proc/PID with stat (a command name with spaces and parentheses), statm, an
        empty fd directory, empty maps, and smaps_rollup only when ``pss_kib`` is given."""
        self.put(f"proc/{pid}/stat", f"{pid} (my (odd) name) S {ppid} {pid} {pid} 0 -1\n")
        self.put(f"proc/{pid}/statm", f"1000 {rss_pages} 10 1 0 100 0\n")
        self.put(f"proc/{pid}/maps", "")
        (self.proc / str(pid) / "fd").mkdir(exist_ok=True)
        if pss_kib is not None:
            self.put(f"proc/{pid}/smaps_rollup", f"00-ff ---p 0 00:00 0 [rollup]\nRss: 1 kB\nPss: {pss_kib} kB\n")


CHILD_SCRIPT = """
import json, os, sys
from watchdog.limits import find_cgroup, owns_cgroup, read_limits
held = []
for line in sys.stdin:
    command, *args = line.split()
    if command == "limits":
        limits = read_limits()
        paths = find_cgroup()
        print(json.dumps({"effective_limit_bytes": limits.effective_limit_bytes,
                          "limit_source": limits.limit_source,
                          "directory": str(paths.directory) if paths else None,
                          "owns": owns_cgroup(paths) if paths else None}), flush=True)
    elif command == "alloc":
        held.append(b"\\x01" * int(args[0]))
        print(json.dumps({"held_bytes": sum(map(len, held))}), flush=True)
"""


@dataclass
class ChildProcess:
    """A python child that answers one JSON line per command line (``limits``, ``alloc N``)."""

    process: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def ask(self, command: str) -> dict[str, object]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.pid} exited: {self.process.stderr.read() if self.process.stderr else ''}")
        return json.loads(line)
