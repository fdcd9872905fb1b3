"""benchmarks/meter.py's walk gate, on a real process tree in a real memory cgroup: a sample walks
the page tables only when the cgroup's charge moved or a process came or went, and every reading
stays within the gate of a full walk taken at the same moment."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from benchmarks.meter import WALK_GATE_BYTES, TreeMeterThread, needs_walk, read_tree_memory, TreeMemory
from benchmarks.run import MemoryCgroup

MiB = 1024 * 1024

# Reads commands on stdin: "grow N" touches N MiB more, "swap N" frees all that and fills an
# N MiB /dev/shm segment it holds open (as torch's are: unlinked), "fork" starts a child that
# sleeps, "end" exits; answers each with a line once done.
HOLDER = (
    "import os, subprocess, sys\n"
    "held, children, segments = [], [], []\n"
    "print('ready', flush=True)\n"
    "for line in sys.stdin:\n"
    "    command, *args = line.split()\n"
    "    if command == 'grow':\n"
    "        held.append(bytearray(int(args[0]) * 1024 * 1024))\n"
    "    elif command == 'swap':\n"
    "        held.clear()\n"
    "        path = f'/dev/shm/meter-test-{os.getpid()}-{len(segments)}'\n"
    "        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)\n"
    "        os.unlink(path)\n"
    "        for _ in range(int(args[0])):\n"
    "            os.write(fd, b'x' * 1024 * 1024)\n"
    "        segments.append(fd)\n"
    "    elif command == 'fork':\n"
    "        children.append(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']))\n"
    "    elif command == 'end':\n"
    "        break\n"
    "    print('done', flush=True)\n"
    "for child in children:\n"
    "    child.kill(); child.wait()\n"
)


def test_needs_walk_at_the_first_sample_on_a_new_process_a_moved_charge_or_an_old_walk():
    walked = TreeMemory(100.0, 10 * MiB, 0, 10 * MiB, {1: 6 * MiB, 2: 4 * MiB})
    assert needs_walk(None, None, {1, 2}, 50 * MiB, 100.5)
    assert not needs_walk(walked, 50 * MiB, {1, 2}, 50 * MiB + WALK_GATE_BYTES - 1, 100.5)
    assert needs_walk(walked, 50 * MiB, {1, 2}, 50 * MiB + WALK_GATE_BYTES, 100.5)
    assert needs_walk(walked, 50 * MiB, {1, 2}, 50 * MiB - WALK_GATE_BYTES, 100.5)  # freed: also a move
    assert needs_walk(walked, 50 * MiB, {1, 2, 3}, 50 * MiB, 100.5)  # a process came
    assert needs_walk(walked, 50 * MiB, {1}, 50 * MiB, 100.5)  # or went
    assert needs_walk(walked, 50 * MiB, {1, 2}, 50 * MiB, 105.0)  # too long since the last walk
    assert needs_walk(walked, 50 * MiB, {1, 2}, None, 100.5)  # no charge to go by


@pytest.mark.skipif(not MemoryCgroup.available(), reason="needs root and the cgroup v1 memory controller")
@pytest.mark.timeout(120)
def test_a_gated_meter_walks_only_when_the_charge_moves_and_reads_what_a_walk_reads():
    cgroup = MemoryCgroup(2 * 1024 * MiB)
    holder = subprocess.Popen(cgroup.join_command([sys.executable, "-c", HOLDER]), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    meter = None

    def ask(command: str) -> None:
        holder.stdin.write(command + "\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "done"

    def settled() -> tuple[TreeMemory, TreeMemory]:
        """The meter's next sample, and a full walk right after it."""
        count = len(meter.history)
        deadline_s = time.monotonic() + 10
        while len(meter.history) < count + 2 and time.monotonic() < deadline_s:
            time.sleep(0.01)
        return meter.history[-1], read_tree_memory(holder.pid)

    try:
        assert holder.stdout.readline().strip() == "ready"
        meter = TreeMeterThread(holder.pid, interval_s=0.05, cgroup_dir=cgroup.path).start()
        time.sleep(1.5)
        idle = list(meter.history)
        assert len(idle) >= 10
        assert sum(reading.walked for reading in idle) <= 2  # the first sample, and perhaps one the start moved

        ask("grow 64")  # the charge moves 64 MiB: the next sample walks and sees it
        gated, walked = settled()
        assert abs(gated.total_bytes - walked.total_bytes) < WALK_GATE_BYTES
        assert gated.total_bytes >= idle[-1].total_bytes + 60 * MiB

        walks = meter.walks
        ask("grow 1")  # under the gate: no walk needed, and the reading is off by less than it
        gated, walked = settled()
        assert meter.walks == walks
        assert abs(gated.total_bytes - walked.total_bytes) < WALK_GATE_BYTES

        walks = meter.walks
        # 65 MiB freed as 64 MiB of shmem fill: the whole charge hardly moves, the non-shm part does,
        # so the next sample walks rather than add the new segment to the old non-shm figure
        ask("swap 64")
        gated, walked = settled()
        assert meter.walks > walks
        assert abs(gated.total_bytes - walked.total_bytes) < WALK_GATE_BYTES
        assert walked.shm_bytes == 64 * MiB

        ask("fork")  # a new process: the next sample walks and reads it
        deadline_s = time.monotonic() + 10
        while len(meter.history[-1].non_shm_by_pid) < 2 and time.monotonic() < deadline_s:
            time.sleep(0.01)
        assert len(meter.history[-1].non_shm_by_pid) == 2 and meter.history[-1].walked
    finally:
        if meter is not None:
            meter.stop()
        holder.stdin.write("end\n")
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
        cgroup.remove()


def test_without_a_cgroup_every_sample_walks():
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        meter = TreeMeterThread(holder.pid, interval_s=0.05).start()
        time.sleep(0.5)
        meter.stop()
        assert len(meter.history) >= 5 and meter.walks == len(meter.history)
    finally:
        holder.stdin.write("end\n")
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
