"""A ``worker`` subprocess whose merged output is read line by line, to wait on log lines (no sleeps)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence


def worker_command(*args: str) -> list[str]:
    """The installed ``worker`` console script next to this interpreter, with no .env file."""
    script = Path(sys.executable).with_name("worker")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli"]
    return [*base, "--env-file", os.devnull, *args]


class WorkerProcess:
    def __init__(self, args: Sequence[str], env: dict[str, str], cwd: Path, **popen: object) -> None:
        self.started_s = time.monotonic()
        self.proc = subprocess.Popen(worker_command(*args), env=env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, **popen)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        self.proc.stdout.close()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float, *, after: int = 0) -> re.Match:
        """First match of ``pattern`` in a line (from line index ``after``); fails with the output tail."""
        regex = re.compile(pattern)
        deadline_s = time.monotonic() + timeout_s
        checked = after
        with self._changed:
            while True:
                for line in self.lines[checked:]:
                    if match := regex.search(line):
                        return match
                checked = len(self.lines)
                remaining_s = deadline_s - time.monotonic()
                if remaining_s <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(self.lines[-40:])
                    raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s "
                                         f"(exit {self.proc.poll()}); output tail:\n{tail}")
                self._changed.wait(min(remaining_s, 0.5))

    def send(self, signum: int = signal.SIGTERM) -> float:
        """Send ``signum`` to the worker's main process only (as systemd's KillMode=mixed does)."""
        self.proc.send_signal(signum)
        return time.monotonic()

    def wait(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=5.0)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5.0)


def have(binary: str) -> Optional[str]:
    return shutil.which(binary)
