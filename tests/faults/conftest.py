"""The fault matrix's harness: the real ``worker`` as a subprocess against the local server in this
process, and the ledger checks every case makes.

Each case starts its own server (the reservation timeout is short where a case orphans tasks on
purpose), a job of a few tiny images for the ``null`` pipeline (decode only), and one worker with no
loader workers, batch 2, three API attempts. What "resolved" means is read from the server's ledger
(``LocalAntenna.report``), never from the worker's own log.
"""
from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import pytest

from tests.conftest import worker_env
from tests.worker.worker_process import WorkerProcess, worker_command
from worker.testing.antenna_server import JobReport, LocalAntenna

GRACE_S = 8.0
IMAGES = 6
SLUG = "null"


@dataclass(frozen=True)
class Run:
    code: int
    output: str
    wall_s: float


def fault_env(server: LocalAntenna, tmp_path: Path, **extra: str) -> dict[str, str]:
    """Autotune off (settings plan: batch 2, no loader workers) unless ``extra`` says otherwise."""
    values = dict(AMI_ANTENNA_PIPELINES=SLUG, AMI_AUTOTUNE="false", AMI_WATCHDOG_ENABLED="false",
                  AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="0", AMI_ANTENNA_API_BATCH_SIZE="2",
                  AMI_ANTENNA_API_MAX_ATTEMPTS="3", AMI_SHUTDOWN_GRACE_S=str(GRACE_S))
    values.update(extra)
    return worker_env(server, tmp_path, **values)


def run_burst(server: LocalAntenna, tmp_path: Path, timeout_s: float = 150.0, **extra: str) -> Run:
    started_s = time.monotonic()
    done = subprocess.run(worker_command("run", "--burst"), env=fault_env(server, tmp_path, **extra), cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout_s)
    return Run(done.returncode, done.stdout + done.stderr, time.monotonic() - started_s)


def run_until_signalled(server: LocalAntenna, tmp_path: Path, *, ready: Union[str, Callable[[], bool]],
                        before_signal: Optional[Callable[[], None]] = None, **extra: str) -> tuple[Run, float]:
    """``worker run`` (a daemon) until a line matches ``ready`` (or ``ready()`` is true, polled);
    then SIGTERM. Returns the run and the seconds from the signal to the exit."""
    worker = WorkerProcess(["run"], fault_env(server, tmp_path, **extra), tmp_path)
    try:
        if isinstance(ready, str):
            worker.wait_for(ready, 120)
        else:
            _poll(ready, worker, 120)
        if before_signal is not None:
            before_signal()
        sent_s = worker.send(signal.SIGTERM)
        code = worker.wait(GRACE_S + 60)
        drain_s = time.monotonic() - sent_s
    finally:
        worker.kill()
    return Run(code, worker.output, time.monotonic() - worker.started_s), drain_s


def _poll(ready: Callable[[], bool], worker: WorkerProcess, timeout_s: float) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not ready():
        assert worker.proc.poll() is None and time.monotonic() < deadline_s, worker.output[-3000:]
        time.sleep(0.05)


def assert_resolved(report: JobReport, *, duplicates: int = 0) -> None:
    """0 tasks unresolved (each has an accepted result), 0 lost, and exactly ``duplicates`` results
    posted twice."""
    unresolved = report.pending + report.reserved + report.awaiting_redelivery + report.lost
    assert (unresolved, report.complete, report.duplicates) == (0, True, duplicates), report


def wait_for_expiry(server: LocalAntenna, job_id: int, timeout_s: float = 30.0) -> None:
    """Until no task of ``job_id`` is reserved any more (the local server's short timeout)."""
    deadline_s = time.monotonic() + timeout_s
    while server.report(job_id).reserved and time.monotonic() < deadline_s:
        time.sleep(0.1)
    assert server.report(job_id).reserved == 0


@pytest.fixture
def fault_server(antenna_factory) -> Callable[..., LocalAntenna]:
    def make(reservation_timeout_s: float = 120.0) -> LocalAntenna:
        return antenna_factory(reservation_timeout_s=reservation_timeout_s)

    return make
