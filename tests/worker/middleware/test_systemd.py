"""Running as a service: sd_notify over a real unix datagram socket, the FD limit, the unit files."""
from __future__ import annotations

import configparser
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, worker_env
from tests.worker.worker_process import WorkerProcess, worker_command
from worker.middleware.systemd import Notifier, keepalive_interval_s

UNIT = ROOT / "systemd" / "antenna-worker.service"
SUPERVISOR = ROOT / "systemd" / "supervisor" / "antenna-worker.conf"


class NotifySocket:
    """A bound unix datagram socket, as systemd's NOTIFY_SOCKET (short path: sun_path is 108 bytes)."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
        self.path = os.path.join(self.directory, "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.messages: list[tuple[float, str]] = []

    def receive_until(self, line: str, timeout_s: float) -> list[str]:
        """Collect datagrams until one has ``line`` among its lines; returns that datagram's lines."""
        deadline_s = time.monotonic() + timeout_s
        while True:
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                raise AssertionError(f"no {line!r} within {timeout_s} s; got {[m for _, m in self.messages]}")
            self.socket.settimeout(remaining_s)
            try:
                data = self.socket.recv(4096).decode()
            except socket.timeout:
                continue
            self.messages.append((time.monotonic(), data))
            if line in data.split("\n"):
                return data.split("\n")

    def close(self) -> None:
        self.socket.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def notify_socket():
    sock = NotifySocket()
    yield sock
    sock.close()


@pytest.mark.timeout(120)
def test_worker_run_sends_ready_watchdog_pings_status_and_stopping(antenna, tiny_images, tmp_path, notify_socket):
    job_id = antenna.add_job(tiny_images[:4], "synthetic-moths")
    env = worker_env(antenna, tmp_path, NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="400000",
                     AMI_AUTOTUNE="false", AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="0")
    worker = WorkerProcess(["run"], env, tmp_path)
    try:
        ready = notify_socket.receive_until("READY=1", 60)
        assert f"MAINPID={worker.proc.pid}" in ready
        assert any(line.startswith("STATUS=polling http://127.0.0.1:") for line in ready)
        notify_socket.receive_until(f"STATUS=job {job_id}: done, 4 images", 60)
        pings_from_s = time.monotonic()
        for _ in range(4):
            notify_socket.receive_until("WATCHDOG=1", 5)
        pings = [t for t, m in notify_socket.messages if m == "WATCHDOG=1" and t >= pings_from_s]
        # WATCHDOG_USEC=0.4 s: a ping every 0.2 s (+ up to one 0.1 s flag poll).
        assert len(pings) == 4 and (pings[-1] - pings[0]) / 3 < 0.35
        sent_s = worker.send(signal.SIGTERM)
        stopping = notify_socket.receive_until("STOPPING=1", 10)
        assert time.monotonic() - sent_s < 1.0
        assert any(line.startswith("STATUS=draining") for line in stopping)
        assert worker.wait(60) == 0, worker.output[-3000:]
    finally:
        worker.kill()
    assert "systemd notified READY=1; watchdog ping every 0.2 s" in worker.output
    assert antenna.report(job_id).complete


@pytest.mark.timeout(60)
def test_watchdog_interval_honours_watchdog_pid():
    assert keepalive_interval_s({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert keepalive_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert keepalive_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert keepalive_interval_s({"WATCHDOG_USEC": "0"}, 42) is None
    assert keepalive_interval_s({}, 42) is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": "relative/path"}) is None


@pytest.mark.timeout(60)
def test_notifier_reaches_an_abstract_socket():
    name = f"antenna-worker-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(5)
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
    try:
        assert notifier is not None and notifier.send("READY=1", "STATUS=x")
        assert receiver.recv(100) == b"READY=1\nSTATUS=x"
    finally:
        notifier.close()
        receiver.close()


def _limit_fds(soft: int, hard: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return apply


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hard,warns", [(8192, False), (2048, True)])
def test_worker_raises_its_soft_fd_limit_to_the_hard_limit(antenna, tmp_path, hard, warns):
    env = worker_env(antenna, tmp_path, AMI_AUTOTUNE="false")
    done = subprocess.run(worker_command("run", "--burst"), env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=100, preexec_fn=_limit_fds(256, hard))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-2000:]
    assert f"open-files soft limit raised from 256 to {hard} (hard limit)" in output
    assert ("open-files hard limit is 2048, below 4096" in output) == warns


@pytest.mark.timeout(60)
def test_fd_limit_is_measured_in_the_child():
    """The log line is backed by the limit the process really has afterwards."""
    code = "from worker.middleware.systemd import raise_fd_limit; import resource; raise_fd_limit(); " \
           "print(*resource.getrlimit(resource.RLIMIT_NOFILE))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50,
                          preexec_fn=_limit_fds(300, 5000))
    assert done.stdout.split() == ["5000", "5000"], done.stderr


def _unit_values(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", text, flags=re.M))


@pytest.mark.timeout(60)
def test_systemd_analyze_verify_passes_on_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    script = Path(sys.executable).with_name("worker")
    assert script.exists(), "the worker console script is not installed next to this interpreter"
    text = UNIT.read_text().replace("/opt/antenna-worker/venv/bin/worker", str(script))
    assert str(script) in text
    unit = tmp_path / "antenna-worker.service"
    unit.write_text(text)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=50)
    # verify exits 0 on settings it merely ignores (e.g. an unknown Type=); any line naming our file is a defect.
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


@pytest.mark.timeout(30)
def test_unit_and_supervisor_stop_timeouts_cover_the_drain_grace():
    unit = _unit_values(UNIT.read_text())
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main" and unit["KillSignal"] == "SIGTERM"
    assert unit["KillMode"] == "mixed" and unit["Restart"] == "on-failure" and unit["LimitNOFILE"] == "65536"
    assert unit["EnvironmentFile"] == "/etc/antenna-worker.env"
    assert unit["ExecStart"].endswith("/bin/worker run")
    assert re.search(r"^#MemoryHigh=\S+", UNIT.read_text(), re.M) and re.search(r"^#MemoryMax=\S+", UNIT.read_text(), re.M)
    grace_s = float(dict(re.findall(r"^Environment=(\w+)=(.*)$", UNIT.read_text(), re.M))["AMI_SHUTDOWN_GRACE_S"])
    assert grace_s + 15 <= float(unit["TimeoutStopSec"]) <= grace_s + 60
    assert float(unit["WatchdogSec"]) >= 10

    parser = configparser.ConfigParser(inline_comment_prefixes=(";",))
    parser.read(SUPERVISOR)
    program = parser["program:antenna-worker"]
    assert program["stopsignal"] == "TERM" and program["autorestart"] == "true"
    assert program["stopasgroup"] == "false" and program["killasgroup"] == "true"
    supervisor_grace_s = float(re.search(r'AMI_SHUTDOWN_GRACE_S="(\d+)"', program["environment"]).group(1))
    assert supervisor_grace_s + 15 <= float(program["stopwaitsecs"]) <= supervisor_grace_s + 60
    assert "minfds=65536" in SUPERVISOR.read_text()
