"""Factory fixtures for the watchdog tests: fixture files, fake /proc + /sys trees, real cgroups."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from pathlib import Path

import pytest

from watchdog_testing import CHILD_SCRIPT, FIXTURES, REPO_ROOT, ChildProcess, FakeHost

V1_MEMORY_ROOT = Path("/sys/fs/cgroup/memory")


@pytest.fixture
def fixture_text() -> Callable[[str], str]:
    return lambda name: (FIXTURES / name).read_text()


@pytest.fixture
def fake_host(tmp_path: Path, fixture_text: Callable[[str], str]) -> FakeHost:
    host = FakeHost(proc=tmp_path / "proc", cgroup=tmp_path / "sys" / "fs" / "cgroup")
    host.proc.mkdir()
    host.cgroup.mkdir(parents=True)
    host.put("proc/meminfo", fixture_text("meminfo.txt"))
    host.put("proc/loadavg", "0.00 0.00 0.00 1/100 4242\n")
    host.put("proc/pressure/memory", fixture_text("psi_memory.txt"))
    return host


@pytest.fixture
def shm_block() -> Iterator[Callable[[int], shared_memory.SharedMemory]]:
    """Creates /dev/shm blocks held (fd + mapping) by this process; unlinks them afterwards."""
    blocks: list[shared_memory.SharedMemory] = []

    def make(size_bytes: int) -> shared_memory.SharedMemory:
        block = shared_memory.SharedMemory(create=True, size=size_bytes)
        blocks.append(block)
        return block

    yield make
    for block in blocks:
        block.close()
        block.unlink()


def _remove_cgroup(path: Path) -> None:
    # rmdir fails with EBUSY until the kernel has finished tearing down exited members.
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            for pid in (path / "cgroup.procs").read_text().split():
                (V1_MEMORY_ROOT / "cgroup.procs").write_text(pid)  # move leftovers out
            time.sleep(0.1)
    path.rmdir()


@pytest.fixture
def memory_cgroup() -> Iterator[Callable[[int], Path]]:
    """Creates real cgroup v1 memory cgroups with a limit; removes them afterwards.

    Skips when /sys/fs/cgroup/memory is not a writable v1 memory hierarchy.
    """
    if not (V1_MEMORY_ROOT / "memory.limit_in_bytes").exists():
        pytest.skip("no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
    if not os.access(V1_MEMORY_ROOT, os.W_OK):
        pytest.skip("/sys/fs/cgroup/memory is not writable (need root)")
    created: list[Path] = []

    def make(limit_bytes: int) -> Path:
        path = V1_MEMORY_ROOT / f"antenna-watchdog-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
        except OSError as exc:
            pytest.skip(f"cannot create a memory cgroup under {V1_MEMORY_ROOT}: {exc}")
        created.append(path)
        (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        return path

    yield make
    for path in created:
        _remove_cgroup(path)


@pytest.fixture
def python_child() -> Iterator[Callable[[], ChildProcess]]:
    """Starts command-driven python children (repo on PYTHONPATH); kills and reaps them after."""
    children: list[ChildProcess] = []

    def make() -> ChildProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT,
        )
        children.append(ChildProcess(process))
        return children[-1]

    yield make
    for child in children:
        child.process.kill()
        child.process.communicate(timeout=10)
