"""Limits: parsers on fixture files, cgroup discovery on fake trees, this machine, a real cgroup."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from watchdog_testing import MIB, FakeHost
from watchdog.limits import (
    CgroupPaths,
    Limits,
    find_cgroup,
    owns_cgroup,
    parse_limit_value,
    parse_meminfo,
    parse_proc_cgroup,
    parse_psi,
    read_cgroup_limits,
    read_limits,
)

pytestmark = pytest.mark.timeout(20)

MEMINFO_TOTAL_BYTES = 24684084 * 1024  # MemTotal of fixtures/meminfo.txt


def test_parse_meminfo_converts_kib_to_bytes(fixture_text) -> None:
    values = parse_meminfo(fixture_text("meminfo.txt") + "HugePages_Total:       7\n")
    assert values["MemTotal"] == MEMINFO_TOTAL_BYTES
    assert values["MemAvailable"] == 24132296 * 1024
    assert values["HugePages_Total"] == 7  # a count, not kB


def test_parse_psi_memory(fixture_text) -> None:
    stats = parse_psi(fixture_text("psi_memory.txt"))
    assert (stats.some_avg10, stats.some_avg60, stats.some_total_us) == (1.25, 0.50, 123456)
    assert (stats.full_avg10, stats.full_avg60, stats.full_total_us) == (0.75, 0.25, 65432)


def test_parse_psi_without_full_line(fixture_text) -> None:
    stats = parse_psi(fixture_text("psi_some_only.txt"))
    assert stats.some_avg10 == 3.0
    assert stats.full_avg10 is None and stats.full_total_us is None


def test_parse_psi_rejects_text_without_some() -> None:
    with pytest.raises(ValueError, match="no 'some' line"):
        parse_psi("full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")


def test_parse_proc_cgroup_v1(fixture_text) -> None:
    membership = parse_proc_cgroup(fixture_text("proc_cgroup_v1.txt"))
    assert membership.v1_path("memory") == "/docker/3f2a9c"
    assert membership.v1_path("cpuacct") == "/docker/3f2a9c"  # from "cpu,cpuacct"
    assert membership.v1_path("name=systemd") == "/docker/3f2a9c"
    assert membership.unified_path is None


def test_parse_proc_cgroup_v2(fixture_text) -> None:
    membership = parse_proc_cgroup(fixture_text("proc_cgroup_v2.txt"))
    assert membership.v1_paths == ()
    assert membership.unified_path == "/system.slice/antenna-worker.service"


def test_parse_proc_cgroup_hybrid(fixture_text) -> None:
    membership = parse_proc_cgroup(fixture_text("proc_cgroup_hybrid.txt"))
    assert membership.v1_path("memory") == "/process_api/344eb2d80feea31059265949019176cb"
    assert membership.v1_path("cpu") == "/"
    assert membership.unified_path == "/"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("v1_limit_unlimited.txt", None),
        ("v1_limit_512mib.txt", 512 * MIB),
        ("v2_max_unlimited.txt", None),
        ("v2_max_2gib.txt", 2048 * MIB),
    ],
)
def test_parse_limit_value(fixture_text, name: str, expected: int | None) -> None:
    assert parse_limit_value(fixture_text(name)) == expected


def test_parse_limit_value_v1_unlimited_on_64k_pages() -> None:
    assert parse_limit_value("9223372036854710272\n") is None


def _v1_host(host: FakeHost, fixture_text, *, limit: str, stat_limit: str | None = None) -> Path:
    host.put("proc/self/cgroup", fixture_text("proc_cgroup_v1.txt"))
    directory = host.cgroup / "memory" / "docker" / "3f2a9c"
    host.put(f"sys/fs/cgroup/memory/memory.limit_in_bytes", fixture_text("v1_limit_unlimited.txt"))
    host.put(f"sys/fs/cgroup/memory/docker/3f2a9c/memory.limit_in_bytes", fixture_text(limit))
    stat = fixture_text("memory_stat_v1.txt")
    if stat_limit is not None:
        stat = stat.replace("hierarchical_memory_limit 9223372036854771712", f"hierarchical_memory_limit {stat_limit}")
    host.put("sys/fs/cgroup/memory/docker/3f2a9c/memory.stat", stat)
    return directory


def _read(host: FakeHost, **kwargs) -> Limits:
    return read_limits(proc_root=host.proc, cgroup_root=host.cgroup, **kwargs)


def test_v1_limit_found_and_binding(fake_host: FakeHost, fixture_text) -> None:
    directory = _v1_host(fake_host, fixture_text, limit="v1_limit_512mib.txt")
    paths = find_cgroup(fake_host.proc, fake_host.cgroup)
    assert paths == CgroupPaths(1, fake_host.cgroup / "memory", "/docker/3f2a9c", directory, True)
    limits = _read(fake_host)
    assert (limits.cgroup_version, limits.cgroup_limit_bytes) == (1, 512 * MIB)
    assert (limits.effective_limit_bytes, limits.limit_source) == (512 * MIB, "cgroup-v1")
    assert limits.soft_cap_bytes == int(512 * MIB * 0.70)
    assert limits.hard_cap_bytes == int(512 * MIB * 0.85)


def test_v1_unlimited_falls_back_to_meminfo(fake_host: FakeHost, fixture_text) -> None:
    _v1_host(fake_host, fixture_text, limit="v1_limit_unlimited.txt")
    limits = _read(fake_host)
    assert limits.cgroup_limit_bytes is None
    assert (limits.effective_limit_bytes, limits.limit_source) == (MEMINFO_TOTAL_BYTES, "meminfo")


def test_v1_ancestor_limit_from_hierarchical_memory_limit(fake_host: FakeHost, fixture_text) -> None:
    _v1_host(fake_host, fixture_text, limit="v1_limit_512mib.txt", stat_limit=str(256 * MIB))
    assert _read(fake_host).cgroup_limit_bytes == 256 * MIB


def test_container_without_cgroup_namespace_uses_mount_root(fake_host: FakeHost, fixture_text) -> None:
    fake_host.put("proc/self/cgroup", fixture_text("proc_cgroup_v1.txt"))
    fake_host.put("sys/fs/cgroup/memory/memory.limit_in_bytes", fixture_text("v1_limit_512mib.txt"))
    paths = find_cgroup(fake_host.proc, fake_host.cgroup)
    assert paths is not None and not paths.visible
    assert paths.directory == fake_host.cgroup / "memory"
    assert not paths.is_root  # the mount root seen from a container is the container's cgroup
    assert _read(fake_host).effective_limit_bytes == 512 * MIB


def _v2_host(host: FakeHost, fixture_text, mount: str = "sys/fs/cgroup") -> Path:
    host.put("proc/self/cgroup", fixture_text("proc_cgroup_v2.txt"))
    host.put(f"{mount}/cgroup.controllers", "cpuset cpu io memory hugetlb pids\n")
    host.put(f"{mount}/system.slice/memory.max", fixture_text("v2_max_unlimited.txt"))
    leaf = f"{mount}/system.slice/antenna-worker.service"
    host.put(f"{leaf}/memory.max", fixture_text("v2_max_unlimited.txt"))
    host.put(f"{leaf}/memory.high", fixture_text("v2_max_unlimited.txt"))
    host.put(f"{leaf}/memory.stat", fixture_text("memory_stat_v2.txt"))
    return host.proc.parent / leaf


def test_v2_unlimited_then_memory_max_then_memory_high(fake_host: FakeHost, fixture_text) -> None:
    leaf = _v2_host(fake_host, fixture_text)
    assert find_cgroup(fake_host.proc, fake_host.cgroup).version == 2
    assert _read(fake_host).limit_source == "meminfo"
    (leaf / "memory.max").write_text(fixture_text("v2_max_2gib.txt"))
    assert (_read(fake_host).effective_limit_bytes, _read(fake_host).limit_source) == (2048 * MIB, "cgroup-v2")
    (leaf / "memory.high").write_text(f"{1536 * MIB}\n")
    limits = _read(fake_host)
    assert (limits.cgroup_limit_bytes, limits.cgroup_high_bytes) == (2048 * MIB, 1536 * MIB)
    assert (limits.effective_limit_bytes, limits.limit_source) == (1536 * MIB, "cgroup-v2")


def test_v2_ancestor_memory_max_binds(fake_host: FakeHost, fixture_text) -> None:
    _v2_host(fake_host, fixture_text)
    (fake_host.cgroup / "system.slice" / "memory.max").write_text(f"{1024 * MIB}\n")
    paths = find_cgroup(fake_host.proc, fake_host.cgroup)
    assert read_cgroup_limits(paths).limit_bytes == 1024 * MIB


def test_v2_root_cgroup_is_root(fake_host: FakeHost, fixture_text) -> None:
    fake_host.put("proc/self/cgroup", "0::/\n")
    fake_host.put("sys/fs/cgroup/cgroup.controllers", "memory pids\n")
    paths = find_cgroup(fake_host.proc, fake_host.cgroup)
    assert paths is not None and paths.visible and paths.is_root
    assert not owns_cgroup(paths, proc_root=fake_host.proc)


def test_hybrid_prefers_v1_memory_controller(fake_host: FakeHost, fixture_text) -> None:
    fake_host.put("proc/self/cgroup", fixture_text("proc_cgroup_hybrid.txt"))
    fake_host.put("sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n")
    relative = "process_api/344eb2d80feea31059265949019176cb"
    fake_host.put(f"sys/fs/cgroup/memory/{relative}/memory.limit_in_bytes", fixture_text("v1_limit_512mib.txt"))
    paths = find_cgroup(fake_host.proc, fake_host.cgroup)
    assert (paths.version, paths.directory) == (1, fake_host.cgroup / "memory" / relative)
    assert paths.pressure_file is None  # v1 has no per-cgroup PSI: the sampler uses /proc/pressure
    assert _read(fake_host).effective_limit_bytes == 512 * MIB


def test_hybrid_with_memory_on_unified(fake_host: FakeHost, fixture_text) -> None:
    _v2_host(fake_host, fixture_text, mount="sys/fs/cgroup/unified")
    fake_host.put("sys/fs/cgroup/unified/system.slice/antenna-worker.service/memory.max", "1073741824\n")
    paths = find_cgroup(fake_host.proc, fake_host.cgroup)
    assert (paths.version, paths.mount) == (2, fake_host.cgroup / "unified")
    assert paths.pressure_file == paths.directory / "memory.pressure"
    assert _read(fake_host).effective_limit_bytes == 1024 * MIB


def test_no_memory_controller_means_meminfo(fake_host: FakeHost) -> None:
    fake_host.put("proc/self/cgroup", "1:cpu:/\n")
    assert find_cgroup(fake_host.proc, fake_host.cgroup) is None
    assert _read(fake_host).limit_source == "meminfo"


def test_configured_max_wins_when_smallest(fake_host: FakeHost, fixture_text) -> None:
    _v1_host(fake_host, fixture_text, limit="v1_limit_512mib.txt")
    limits = _read(fake_host, configured_max_bytes=300 * MIB, soft_cap_fraction=0.5, hard_cap_fraction=0.9)
    assert (limits.effective_limit_bytes, limits.limit_source) == (300 * MIB, "AMI_MAX_MEMORY_BYTES")
    assert (limits.soft_cap_bytes, limits.hard_cap_bytes) == (150 * MIB, 270 * MIB)
    assert "300.0 MiB from AMI_MAX_MEMORY_BYTES" in limits.describe()
    assert "cgroup 512.0 MiB" in limits.describe()


@pytest.mark.parametrize(("soft", "hard"), [(0.0, 0.85), (0.9, 0.85), (0.85, 0.85), (0.7, 1.01)])
def test_bad_cap_fractions_name_the_settings(soft: float, hard: float) -> None:
    with pytest.raises(ValueError, match="AMI_WATCHDOG_SOFT_CAP_FRACTION < AMI_WATCHDOG_HARD_CAP_FRACTION"):
        Limits(mem_total_bytes=1024 * MIB, soft_cap_fraction=soft, hard_cap_fraction=hard)


def test_owns_cgroup_compares_members_with_the_tree(fake_host: FakeHost, fixture_text) -> None:
    directory = _v1_host(fake_host, fixture_text, limit="v1_limit_512mib.txt")
    for pid, ppid in ((100, 1), (101, 100), (102, 101), (200, 1)):
        fake_host.process(pid, ppid)
    paths = find_cgroup(fake_host.proc, fake_host.cgroup)
    (directory / "cgroup.procs").write_text("100\n101\n")
    (directory / "nested").mkdir()
    (directory / "nested" / "cgroup.procs").write_text("102\n")
    assert owns_cgroup(paths, root_pid=100, proc_root=fake_host.proc)
    (directory / "nested" / "cgroup.procs").write_text("102\n200\n")  # a stranger shares it
    assert not owns_cgroup(paths, root_pid=100, proc_root=fake_host.proc)
    (directory / "nested" / "cgroup.procs").write_text("")  # 102 is in the tree but outside
    assert not owns_cgroup(paths, root_pid=100, proc_root=fake_host.proc)


def test_this_machine() -> None:
    limits = read_limits()
    assert limits.mem_total_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    paths = find_cgroup()
    if paths is None:
        assert limits.limit_source == "meminfo"
        return
    members = (paths.procs_file).read_text().split()
    assert str(os.getpid()) in members, f"{paths.directory} should hold this process"
    expected = [v for v in (limits.mem_total_bytes, parse_limit_value(paths.limit_file.read_text())) if v]
    assert limits.effective_limit_bytes <= min(expected)


@pytest.mark.timeout(30)
def test_real_v1_cgroup_limit_seen_from_inside(memory_cgroup, python_child) -> None:
    cgroup_dir = memory_cgroup(512 * MIB)
    child = python_child()
    (cgroup_dir / "cgroup.procs").write_text(str(child.pid))
    answer = child.ask("limits")
    assert answer["effective_limit_bytes"] == 512 * MIB
    assert answer["limit_source"] == "cgroup-v1"
    assert answer["directory"] == str(cgroup_dir)
    assert answer["owns"] is True  # alone in its cgroup
    assert read_limits().effective_limit_bytes != 512 * MIB  # this process is not in it
    assert not owns_cgroup(find_cgroup(pid=child.pid), root_pid=os.getpid())
