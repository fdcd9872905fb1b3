"""The loop under API failures, in-process against the real local server (issue 14 items 6, 11).

Each test failed before the loop escalated auth failures: a rejected token was a WARNING every idle
sleep, forever, and ``--burst`` exited 0; results that could not be spooled were not counted."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import TOKEN, worker_env
from tests.worker.worker_process import worker_command
from worker.antenna import AntennaClient
from worker.app import build_worker
from worker.daemon import EXIT_TOKEN_REJECTED
from worker.posting import Spool


@pytest.mark.timeout(120)
@pytest.mark.parametrize("endpoint", ["jobs", "result"])
def test_burst_exits_with_the_token_rejected_code_after_a_401(antenna, settings_for, tiny_images, caplog, endpoint):
    job = antenna.add_job(tiny_images[:2], "null")
    antenna.set_faults(endpoint, [401] * 50)
    worker = build_worker(settings_for(antenna, antenna_api_dataloader_num_workers=0), burst=True, middlewares=[])
    caplog.set_level(logging.INFO)
    assert worker.run() == EXIT_TOKEN_REJECTED == 3
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all("AMI_ANTENNA_API_AUTH_TOKEN" in e or "token" in e for e in errors)
    if endpoint == "result":  # the results are kept for the next start, not failed
        assert worker.poster.counters.spooled_items == 2 and antenna.report(job).results_ok == 0


@pytest.mark.timeout(60)
def test_a_rejected_token_backs_off_the_listing(antenna, settings_for):
    antenna.set_faults("jobs", [401] * 1000)
    worker = build_worker(settings_for(antenna, antenna_idle_sleep_seconds=0.05), middlewares=[])
    stop = threading.Timer(2.0, lambda: (worker._on_terminate(signal.SIGTERM, None), worker.wake.set()))
    stop.start()
    try:
        assert worker.run() == 0  # a drained daemon exits 0; only --burst reports the token
    finally:
        stop.cancel()
    # Without backoff: one listing per 0.05 s idle sleep, about 40 in 2 s.
    assert 1 <= worker.client.auth_failures_total <= 8


@pytest.mark.timeout(120)
def test_results_that_cannot_be_spooled_count_as_stranded(antenna, settings_for, tiny_images, tmp_path, caplog):
    job = antenna.add_job(tiny_images[:3], "null")
    settings = settings_for(antenna, antenna_api_dataloader_num_workers=0, antenna_api_batch_size=3,
                            antenna_api_max_attempts=1)
    (settings.user_data_path / "spool").parent.mkdir(parents=True, exist_ok=True)
    (settings.user_data_path / "spool").write_text("not a directory")
    antenna.set_faults("result", [503] * 10)
    worker = build_worker(settings, burst=True, middlewares=[])
    caplog.set_level(logging.INFO, logger="worker.daemon")
    assert worker.run() == 0
    assert worker.poster.counters.spool_failed_items == 3
    assert "3 results stranded (neither posted nor spooled)" in caplog.text
    assert antenna.report(job).reserved == 3  # left for redelivery


@pytest.mark.timeout(60)
def test_the_state_gauge_and_a_counter_show_a_rejected_token(antenna, settings_for):
    """Failed before: the gauge had no such state and no metric counted auth failures."""
    from worker.metrics import REGISTRY
    from worker.middleware.prometheus import MetricsMiddleware

    before = REGISTRY.get_sample_value("antenna_worker_api_auth_failures_total") or 0.0
    antenna.set_faults("jobs", [403] * 1000)
    worker = build_worker(settings_for(antenna), middlewares=[MetricsMiddleware("127.0.0.1:0")])
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    try:
        deadline = threading.Event()
        for _ in range(200):
            if REGISTRY.get_sample_value("antenna_worker_state", {"state": "unauthorized"}) == 1.0:
                break
            deadline.wait(0.05)
        assert REGISTRY.get_sample_value("antenna_worker_state", {"state": "unauthorized"}) == 1.0
        assert REGISTRY.get_sample_value("antenna_worker_state", {"state": "idle"}) == 0.0
        assert (REGISTRY.get_sample_value("antenna_worker_api_auth_failures_total") or 0.0) > before
    finally:
        worker._on_terminate(signal.SIGTERM, None)  # what the handler does; the watcher thread then wakes
        worker.wake.set()
        runner.join(timeout=30)
    assert not runner.is_alive()


@pytest.mark.timeout(180)
def test_a_job_whose_every_result_is_rejected_is_reserved_no_more(antenna, settings_for, tiny_images):
    """Each reservation costs one of a task's two deliveries, and while the server refuses every
    result of the job (400 for each half too) nothing the worker does with more tasks can be
    posted: it stops reserving that job, keeps what it holds in the spool, and lists it no more."""
    job_id = antenna.add_job(tiny_images[:40], "synthetic-moths")
    antenna.reject_all_results(job_id, "algorithm key 'moth-x' is not registered for pipeline 'synthetic-moths'")
    settings = settings_for(antenna, antenna_api_batch_size=4, localization_batch_size=4, num_workers=1,
                            antenna_api_dataloader_prefetch_factor=1)
    worker = build_worker(settings, burst=True)
    assert worker.run() == 0

    reserved = sum(len(reservation["task_ids"]) for reservation in antenna.reservations)
    report = antenna.report(job_id)
    assert job_id in worker.poster.rejected_jobs
    assert worker.poster.counters.spooled_items == reserved  # every reserved task's result is kept
    assert reserved <= 20 and report.pending == 40 - reserved  # the rest was never delivered
    assert report.results_ok + report.results_error == 0


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` on a read-only bind mount of itself, as after an ``errors=remount-ro``."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root and mount(8)")
    if subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts are not permitted here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True, capture_output=True)


@pytest.mark.timeout(120)
def test_a_spool_on_a_read_only_filesystem_does_not_stop_the_worker(antenna, settings_for, tiny_images, caplog):
    """The start-up replay posts a spooled file it then cannot remove: one ERROR line, and the worker
    goes on (before, the OSError left ``run`` before its try/finally: exit 1 at every start, each
    start posting the file again)."""
    job = antenna.add_job(tiny_images[:2], "null")
    tasks = AntennaClient(antenna.base_url, TOKEN).reserve_tasks(job, 2)
    settings = settings_for(antenna, antenna_pipelines="null", antenna_api_dataloader_num_workers=0)
    spool = settings.user_data_path / "spool"
    Spool(spool).write(job, [{"reply_subject": task.reply_subject,
                              "result": {"error": "spooled before", "image_id": task.image_id}} for task in tasks])
    caplog.set_level(logging.INFO)
    with read_only(spool):
        worker = build_worker(settings, burst=True, middlewares=[])
        assert worker.run() == 0
    assert antenna.report(job).results_error == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 2, errors
    assert "is not writable: results the API cannot take will not be spooled" in errors[0]  # said at the start
    assert "cannot be opened or removed" in errors[1]
    assert "shutdown complete" in caplog.text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["under /proc", "under a file"])
def test_a_user_data_path_that_cannot_be_a_folder_is_one_line_exit_2(antenna, tiny_images, tmp_path, where):
    """Before: the job ran, nothing could be spooled, and every job's end logged a traceback."""
    antenna.add_job(tiny_images[:4], "null")
    (tmp_path / "a-file").write_text("")
    path = "/proc/no-such/ami" if where == "under /proc" else str(tmp_path / "a-file" / "ami")
    env = worker_env(antenna, tmp_path, AMI_USER_DATA_PATH=path, AMI_ANTENNA_PIPELINES="null")
    done = subprocess.run(worker_command("run", "--burst"), env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=100)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("worker")]
    assert done.returncode == 2 and len(errors) == 1 and f"AMI_USER_DATA_PATH={path}" in errors[0], done.stderr[-2000:]
    assert antenna.reservations == []


@pytest.mark.timeout(180)
def test_an_advisory_that_cannot_be_written_is_a_warning_not_a_traceback(antenna, settings_for, tiny_images, caplog):
    job = antenna.add_job(tiny_images[:6], "null")
    settings = settings_for(antenna, antenna_pipelines="null", autotune=True)
    settings.user_data_path.mkdir(parents=True)
    (settings.user_data_path / "advisories").write_text("a file where the folder goes")
    caplog.set_level(logging.INFO)
    assert build_worker(settings, burst=True).run() == 0
    assert antenna.report(job).results_ok == 6
    assert f"job {job}: memory correction and advisory not saved under" in caplog.text
    assert not [record for record in caplog.records if record.exc_info], caplog.text[-2000:]


@pytest.mark.timeout(120)
def test_a_burst_whose_listing_finds_the_api_unreachable_exits_4(antenna, settings_for, caplog):
    """Before: exit 0, as if every job were done; a batch scheduler then saw a wrong
    AMI_ANTENNA_API_BASE_URL as a job that completed."""
    settings = settings_for(antenna, antenna_api_max_attempts=2)
    worker = build_worker(settings, burst=True, middlewares=[])
    antenna.stop()
    caplog.set_level(logging.INFO)
    assert worker.run() == 4
    assert "burst: exiting 4, the last job listing failed through every retry (GET /jobs/: " in caplog.text
    assert "check AMI_ANTENNA_API_BASE_URL and the network" in caplog.text


@pytest.mark.timeout(60)
def test_a_burst_whose_listing_is_refused_404_exits_4_not_0(antenna, settings_for, tiny_images, caplog):
    """A base URL whose path is wrong (here /api/v1) reaches a server that answers the listing 404:
    before, the burst exited 0, as if every job were done."""
    antenna.add_job(tiny_images[:2], "null")
    settings = settings_for(antenna, antenna_api_base_url=antenna.origin + "/api/v1")
    worker = build_worker(settings, burst=True, middlewares=[])
    caplog.set_level(logging.INFO)
    assert worker.run() == 4
    assert "burst: exiting 4, the last job listing was refused (HTTP 404: GET /jobs/: " in caplog.text
    assert "check AMI_ANTENNA_API_BASE_URL" in caplog.text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_burst_whose_every_reserve_is_refused_exits_4_not_0(antenna, settings_for, tiny_images, caplog,
                                                                num_workers):
    """A reserve refused 400 (the server will not take this worker's request: a version it does not
    speak) left every task where it was, and the burst exited 0 as if the job were done."""
    job = antenna.add_job(tiny_images[:4], "null")
    antenna.set_faults("tasks", [400] * 100)
    worker = build_worker(settings_for(antenna, antenna_api_dataloader_num_workers=num_workers), burst=True,
                          middlewares=[])
    caplog.set_level(logging.INFO)
    assert worker.run() == 4
    assert f"burst: exiting 4, the API refused the reserve of job {job} (HTTP 400; " in caplog.text
    assert antenna.report(job).pending == 4


@pytest.mark.timeout(120)
def test_a_job_deleted_under_the_burst_is_not_an_api_failure(antenna, settings_for, tiny_images, caplog):
    """A reserve answered 404 (the job was deleted after the listing) is the end of that job."""
    job = antenna.add_job(tiny_images[:4], "null")
    antenna.add_job(tiny_images[4:6], "null")
    antenna.delete_job(job, after_results=2)
    worker = build_worker(settings_for(antenna, antenna_api_dataloader_num_workers=0, antenna_api_batch_size=2,
                                       autotune=False), burst=True, middlewares=[])
    assert worker.run() == 0
