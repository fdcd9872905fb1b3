"""Real signals to a real ``worker run`` subprocess against the local server.

The job is shaped (latency per request, one download at a time per loader worker, two loader
workers, prefetch 1) so it lasts seconds; each test signals after a progress log line shows the
first images done. Signals go to the main process only, as systemd's KillMode=mixed and
supervisor's stopasgroup=false send them: the loader workers must live through the drain.

What "no task lost" means here, from the server's own ledger (``LocalAntenna.report``):
- ``lost == 0``: no task used up its deliveries without a result;
- drain (SIGTERM once, SIGUSR1): ``results_ok + results_error == delivered`` and
  ``reserved == awaiting_redelivery == redeliveries == 0``: every delivery this worker took got
  a result, so no task burnt one of its two deliveries; tasks never delivered stay ``pending``;
- forced (second SIGTERM): the worker abandons held tasks, so some may be ``reserved`` (they will
  be redelivered after the reservation timeout: one delivery spent, one left); still
  ``lost == 0`` and every image the worker counted as done has its result on the server.
"""
from __future__ import annotations

import re
import signal
import time

import pytest

from tests.conftest import TOKEN, worker_env
from tests.worker.worker_process import WorkerProcess
from worker.posting import Spool

GRACE_S = 20.0


def _start(antenna, tmp_path, *, latency_s: float, new_session: bool = False, **extra: str) -> WorkerProcess:
    antenna.set_network(latency_s=latency_s)
    env = worker_env(antenna, tmp_path, AMI_AUTOTUNE="false", AMI_LOG_LEVEL="DEBUG",
                     AMI_ANTENNA_API_BATCH_SIZE="2", AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="2",
                     AMI_ANTENNA_API_DATALOADER_PREFETCH_FACTOR="1",
                     AMI_ANTENNA_API_DATALOADER_DOWNLOAD_THREADS="1",
                     AMI_SHUTDOWN_GRACE_S=str(GRACE_S), **extra)
    return WorkerProcess(["run"], env, tmp_path, start_new_session=new_session)


def _sigterm_once_seen(worker: WorkerProcess, pattern: str) -> tuple[int, float]:
    """SIGTERM once ``pattern`` is in the output; (exit code, seconds from the signal to the exit)."""
    try:
        worker.wait_for(pattern, 120)
        sent_s = worker.send(signal.SIGTERM)
        code = worker.wait(120)
        return code, time.monotonic() - sent_s
    finally:
        worker.kill()


def _images_done(worker: WorkerProcess, job_id: int) -> int:
    """The worker's own count from its end-of-job line: ``job N: K images (...)``."""
    return int(worker.wait_for(rf"job {job_id}: (\d+) images \(", 5).group(1))


@pytest.mark.timeout(180)
def test_sigterm_mid_job_drains_posts_everything_and_exits_0_within_the_grace(antenna, tiny_images, tmp_path):
    job_id = antenna.add_job(tiny_images[:36], "synthetic-moths",
                             image_faults={tiny_images[1].image_id: "404"})
    worker = _start(antenna, tmp_path, latency_s=0.25)
    try:
        worker.wait_for(rf"job {job_id}: [1-9]\d*/", 90)  # a progress line: the first batch is done
        sent_s = worker.send(signal.SIGTERM)
        code = worker.wait(GRACE_S + 30)
        took_s = time.monotonic() - sent_s
    finally:
        worker.kill()
    assert code == 0, worker.output[-3000:]
    assert took_s < GRACE_S, f"exit took {took_s:.1f} s"
    report = antenna.report(job_id)
    done = _images_done(worker, job_id)
    assert report.lost == 0
    assert report.results_ok + report.results_error == report.delivered == done
    assert (report.reserved, report.awaiting_redelivery, report.redeliveries, report.duplicates) == (0, 0, 0, 0)
    assert report.pending > 0, "the drain should have stopped reserving before the job ran out"
    assert re.search(rf"job {job_id}: {done} images .*, 0 stranded", worker.output)
    assert "stop requested: draining" in worker.output and "shutdown complete" in worker.output
    assert "drain grace" not in worker.output and "stop forced" not in worker.output
    assert TOKEN not in worker.output


@pytest.mark.timeout(180)
def test_a_second_sigterm_forces_a_prompt_exit_without_losing_posted_results(antenna, tiny_images, tmp_path):
    job_id = antenna.add_job(tiny_images[:36], "synthetic-moths")
    # A slow network makes the drain long: each held task costs a second to download.
    worker = _start(antenna, tmp_path, latency_s=1.0)
    try:
        worker.wait_for(rf"job {job_id}: [1-9]\d*/", 120)
        worker.send(signal.SIGTERM)
        worker.wait_for(r"stop requested: draining", 10)  # the first was handled: two distinct signals
        second_s = worker.send(signal.SIGTERM)
        code = worker.wait(GRACE_S + 30)
        took_s = time.monotonic() - second_s
    finally:
        worker.kill()
    assert code == 0, worker.output[-3000:]
    report = antenna.report(job_id)
    done = _images_done(worker, job_id)
    assert took_s < 6.0, f"forced exit took {took_s:.1f} s"  # measured ~2.2 s: one 1 s download + teardown
    stranded = int(re.search(rf"job {job_id}: {done} images .*, (\d+) stranded", worker.output).group(1))
    assert report.lost == 0
    assert report.results_ok + report.results_error == done
    assert report.reserved == stranded  # abandoned tasks wait for redelivery, and were logged
    assert report.delivered == done + stranded
    assert report.pending > 0
    assert "stop forced: abandoning held tasks" in worker.output


@pytest.mark.timeout(240)
def test_sigusr1_finishes_the_current_job_then_exits_0_without_taking_another(antenna, tiny_images, tmp_path):
    jobs = [antenna.add_job(tiny_images[:10], "synthetic-moths"), antenna.add_job(tiny_images[10:20], "synthetic-moths")]
    worker = _start(antenna, tmp_path, latency_s=0.2)
    try:
        current = int(worker.wait_for(r"job (\d+): loader plan", 90).group(1))
        worker.wait_for(rf"job {current}: [1-9]\d*/", 90)
        worker.send(signal.SIGUSR1)
        code = worker.wait(120)
    finally:
        worker.kill()
    assert code == 0, worker.output[-3000:]
    other = next(j for j in jobs if j != current)
    finished, untouched = antenna.report(current), antenna.report(other)
    assert finished.complete and finished.results_ok == 10 and finished.redeliveries == 0
    assert untouched.delivered == 0
    assert _images_done(worker, current) == 10
    assert "recycle requested (SIGUSR1): exiting after the current job" in worker.output


@pytest.mark.timeout(180)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_to_the_whole_process_group_still_drains_cleanly(antenna, tiny_images, tmp_path, signum):
    """Ctrl-C in a terminal (SIGINT) and supervisor's stopasgroup (SIGTERM) signal every process
    of the group: loader workers ignore both and the loader's fork server blocks both, so the
    main process drains them as with SIGTERM to it alone."""
    import os

    job_id = antenna.add_job(tiny_images[:36], "synthetic-moths")
    worker = _start(antenna, tmp_path, latency_s=0.25, new_session=True)
    try:
        worker.wait_for(rf"job {job_id}: [1-9]\d*/", 90)
        os.killpg(worker.proc.pid, signum)
        code = worker.wait(GRACE_S + 30)
    finally:
        worker.kill()
    assert code == 0, worker.output[-3000:]
    report = antenna.report(job_id)
    done = _images_done(worker, job_id)
    assert "exited unexpectedly" not in worker.output
    assert report.lost == 0 and report.results_ok + report.results_error == report.delivered == done
    assert (report.reserved, report.redeliveries) == (0, 0)
    assert re.search(rf"job {job_id}: {done} images .*, 0 stranded", worker.output)


@pytest.mark.timeout(120)
def test_a_drain_holds_its_grace_against_an_image_host_that_drips_bytes(antenna, tiny_images, tmp_path):
    """Each read from a host sending one byte every 2 s succeeds, so only a total deadline ends
    such a download. With a 2 s grace the worker must exit within grace + 5 s of SIGTERM, the
    tasks its loader still held (the dripping ones) logged as stranded and left reserved."""
    images = tiny_images[:10]
    job_id = antenna.add_job(images, "synthetic-moths",
                             image_faults={image.image_id: "drip" for image in images[4:]})
    grace_s = 2.0
    env = worker_env(antenna, tmp_path, AMI_AUTOTUNE="false", AMI_LOG_LEVEL="DEBUG",
                     AMI_ANTENNA_API_BATCH_SIZE="2", AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="1",
                     AMI_ANTENNA_API_DATALOADER_PREFETCH_FACTOR="1",
                     AMI_ANTENNA_API_DATALOADER_DOWNLOAD_THREADS="2", AMI_SHUTDOWN_GRACE_S=str(grace_s))
    worker = WorkerProcess(["run"], env, tmp_path)
    try:
        worker.wait_for(rf"job {job_id}: [1-9]\d*/", 90)
        sent_s = worker.send(signal.SIGTERM)
        code = worker.wait(grace_s + 30)
        took_s = time.monotonic() - sent_s
    finally:
        worker.kill()
    assert code == 0, worker.output[-3000:]
    assert took_s < grace_s + 5.0, f"exit took {took_s:.1f} s after SIGTERM with a {grace_s} s grace"
    done = _images_done(worker, job_id)
    stranded = int(re.search(rf"job {job_id}: {done} images .*, (\d+) stranded", worker.output).group(1))
    report = antenna.report(job_id)
    assert stranded > 0 and report.lost == 0
    assert report.results_ok + report.results_error == done
    assert report.reserved == stranded and report.delivered == done + stranded


@pytest.mark.timeout(180)
def test_sigterm_while_the_probe_runs_reserves_nothing_more(antenna, tiny_images, tmp_path):
    """A drain that starts during the planning step: the probe's tasks get their results, and
    neither the head start nor a loader reserves anything after it (before, a head start of 64 and
    the lanes' first reservations were taken after the signal)."""
    job_id = antenna.add_job(tiny_images[:40], "synthetic-moths")
    antenna.set_network(latency_s=0.5)  # the probe's downloads: a second after its reserve
    env = worker_env(antenna, tmp_path, AMI_AUTOTUNE="true", AMI_AUTOTUNE_PROBE_TASKS="3",
                     AMI_SHUTDOWN_GRACE_S=str(GRACE_S))
    worker = WorkerProcess(["run"], env, tmp_path)
    try:
        deadline_s = time.monotonic() + 120
        while not antenna.reservations and time.monotonic() < deadline_s:
            time.sleep(0.01)
        assert antenna.reservations, worker.output[-3000:]
        worker.send(signal.SIGTERM)
        code = worker.wait(GRACE_S + 30)
    finally:
        worker.kill()
    assert code == 0, worker.output[-3000:]
    report = antenna.report(job_id)
    assert [len(reservation["task_ids"]) for reservation in antenna.reservations] == [3]
    assert report.results_ok + report.results_error == report.delivered == 3
    assert (report.reserved, report.pending, report.lost) == (0, 37, 0)
    assert "stop requested: draining" in worker.output and "shutdown complete" in worker.output


@pytest.mark.timeout(180)
def test_sigterm_during_the_start_up_replay_exits_within_the_grace(antenna, tmp_path):
    """Spooled results and an API that answers 503: the replay at start retried every file in turn
    and never looked at the stop flags (exit some 84 s after SIGTERM with a 3 s grace). A drain
    now stops the replay, and its grace ends the retries; the files stay for the next start."""
    spool = Spool(tmp_path / "user-data" / "spool")
    for index in range(12):
        spool.write(1, [{"reply_subject": f"$JS.ACK.spooled.{index}",
                         "result": {"error": "spooled before", "image_id": str(index)}}])
    antenna.set_unavailable(True)
    env = worker_env(antenna, tmp_path, AMI_AUTOTUNE="false", AMI_SHUTDOWN_GRACE_S="3")
    worker = WorkerProcess(["run"], env, tmp_path)
    code, took_s = _sigterm_once_seen(worker, r"POST /jobs/1/result/: HTTP 503; retry in")
    assert code == 0, worker.output[-3000:]
    assert took_s < 20.0, f"exit took {took_s:.1f} s after SIGTERM (grace 3 s)"
    assert len(spool.files()) == 12  # nothing posted, nothing lost
    assert "shutdown complete" in worker.output


@pytest.mark.timeout(180)
def test_posts_retrying_past_the_grace_do_not_hold_the_drain(antenna, tiny_images, tmp_path):
    """Every result answered after the client's timeout, one post slot: the loop waited in
    ``submit`` while the post in flight went through all its retries, where the grace could not
    be seen (exit 13 s after SIGTERM with 6 attempts and a 3 s grace; at the defaults, past
    systemd's TimeoutStopSec). Once the grace is over a post gives up its retries and a body with
    no free slot is spooled at once."""
    job_id = antenna.add_job(tiny_images[:40], "null")
    antenna.set_response_faults("result", ["late"] * 1000)  # each answered 2 s after it was done
    env = worker_env(antenna, tmp_path, AMI_AUTOTUNE="false", AMI_ANTENNA_PIPELINES="null",
                     AMI_ANTENNA_API_BATCH_SIZE="2", AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="1",
                     AMI_ANTENNA_MAX_PENDING_POSTS="1", AMI_ANTENNA_API_TIMEOUT_S="1",
                     AMI_ANTENNA_API_MAX_ATTEMPTS="12", AMI_SHUTDOWN_GRACE_S="3")
    worker = WorkerProcess(["run"], env, tmp_path)
    code, took_s = _sigterm_once_seen(worker, r"POST /jobs/\d+/result/: .*retry in")
    assert code == 0, worker.output[-3000:]
    assert took_s < 12.0, f"exit took {took_s:.1f} s after SIGTERM (grace 3 s, API timeout 1 s)"
    report = antenna.report(job_id)
    spooled = sum(len(Spool.read(path)[1]) for path in Spool(tmp_path / "user-data" / "spool").files())
    stranded = int(re.search(rf"job {job_id}: \d+ images .*, (\d+) stranded", worker.output).group(1))
    # every task it took has its result on the server (a late answer still counts there), in the
    # spool, or was logged as stranded for redelivery
    assert report.lost == 0
    assert report.delivered <= report.results_ok + report.results_error + spooled + stranded
    assert "drain grace of 3 s is over: forcing" in worker.output
