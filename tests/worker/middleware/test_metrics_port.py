"""The metrics port of independently started workers: a busy port fails the start in one line
(exit 2), ``:0`` takes any free port and logs it, AMI_METRICS_PORT_ATTEMPTS takes the next free one.

Each case is a real ``worker run --burst`` subprocess against the local server (no jobs, so it
exits once started); the busy port is a real listening socket held by the test.
"""
from __future__ import annotations

import re
import socket
from typing import Iterator

import pytest

from tests.conftest import worker_env
from tests.worker.worker_process import WorkerProcess

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def busy_port() -> Iterator[int]:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    yield holder.getsockname()[1]
    holder.close()


def _burst(antenna, tmp_path, **extra: str) -> tuple[int, str]:
    env = worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES="null", AMI_AUTOTUNE="false",
                     AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="0", **extra)
    worker = WorkerProcess(["run", "--burst"], env, tmp_path)
    try:
        code = worker.wait(timeout_s=180)
    finally:
        worker.kill()
    return code, worker.output


def test_a_busy_metrics_port_fails_the_start_with_one_line_and_exit_2(antenna, tmp_path, busy_port):
    code, output = _burst(antenna, tmp_path, AMI_METRICS_ADDR=f"127.0.0.1:{busy_port}")
    assert code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "AMI_METRICS_ADDR" in line]
    assert len(lines) == 1, output
    assert f"127.0.0.1:{busy_port}" in lines[0] and "in use" in lines[0]


def test_port_0_takes_a_free_port_and_logs_it(antenna, tmp_path):
    code, output = _burst(antenna, tmp_path, AMI_METRICS_ADDR="127.0.0.1:0")
    assert code == 0, output
    ports = [int(p) for p in re.findall(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", output)]
    assert len(ports) == 1 and ports[0] > 0, output


def test_port_attempts_take_the_next_free_port(antenna, tmp_path, busy_port):
    code, output = _burst(antenna, tmp_path, AMI_METRICS_ADDR=f"127.0.0.1:{busy_port}",
                          AMI_METRICS_PORT_ATTEMPTS="20")
    assert code == 0, output
    ports = [int(p) for p in re.findall(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", output)]
    assert len(ports) == 1 and busy_port < ports[0] < busy_port + 20, output
    assert "Traceback" not in output


def test_a_fleet_parent_on_a_busy_port_fails_the_same_way_before_starting_any_child(antenna, tmp_path, busy_port):
    env = worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES="null", AMI_METRICS_ADDR=f"127.0.0.1:{busy_port}")
    worker = WorkerProcess(["run", "--processes", "2"], env, tmp_path)
    try:
        code = worker.wait(timeout_s=60)
    finally:
        worker.kill()
    assert code == 2, worker.output
    assert "Traceback" not in worker.output and "child 0 started" not in worker.output
    assert [line for line in worker.output.splitlines() if f"127.0.0.1:{busy_port}" in line and "in use" in line]
