"""A long job (5,000 tasks, the reference pipeline) as a real ``worker run --burst`` subprocess.

A few hundred tasks per loader worker once filled a pipe nobody read, after which the process
posted every result, logged "shutdown complete" and never exited. Here, from the server's own
clock and ledger: the process exits within seconds of its last accepted result, no loader
process outlives it, and every task has exactly one result (nothing stranded, nothing twice).
The images are one tiny preset image served for every task; still minutes of CPU per run.
"""
from __future__ import annotations

import os

import dataclasses
import re
import subprocess
import threading
import time

import psutil
import pytest

from tests.conftest import TOKEN, worker_env
from tests.worker.worker_process import worker_command
from worker.testing.antenna_server import LocalAntenna

TASKS = 5000
EXIT_AFTER_LAST_RESULT_S = 10.0


class _TimedResults(LocalAntenna):
    """The local server, noting when (``time.monotonic()``) it accepted each result POST."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.accepted_at_s: list[float] = []

    def api_post_results(self, job_id, body):
        answer = super().api_post_results(job_id, body)
        self.accepted_at_s.append(time.monotonic())
        return answer


def _watch_descendants(pid: int, seen: dict[int, psutil.Process], done: threading.Event) -> None:
    """Every process ever below ``pid`` (sampled every 0.2 s): the loader workers and fork server."""
    while not done.is_set():
        try:
            for child in psutil.Process(pid).children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.Error:
            return
        done.wait(0.2)


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie (an exited child whose new parent, here PID 1, has not reaped it)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.long_job
@pytest.mark.skipif(os.environ.get("ANTENNA_TEST_LONG_JOB") != "1", reason="4-15 min per case on 2 cores, "
                    "quiet to busy (5,000 tasks through the reference pipeline): ANTENNA_TEST_LONG_JOB=1 runs it")
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("num_workers", [1, 2])
def test_a_5000_task_burst_job_exits_promptly_and_leaves_nothing_behind(tiny_images, tmp_path, num_workers):
    server = _TimedResults(token=TOKEN, rng_seed=0).start()
    try:
        image = tiny_images[0]
        job = server.add_job([dataclasses.replace(image, image_id=f"{image.image_id}-{n}") for n in range(TASKS)],
                             "synthetic-moths")
        env = worker_env(server, tmp_path, AMI_AUTOTUNE="false", AMI_WATCHDOG_ENABLED="false",
                         AMI_REFERENCE_PIPELINE_COST="1",
                         AMI_ANTENNA_API_DATALOADER_NUM_WORKERS=str(num_workers))
        with open(tmp_path / "worker.log", "w+") as log_file:
            process = subprocess.Popen(worker_command("run", "--burst"), env=env, cwd=tmp_path,
                                       stdout=log_file, stderr=subprocess.STDOUT)
            seen: dict[int, psutil.Process] = {}
            done = threading.Event()
            watcher = threading.Thread(target=_watch_descendants, args=(process.pid, seen, done), daemon=True)
            watcher.start()
            try:
                code = process.wait(timeout=2200)
                exited_s = time.monotonic()
            finally:
                done.set()
                process.kill()
            log_file.seek(0)
            output = log_file.read()
        _gone, alive = psutil.wait_procs(list(seen.values()), timeout=5)
        survivors = [p for p in alive if _running(p)]
        for survivor in survivors:
            survivor.kill()
        report = server.report(job)
    finally:
        server.stop()
    assert code == 0, output[-3000:]
    assert (report.results_ok, report.results_error, report.delivered) == (TASKS, 0, TASKS)
    assert (report.reserved, report.duplicates, report.redeliveries, report.lost) == (0, 0, 0, 0)
    assert re.search(rf"job {job}: {TASKS} images \({TASKS} ok, 0 failed\), [0-9.]+ images/s, 0 stranded", output)
    gap_s = exited_s - server.accepted_at_s[-1]
    print(f"{num_workers} loader workers: exit {gap_s:.2f} s after the last accepted result; "
          f"{len(seen)} descendant processes seen")
    assert gap_s < EXIT_AFTER_LAST_RESULT_S, f"exited {gap_s:.1f} s after the last accepted result"
    assert len(seen) >= num_workers + 1, "the watcher never saw the fork server and its loader workers"
    assert survivors == [], f"still running after the worker exited: {survivors}"
