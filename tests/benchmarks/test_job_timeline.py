"""benchmarks/job_timeline.py and what it reads: the job's start from the server's times, the
tree's peak split by process (real processes, real /proc readings), and the CPU the benchmark
process (server and meter) spent over the job."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from benchmarks.job_timeline import describe
from benchmarks.meter import TreeMemory, TreeMeterThread, process_role, read_tree_memory, split_by_role
from benchmarks.run import RunResult, TimedAntenna, cores, job_events
from tests.conftest import TOKEN
from worker.antenna import AntennaClient

MiB = 1024 * 1024


def test_job_events_name_the_probe_and_the_lanes_first_steps():
    started_s = 100.0
    reserves = [100.3, 101.3, 101.3, 101.7]  # the probe's, then two lanes', then a lane's next
    results = [(101.25, 3), (102.6, 16), (102.65, 16), (103.0, 16), (110.0, 1149)]
    events = job_events(started_s, reserves, results)
    assert round(events["probe_reserve"], 6) == 0.3
    assert round(events["lanes_first_reserve"], 6) == 1.3
    assert round(events["probe_result"], 6) == 1.25
    assert round(events["lanes_first_result"], 6) == 2.6
    assert round(events["half"], 6) == 10.0  # 51 results before the last post: half of 1,200 only with it
    assert round(events["last"], 6) == 10.0


def test_job_events_leave_out_steps_that_did_not_happen():
    assert job_events(None, [1.0], [(2.0, 3)]) == {}
    events = job_events(0.0, [0.3], [(1.2, 3)])  # a job the probe finished alone
    assert set(events) == {"probe_reserve", "probe_result", "half", "last"}


def test_split_by_role_sums_each_role_and_adds_the_shared_segments():
    reading = TreeMemory(0.0, 0, 90 * MiB, 0, {1: 500 * MiB, 2: 200 * MiB, 3: 100 * MiB, 4: 110 * MiB, 5: 1 * MiB})
    roles = {1: "main", 2: "fork server", 3: "loader worker", 4: "loader worker"}  # 5: never read
    assert split_by_role(reading, roles) == {"main": 500 * MiB, "fork server": 200 * MiB,
                                             "loader worker": 210 * MiB, "other": 1 * MiB, "shm": 90 * MiB}


CHILD = ("import sys\n"
         "block = bytearray(64 << 20)\n"
         "block[::4096] = b'x' * len(block[::4096])\n"  # every page touched
         "print('ready', flush=True)\n"
         "sys.stdin.readline()\n")
PARENT = ("import subprocess, sys\n"
          "child = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdout=subprocess.PIPE, text=True)\n"
          "child.stdout.readline()\n"
          "print(child.pid, flush=True)\n"
          "sys.stdin.readline()\n"
          "child.kill(); child.wait()\n")


def test_a_real_tree_is_read_per_process_and_its_peak_split_by_role():
    """The meter thread on a real parent whose child holds 64 MiB: the child's share is in the
    reading under its own pid, and the peak's split has the parent as main."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        meter = TreeMeterThread(parent.pid, interval_s=0.05).start()
        time.sleep(0.5)
        meter.stop()
        reading = read_tree_memory(parent.pid)
        assert reading.non_shm_by_pid[child_pid] >= 64 * MiB
        assert sum(reading.non_shm_by_pid.values()) + reading.shm_bytes == reading.total_bytes
        assert process_role(parent.pid, parent.pid) == "main"
        assert meter.roles[parent.pid] == "main" and child_pid in meter.roles
        split = meter.peak_by_role()
        assert split["main"] > 0 and sum(split.values()) == max(m.total_bytes for m in meter.history)
        assert split.get("other", 0) >= 64 * MiB  # the child: neither fork server nor loader worker
        # its own CPU, reading by reading: all of it, or the part inside a window
        assert len(meter.costs) >= len(meter.history) >= 5 and meter.cpu_s() > 0
        middle_s = meter.costs[len(meter.costs) // 2][0]
        assert 0 < meter.cpu_s(middle_s) < meter.cpu_s()
        assert meter.cpu_s(middle_s) + meter.cpu_s(until_s=middle_s) == pytest.approx(
            meter.cpu_s() + meter.costs[len(meter.costs) // 2][1])  # the middle reading is in both
    finally:
        parent.stdin.write("\n")
        parent.stdin.close()
        parent.wait(60)
        parent.stdout.close()


def test_a_gone_process_has_the_role_gone():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert process_role(process.pid, os.getpid()) == "gone"


def test_describe_prints_the_start_beyond_steady_and_the_peak_beside_the_plan():
    result = RunResult("null-small-far", "timeline", "autotune", 0, 1200, 1200, 0, 0, 16.0, 75.0, 94.0,
                       1340 * MiB, 1340 * MiB, {}, 8 << 30, plan="w2 b16 r64 p2 t64 i2",
                       predicted_peak_bytes=1374 * MiB, predicted_bound_bytes=1770 * MiB,
                       first_to_last_images_per_s=80.0, predicted_images_per_s=80.8, bottleneck="cpu-bound",
                       events_s={"probe_reserve": 0.3, "probe_result": 1.25, "lanes_first_reserve": 1.32,
                                 "lanes_first_result": 2.61, "half": 9.0, "last": 16.0},
                       peak_by_role_bytes={"main": 560 * MiB, "shm": 300 * MiB},
                       plan_memory_bytes={"baseline_bytes": 900 * MiB, "pinned_bytes": 0, "total_bytes": 1374 * MiB})
    text = "\n".join(describe(result))
    assert "next results 2.61" in text and "probe results 1.25" in text
    # 1,200 tasks at 94 images/s take 12.77 s: 3.23 s of the 16 s job are the start and the tail
    assert "beyond steady: 3.23 s of 16.00" in text
    assert "peak 1340 MiB: main 560, shm 300" in text
    assert "plan 1374 MiB (bound 1770): baseline 900" in text and "pinned" not in text
    assert "harness" not in text  # not recorded
    text = "\n".join(describe(replace(result, harness_cpu_s=3.6, meter_cpu_s=1.2)))
    # 3.6 core-s over 1,200 images and a 16 s job on this host's cores
    assert (f"harness (this process: local server and meter) 3.00 ms per image, the meter 1.00 of them: "
            f"{3.6 / (16.0 * cores()):.1%} of the {cores()} cores over the job") in text


def test_the_server_measures_its_process_cpu_from_the_first_listing_to_the_last_result(tiny_images):
    """A real TimedAntenna on loopback: the job window opens at the first listing, closes at the
    last accepted result, and its CPU counts what the process spent between them."""
    with TimedAntenna(token=TOKEN) as server:
        job_id = server.add_job(tiny_images[:4], "null")
        assert server.job_cpu_s() == 0.0 and server.job_window_s()[0] > server.job_window_s()[1]
        client = AntennaClient(server.base_url, TOKEN, timeout_s=10.0)
        client.list_jobs(["null"])
        tasks = client.reserve_tasks(job_id, 4, {})
        busy_until_s = time.process_time() + 0.2
        while time.process_time() < busy_until_s:  # CPU this process spends inside the window
            pass
        client.post_results(job_id, [{"reply_subject": task.reply_subject,
                                      "result": {"error": "e", "image_id": task.image_id}} for task in tasks])
        opened_s, closed_s = server.job_window_s()
        assert opened_s < closed_s and server.job_cpu_s() >= 0.2
