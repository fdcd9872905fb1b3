"""``worker run --processes N``: the plan (devices, memory shares, child environments) with fixture
values, then one real fleet of 3 worker processes against the local server.

The fleet test runs the real CLI as a subprocess and follows one parent through its life: one
metrics endpoint showing the 3 children, a job done with 0 lost under the host budget (the
process tree sampled by the project's own sampler), a SIGKILLed child restarted while the tasks it
held are redelivered, and a SIGTERM mid-job that drains every child and exits 0.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, worker_env
from tests.worker.middleware.test_systemd import notify_socket  # noqa: F401 (a fixture)
from tests.worker.worker_process import WorkerProcess
from watchdog.sampler import Sampler
from worker.fleet import ChildSpec, child_environ, memory_share_bytes, plan_children, visible_cuda_devices

GiB = 1024**3
MiB = 1024**2
HOST_BUDGET_BYTES = 6 * GiB
CHILDREN = 3


# --- the plan, with fixture values


def test_visible_devices_come_from_cuda_visible_devices_first_then_the_driver(tmp_path):
    gpus = tmp_path / "gpus"
    for bus in ("0000:17:00.0", "0000:65:00.0"):
        (gpus / bus).mkdir(parents=True)
    assert visible_cuda_devices({}, gpus) == ["0", "1"]
    assert visible_cuda_devices({"CUDA_VISIBLE_DEVICES": "2,3"}, gpus) == ["2", "3"]
    assert visible_cuda_devices({"CUDA_VISIBLE_DEVICES": "GPU-5f1c,1,-1,4"}, gpus) == ["GPU-5f1c", "1"]
    assert visible_cuda_devices({"CUDA_VISIBLE_DEVICES": ""}, gpus) == []
    assert visible_cuda_devices({}, tmp_path / "no-driver") == []


def test_the_reserve_comes_off_once_then_the_safety_factor_then_the_split():
    assert memory_share_bytes(9 * GiB, 1 * GiB, 0.75, 3) == 2 * GiB
    with pytest.raises(ValueError, match="AMI_WORKER_PROCESSES"):
        memory_share_bytes(2 * GiB, 1 * GiB, 0.85, 16)


def test_each_child_gets_its_own_device_round_robin_and_its_share():
    specs = plan_children(3, ["0", "1"], 2 * GiB)
    assert [s.cuda_device for s in specs] == ["0", "1", "0"]
    assert plan_children(2, [], GiB) == [ChildSpec(0, None, GiB), ChildSpec(1, None, GiB)]


def test_children_sharing_a_gpu_split_its_memory_fraction():
    """More processes than GPUs: each child's torch would otherwise plan its batches for, and
    allocate up to, the whole card it shares."""
    specs = plan_children(3, ["0", "1"], 2 * GiB, gpu_memory_fraction=0.9)
    assert [(s.cuda_device, s.gpu_memory_fraction) for s in specs] == [("0", 0.45), ("1", None), ("0", 0.45)]
    env = child_environ({"AMI_GPU_MEMORY_FRACTION": "0.9"}, specs[0], None)
    assert env["AMI_GPU_MEMORY_FRACTION"] == "0.45"
    assert child_environ({"AMI_GPU_MEMORY_FRACTION": "0.9"}, specs[1], None)["AMI_GPU_MEMORY_FRACTION"] == "0.9"
    assert all(s.gpu_memory_fraction is None for s in plan_children(2, ["0", "1"], GiB))
    assert [s.gpu_memory_fraction for s in plan_children(4, ["7"], GiB)] == [0.25] * 4


def test_a_child_plans_against_its_share_and_never_talks_to_systemd():
    base = {"AMI_MAX_MEMORY_BYTES": str(8 * GiB), "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000",
            "CUDA_VISIBLE_DEVICES": "0,1", "PATH": "/usr/bin"}
    env = child_environ(base, ChildSpec(1, "1", 2 * GiB), "/tmp/metrics")
    assert env["AMI_MAX_MEMORY_BYTES"] == str(2 * GiB) and env["AMI_MEMORY_RESERVE_BYTES"] == "0"
    assert env["AMI_MEMORY_SAFETY_FACTOR"] == "1.0" and env["AMI_WORKER_PROCESSES"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/metrics"
    assert "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env and env["PATH"] == "/usr/bin"


# --- one real fleet


def _records(fleet: WorkerProcess) -> list[dict]:
    records = []
    for line in fleet.output.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # two processes' lines can interleave on the shared pipe
    return records


def _child_pids(fleet: WorkerProcess) -> dict[int, int]:
    """Child index -> its latest pid, from the parent's 'started' lines."""
    pids = {}
    for record in _records(fleet):
        if match := re.search(r"child (\d+) started: pid (\d+)", record["message"]):
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def _scrape(port: int) -> dict[str, list]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _state_pids(port: int) -> set[int]:
    """Pids with a series of antenna_worker_state: one per live child."""
    return {int(s.labels["pid"]) for s in _scrape(port).get("antenna_worker_state", [])}


def _wait(condition, timeout_s: float, what: str, fleet: WorkerProcess, poll_s: float = 0.1):
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if value := condition():
            return value
        assert fleet.proc.poll() is None, f"the fleet exited {fleet.proc.poll()}:\n{fleet.output[-4000:]}"
        time.sleep(poll_s)
    raise AssertionError(f"{what} not within {timeout_s} s; output tail:\n{fleet.output[-4000:]}")


def _posted_task_ids(antenna, job_id: int) -> set[str]:
    """Task ids with a result POST so far (the local server's subjects carry the task's sequence
    number as their 6th token, and its task ids are ``<job>-<seq>``)."""
    posted = set()
    for body in list(antenna.result_posts):
        for item in body.get("results", []):
            tokens = item["reply_subject"].split(".")
            if tokens[2] == f"job_{job_id}":
                posted.add(f"{job_id}-{tokens[5]}")
    return posted


def _promtool_accepts(text: str) -> None:
    """``promtool check metrics`` on the merged scrape, where promtool is installed."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _reserved_by(antenna, job_id: int) -> dict[int, set[str]]:
    """pid -> task ids it reserved in ``job_id``, from the server's per-reservation client_info."""
    by_pid: dict[int, set[str]] = {}
    for reservation in list(antenna.reservations):
        if reservation["job_id"] == job_id and reservation["task_ids"]:
            pid = int(reservation["client_info"]["pid"])
            by_pid.setdefault(pid, set()).update(reservation["task_ids"])
    return by_pid


@pytest.mark.timeout(600)
def test_three_processes_share_one_endpoint_restart_a_killed_child_and_drain_on_sigterm(
        antenna_factory, tiny_images, tmp_path):
    antenna = antenna_factory(reservation_timeout_s=6.0, max_deliveries=3)
    env = worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES="null", AMI_METRICS_ADDR="127.0.0.1:0",
                     AMI_AUTOTUNE="false", AMI_MAX_MEMORY_BYTES=str(HOST_BUDGET_BYTES), AMI_LOG_FORMAT="json",
                     AMI_ANTENNA_API_BATCH_SIZE="2", AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="1",
                     AMI_SHUTDOWN_GRACE_S="60")
    fleet = WorkerProcess(["run", "--processes", str(CHILDREN)], env, tmp_path)
    sampler = None
    try:
        port = int(fleet.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", 60).group(1))
        first = _wait(lambda: len(_child_pids(fleet)) == CHILDREN and _child_pids(fleet), 60, "3 children", fleet)
        # One endpoint, served by the parent, shows every child by its pid once each has started.
        _wait(lambda: _state_pids(port) == set(first.values()), 240, "3 children on the endpoint", fleet, 1.0)
        running = {s.labels["state"]: s.value for s in _scrape(port)["antenna_worker_fleet_processes"]}
        assert running == {"running": CHILDREN, "restarting": 0}
        _promtool_accepts(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        share_mib = (HOST_BUDGET_BYTES - GiB) * 0.85 / CHILDREN / MiB
        limits = [r for r in _records(fleet) if f"limit {share_mib:.1f} MiB from AMI_MAX_MEMORY_BYTES" in r["message"]]
        assert {r["pid"] for r in limits} == set(first.values())

        sampler = Sampler(fleet.proc.pid, interval_s=0.2)
        sampler.start()
        antenna.set_network(latency_s=0.4)  # each child holds its tasks long enough to be caught holding them
        job = antenna.add_job(tiny_images[:30], "null")
        victim_pid = _wait(lambda: next(iter(_reserved_by(antenna, job)), None), 120, "a first reservation", fleet, 0.02)
        os.kill(victim_pid, signal.SIGKILL)
        held = _reserved_by(antenna, job)[victim_pid] - _posted_task_ids(antenna, job)
        antenna.set_network(latency_s=0.05)

        fleet.wait_for(rf"pid {victim_pid}\) exited on signal SIGKILL .*restarting in", 30)
        _wait(lambda: victim_pid not in _child_pids(fleet).values(), 60, "a restarted child", fleet)
        _wait(lambda: antenna.report(job).complete, 240, "job 1 complete", fleet, 0.5)
        report = antenna.report(job)
        assert report.lost == 0 and report.results_ok == 30, report
        taken_over = set().union(*(t for pid, t in _reserved_by(antenna, job).items() if pid != victim_pid))
        assert held <= taken_over, f"tasks {sorted(held - taken_over)} of the killed child were not redelivered"
        assert report.redeliveries >= len(held) > 0
        # The dead child's gauges are gone from the endpoint; the restarted one's appear.
        _wait(lambda: _state_pids(port) == set(_child_pids(fleet).values()), 240, "the restarted child on the endpoint",
              fleet, 1.0)
        peak_bytes = sampler.peak_used_bytes
        assert 0 < peak_bytes < HOST_BUDGET_BYTES, f"combined peak {peak_bytes / MiB:.0f} MiB"

        antenna.set_network(latency_s=0.3)
        job2 = antenna.add_job(tiny_images, "null")
        _wait(lambda: _reserved_by(antenna, job2), 60, "job 2 reserving", fleet, 0.05)
        children = set(_child_pids(fleet).values())
        fleet.send(signal.SIGTERM)
        assert fleet.wait(timeout_s=120) == 0, fleet.output[-4000:]
        drained = {r["pid"] for r in _records(fleet) if r["message"].startswith("shutdown complete")}
        assert children <= drained, f"children {children - drained} did not drain"
        report2 = antenna.report(job2)
        # Every task a child reserved got its result before the exit: nothing left held or stranded.
        assert report2.reserved == 0 and report2.awaiting_redelivery == 0 and report2.lost == 0, report2
        assert report2.results_ok > 0
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
        print(f"fleet: combined peak {peak_bytes / MiB:.0f} MiB of a {HOST_BUDGET_BYTES / MiB:.0f} MiB budget; "
              f"held by the killed child {len(held)}, redeliveries {report.redeliveries}; "
              f"job 2 drained with {report2.results_ok} of {report2.tasks} done")
    finally:
        if sampler is not None:
            sampler.stop()
        fleet.kill()


@pytest.mark.timeout(300)
def test_a_child_with_a_bad_setting_stops_the_fleet_with_exit_2_and_the_parent_speaks_to_systemd(
        antenna, tmp_path, notify_socket):
    # The parent loads no pipeline, so an unknown one fails in the children only (exit 2 each).
    env = worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES="no-such-pipeline", AMI_METRICS_ADDR="127.0.0.1:0",
                     AMI_AUTOTUNE="false", AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="0",
                     NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="2000000")
    fleet = WorkerProcess(["run", "--processes", "2"], env, tmp_path)
    try:
        notify_socket.receive_until("READY=1", 60)
        ready_s = time.monotonic()
        notify_socket.receive_until("STOPPING=1", 240)
        stopping_s = time.monotonic()
        assert fleet.wait(timeout_s=120) == 2, fleet.output[-4000:]
    finally:
        fleet.kill()
    assert "exited 2 (a bad setting): stopping every child" in fleet.output
    assert "restarting in" not in fleet.output
    assert "AMI_ANTENNA_PIPELINES" in fleet.output
    # Only the parent speaks (children never see NOTIFY_SOCKET), pinging every half WATCHDOG_USEC.
    pings = sum(1 for _, message in notify_socket.messages if "WATCHDOG=1" in message.split("\n"))
    assert 1 <= pings <= (stopping_s - ready_s) / 1.0 + 2, (pings, stopping_s - ready_s)


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.timeout(300)
def test_one_child_per_visible_device_by_default_each_pinned_both_restarted_after_dying_together_and_sigusr1(
        antenna, tmp_path):
    # Two visible devices and no --processes: two children, one device each. This host has no GPU,
    # so each child's torch falls back to the CPU; the pinning is read from the children's environ.
    env = worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES="null", AMI_METRICS_ADDR="127.0.0.1:0",
                     AMI_AUTOTUNE="false", AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="0", AMI_LOG_FORMAT="json",
                     AMI_MAX_MEMORY_BYTES=str(4 * GiB), CUDA_VISIBLE_DEVICES="0,1")
    fleet = WorkerProcess(["run"], env, tmp_path)
    try:
        port = int(fleet.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", 60).group(1))
        pids = _wait(lambda: len(_child_pids(fleet)) == 2 and _child_pids(fleet), 60, "2 children", fleet)
        pinned = {index: _environ_of(pid) for index, pid in pids.items()}
        assert {i: e["CUDA_VISIBLE_DEVICES"] for i, e in pinned.items()} == {0: "0", 1: "1"}
        assert {e["AMI_MAX_MEMORY_BYTES"] for e in pinned.values()} == {str(int(3 * GiB * 0.85 / 2))}
        _wait(lambda: _state_pids(port) == set(pids.values()), 240, "2 children on the endpoint", fleet, 1.0)
        for pid in pids.values():  # both die between two of the parent's polls: both restart
            os.kill(pid, signal.SIGKILL)
        restarted = _wait(lambda: not set(_child_pids(fleet).values()) & set(pids.values()) and _child_pids(fleet),
                          60, "both children restarted", fleet)
        _wait(lambda: _state_pids(port) == set(restarted.values()), 240, "the new children on the endpoint", fleet, 1.0)
        restarts_before_usr1 = fleet.output.count("restarting in")
        fleet.send(signal.SIGUSR1)
        assert fleet.wait(timeout_s=120) == 0, fleet.output[-4000:]
    finally:
        fleet.kill()
    assert restarts_before_usr1 == 2 and fleet.output.count("restarting in") == 2
    assert sum(1 for r in _records(fleet) if r["message"].startswith("shutdown complete")) == 2


# --- stops and exit codes (each reproduced against the code before: see the commit)


def _tree(pid: int) -> list[int]:
    """``pid`` and every descendant."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _fleet_env(antenna, tmp_path, **extra: str) -> dict[str, str]:
    return worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES="null", AMI_AUTOTUNE="false", AMI_LOG_FORMAT="json",
                      AMI_MAX_MEMORY_BYTES=str(4 * GiB), AMI_ANTENNA_API_BATCH_SIZE="2",
                      AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="1", AMI_SHUTDOWN_GRACE_S="60", **extra)


@pytest.mark.timeout(300)
def test_a_sigterm_to_every_process_at_once_drains_the_children(antenna_factory, tiny_images, tmp_path):
    """``scancel`` or a cgroup-wide SIGTERM reaches each child twice, directly and forwarded by the
    parent. Before, a child took the second as "force" and left what it held for redelivery (8
    tasks in the review's run), while the parent still exited 0."""
    antenna = antenna_factory(reservation_timeout_s=600)
    fleet = WorkerProcess(["run", "--processes", "2"], _fleet_env(antenna, tmp_path), tmp_path)
    try:
        _wait(lambda: len(_child_pids(fleet)) == 2, 60, "2 children", fleet)
        fleet.wait_for(r"loaded pipeline null", 120)
        antenna.set_network(latency_s=0.5)  # each child holds its tasks for a while
        job = antenna.add_job(tiny_images[:40], "null")
        _wait(lambda: len(_reserved_by(antenna, job)) == 2, 180, "both children reserving", fleet, 0.05)
        for pid in _tree(fleet.proc.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        assert fleet.wait(timeout_s=180) == 0, fleet.output[-4000:]
        report = antenna.report(job)
        assert report.reserved == 0 and report.awaiting_redelivery == 0 and report.lost == 0, report
        assert not [r for r in _records(fleet) if "the children force" in r["message"]]
    finally:
        fleet.kill()


@pytest.mark.timeout(300)
def test_a_child_killed_while_the_fleet_drains_makes_the_exit_1(antenna_factory, tiny_images, tmp_path):
    """Before: "child 0 exited -9", then "stopped (exit 0)", with its tasks left held."""
    antenna = antenna_factory(reservation_timeout_s=600)
    fleet = WorkerProcess(["run", "--processes", "2"], _fleet_env(antenna, tmp_path), tmp_path)
    try:
        pids = _wait(lambda: len(_child_pids(fleet)) == 2 and _child_pids(fleet), 60, "2 children", fleet)
        antenna.set_network(latency_s=0.5)
        job = antenna.add_job(tiny_images[:40], "null")
        _wait(lambda: _reserved_by(antenna, job), 180, "a reservation", fleet, 0.05)
        fleet.send(signal.SIGTERM)
        fleet.wait_for(r"draining 2 children", 30)
        os.kill(pids[0], signal.SIGKILL)
        assert fleet.wait(timeout_s=180) == 1, fleet.output[-4000:]
        assert [r for r in _records(fleet) if f"pid {pids[0]}) exited on signal SIGKILL" in r["message"]]
    finally:
        fleet.kill()


@pytest.mark.timeout(300)
def test_a_burst_fleet_whose_token_is_rejected_exits_3_like_one_worker(antenna, tmp_path):
    """Before: each child exited 3 and was restarted, with backoff, for ever."""
    env = _fleet_env(antenna, tmp_path, AMI_ANTENNA_API_AUTH_TOKEN="wrong-token")
    fleet = WorkerProcess(["run", "--burst", "--processes", "2"], env, tmp_path)
    try:
        assert fleet.wait(timeout_s=240) == 3, fleet.output[-4000:]
        assert "restarting in" not in fleet.output
    finally:
        fleet.kill()


STUBBORN_FLEET = """
import os, sys
from worker.fleet import Fleet, plan_children
from worker.settings import load_settings
settings = load_settings(env_file=None, metrics_addr="", shutdown_grace_s=600.0)
child = [sys.executable, "-c", "import signal, time\\n"
         "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2): signal.signal(s, signal.SIG_IGN)\\n"
         "print('ignoring', flush=True)\\n"
         "time.sleep(600)"]
fleet = Fleet(settings, plan_children(2, [], 1 << 30), child, environ=dict(os.environ))
fleet.install_signal_handlers()
sys.exit(fleet.run())
"""


@pytest.mark.timeout(180)
def test_a_storm_of_signals_never_deadlocks_the_parent(tmp_path):
    """The parent's handler set a threading.Event, whose lock the interrupted loop may hold in its
    own wait() or clear(): a hang (6 runs in 10 in the review). Now the handler only records. Two
    children that ignore every signal; 2,000 SIGTERMs; the children SIGKILLed; the parent must
    reap them and exit at once, in each of 3 runs."""
    for run in range(3):
        parent = subprocess.Popen([sys.executable, "-c", STUBBORN_FLEET], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        try:
            assert parent.stdout is not None
            for _ in range(2):  # both children started and ignoring
                assert parent.stdout.readline().strip() == "ignoring"
            for _ in range(2000):
                os.kill(parent.pid, signal.SIGTERM)
            for pid in _tree(parent.pid)[1:]:
                os.kill(pid, signal.SIGKILL)
            assert parent.wait(timeout=20) == 1  # the children did not exit by themselves
        finally:
            parent.kill()
            parent.wait()
            parent.stdout.close()


def test_a_metrics_folder_left_by_a_killed_parent_is_removed_by_the_next_one(tmp_path):
    """A SIGKILLed or OOM-killed parent cannot remove its multiprocess metrics folder; the next
    parent removes those whose parent is gone, and leaves a live parent's alone."""
    from worker.fleet import make_metrics_dir, remove_stale_metrics_dirs

    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process
    stale = tmp_path / f"antenna-worker-metrics-{gone.pid}-x1y2"
    stale.mkdir()
    (stale / "counter_123.db").write_bytes(b"\0" * 4096)
    live = Path(make_metrics_dir(root=str(tmp_path)))  # this process's own
    unrelated = tmp_path / "antenna-worker-metrics-notapid"
    unrelated.mkdir()

    assert remove_stale_metrics_dirs(root=str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.is_dir() and unrelated.is_dir()
    assert live.name.startswith(f"antenna-worker-metrics-{os.getpid()}-")
