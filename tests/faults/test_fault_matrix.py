"""Fault matrix: the real worker (``worker run`` subprocess) against the local server, one fault per case.

Every case asserts from the server's own ledger, after the worker's last run: 0 tasks unresolved
(pending, reserved, awaiting redelivery or lost), the number of results posted twice (0, except the
one case where the server did the work and the answer was lost, which the README documents), and
the exit code the README's 'Failure behaviour' table gives. Where a fault leaves results spooled or
tasks orphaned, a second run (the fault cleared) is part of the case: replay first, redelivery
after the local server's short reservation timeout. Drain cases check the exit within grace + 5 s.
"""
from __future__ import annotations

import contextlib
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.faults.conftest import (GRACE_S, IMAGES, SLUG, assert_resolved, run_burst, run_until_signalled,
                                  wait_for_expiry)
from worker.daemon import EXIT_TOKEN_REJECTED
from worker.posting import Spool

pytestmark = pytest.mark.timeout(300)


def _job(server, tiny_images, n: int = IMAGES) -> int:
    return server.add_job(tiny_images[:n], SLUG)


def _spool(tmp_path) -> Spool:
    return Spool(tmp_path / "user-data" / "spool")


def test_results_api_down_spools_then_the_next_start_replays(fault_server, tiny_images, tmp_path):
    server = fault_server()
    job = _job(server, tiny_images)
    server.set_faults("result", [503] * 9)  # 3 bodies x 3 attempts
    first = run_burst(server, tmp_path)
    assert first.code == 0, first.output[-3000:]
    assert server.report(job).results_ok == 0 and len(_spool(tmp_path).files()) == 3
    second = run_burst(server, tmp_path)
    assert second.code == 0 and "replayed 2 spooled results" in second.output
    assert_resolved(server.report(job))
    assert server.report(job).redeliveries == 0 and _spool(tmp_path).files() == []


def test_a_job_deleted_mid_run_drops_its_results_with_one_line_each(fault_server, tiny_images, tmp_path):
    server = fault_server()
    job = _job(server, tiny_images)
    server.delete_job(job, after_results=2)
    run = run_burst(server, tmp_path)
    assert run.code == 0, run.output[-3000:]
    report = server.report(job)
    assert report.results_ok == 2 and report.duplicates == 0 and _spool(tmp_path).files() == []
    gone = re.findall(rf"job {job} is gone from the server \(HTTP 404\): (\d+) results dropped", run.output)
    assert gone and "Traceback" not in run.output
    # Every other task this worker took was dropped with its line, or never reserved (the 404 on reserve).
    assert report.results_ok + sum(int(n) for n in gone) + report.pending <= IMAGES


def test_a_413_splits_result_bodies(fault_server, tiny_images, tmp_path):
    server = fault_server()
    job = _job(server, tiny_images)
    server.set_faults("result", [413, 413])
    run = run_burst(server, tmp_path)
    assert run.code == 0, run.output[-3000:]
    assert_resolved(server.report(job))
    assert server.report(job).results_ok + server.report(job).results_error == IMAGES


@pytest.mark.parametrize("status", [401, 403])
def test_a_rejected_token_on_results_exits_3_and_keeps_them_for_the_next_start(
        fault_server, tiny_images, tmp_path, status):
    server = fault_server()
    job = _job(server, tiny_images)
    server.set_faults("result", [status] * 100)
    first = run_burst(server, tmp_path)
    assert first.code == EXIT_TOKEN_REJECTED, first.output[-3000:]
    assert server.report(job).results_ok == 0 and _spool(tmp_path).files()
    if status == 403:
        assert "superuser" in first.output
    server.set_faults("result", [])
    second = run_burst(server, tmp_path)
    assert second.code == 0, second.output[-3000:]
    assert_resolved(server.report(job))
    assert server.report(job).results_ok == IMAGES


def test_a_rejected_token_on_listing_exits_3_at_once(fault_server, tiny_images, tmp_path):
    server = fault_server()
    job = _job(server, tiny_images)
    server.set_faults("jobs", [401] * 100)
    first = run_burst(server, tmp_path)
    assert first.code == EXIT_TOKEN_REJECTED, first.output[-3000:]
    assert "ERROR" in first.output and "AMI_ANTENNA_API_AUTH_TOKEN" in first.output
    assert server.report(job).delivered == 0
    server.set_faults("jobs", [])
    assert run_burst(server, tmp_path).code == 0
    assert_resolved(server.report(job))


def test_a_result_post_reset_mid_response_is_retried_as_a_harmless_duplicate(fault_server, tiny_images, tmp_path):
    server = fault_server()
    job = _job(server, tiny_images)
    server.set_response_faults("result", ["reset"])
    run = run_burst(server, tmp_path)
    assert run.code == 0, run.output[-3000:]
    # The server saved the first body (2 results) before the reset; the retry posted them again.
    assert_resolved(server.report(job), duplicates=2)


@pytest.mark.parametrize("kind", ["malformed", "misshapen", "reset"])
def test_a_broken_listing_is_retried(fault_server, tiny_images, tmp_path, kind):
    server = fault_server()
    job = _job(server, tiny_images)
    server.set_response_faults("jobs", [kind])
    run = run_burst(server, tmp_path)
    assert run.code == 0 and "Traceback" not in run.output, run.output[-3000:]
    assert_resolved(server.report(job))


@pytest.mark.parametrize("fault", ["reset", "502"])
def test_a_reserve_that_may_have_reserved_is_not_retried(fault_server, tiny_images, tmp_path, fault):
    """A reset after the server reserved orphans those tasks: one delivery each, redelivered after
    the reservation timeout. A 502 before the server reserved orphans nothing."""
    server = fault_server(reservation_timeout_s=3.0)
    job = _job(server, tiny_images)
    if fault == "reset":
        server.set_response_faults("tasks", ["reset"])
    else:
        server.set_faults("tasks", [502])
    first = run_burst(server, tmp_path)
    assert first.code == 0, first.output[-3000:]
    assert "not retried, the server may have acted on it" in first.output
    orphaned = server.report(job).reserved
    assert orphaned == (2 if fault == "reset" else 0)
    wait_for_expiry(server, job)
    assert run_burst(server, tmp_path).code == 0
    report = server.report(job)
    assert_resolved(report)
    assert report.redeliveries == orphaned


def test_a_400_for_every_result_fails_no_image_and_holds_the_results(fault_server, tiny_images, tmp_path):
    server = fault_server()
    job = _job(server, tiny_images)
    cause = "algorithm key 'null-detector' is not registered for pipeline 'null'"
    server.reject_all_results(job, cause)
    first = run_burst(server, tmp_path)
    assert first.code == 0, first.output[-3000:]
    report = server.report(job)
    # At most 3 POSTs per body (the body, both halves); bodies already in flight when the first
    # one is found systematic each make their own 3.
    assert report.results_ok == report.results_error == 0 and report.rejected_posts <= 3 * IMAGES // 2
    errors = [line for line in first.output.splitlines() if " ERROR " in line and cause in line]
    assert len(errors) == 1 and _spool(tmp_path).rejections()
    server.reject_all_results(job, None)  # the operator registers the algorithm
    assert run_burst(server, tmp_path).code == 0
    assert_resolved(server.report(job))
    assert server.report(job).results_ok == IMAGES and _spool(tmp_path).rejections() == {}


@contextlib.contextmanager
def unwritable_spool(spool_path: Path, kind: str) -> Iterator[None]:
    """``enotdir``: a regular file where the spool directory goes (every write fails, even as root).
    ``full``: a one-page tmpfs mounted there and filled (ENOSPC); skipped where mounting is refused."""
    spool_path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "enotdir":
        spool_path.write_text("not a directory")
        try:
            yield
        finally:
            spool_path.unlink()
        return
    spool_path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(spool_path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()[:200]}")
    try:
        with contextlib.suppress(OSError):
            (spool_path / "filler").write_bytes(b"x" * 64 * 1024)  # fills the one page, then ENOSPC
        yield
    finally:
        subprocess.run(["umount", str(spool_path)], check=True)
        spool_path.rmdir()


@pytest.mark.parametrize("kind", ["enotdir", "full"])
def test_a_spool_that_cannot_be_written_strands_the_tasks_for_redelivery(fault_server, tiny_images, tmp_path, kind):
    server = fault_server(reservation_timeout_s=3.0)
    job = _job(server, tiny_images)
    server.set_faults("result", [503] * 9)
    with unwritable_spool(tmp_path / "user-data" / "spool", kind):
        first = run_burst(server, tmp_path)
    assert first.code == 0, first.output[-3000:]
    assert "6 results stranded (neither posted nor spooled)" in first.output
    assert ("No space left on device" if kind == "full" else "File exists") in first.output
    assert server.report(job).results_ok == 0
    wait_for_expiry(server, job)
    assert run_burst(server, tmp_path).code == 0
    report = server.report(job)
    assert_resolved(report)
    assert report.redeliveries == IMAGES


def test_sigterm_while_the_results_api_is_down_drains_within_the_grace_and_loses_nothing(
        fault_server, tiny_images, tmp_path):
    server = fault_server()
    job = server.add_job(tiny_images[:20], SLUG)
    server.set_network(latency_s=0.2)  # the job lasts seconds: the signal lands mid-job
    run, drain_s = run_until_signalled(server, tmp_path, ready=lambda: server.report(job).results_ok >= 2,
                                       before_signal=lambda: server.set_unavailable(True))
    assert run.code == 0, run.output[-3000:]
    assert drain_s <= GRACE_S + 5, f"drain took {drain_s:.1f} s"
    assert "results spooled to" in run.output and server.report(job).results_ok < 20
    server.set_unavailable(False)
    server.set_network(latency_s=0.0)
    assert run_burst(server, tmp_path).code == 0
    assert_resolved(server.report(job))


def test_sigterm_during_the_auth_backoff_exits_at_once(fault_server, tiny_images, tmp_path):
    server = fault_server()
    _job(server, tiny_images)
    server.set_faults("jobs", [401] * 1000)
    run, drain_s = run_until_signalled(server, tmp_path, ready=r"next try in ([3-9]|\d\d)")
    assert run.code == 0, run.output[-3000:]
    assert drain_s <= 5.0, f"exit took {drain_s:.1f} s"


@pytest.mark.parametrize("status", [403, 503])
def test_a_failing_probe_reserve_is_no_crash(fault_server, tiny_images, tmp_path, status):
    """With autotune on (the default) the probe reserves in the main process: a 403 (a token that
    is not a superuser's) or a 503 that outlasts the retries must not end the run with a traceback."""
    server = fault_server()
    job = _job(server, tiny_images)
    server.set_faults("tasks", [status] * 100)
    first = run_burst(server, tmp_path, AMI_AUTOTUNE="true")
    assert "Traceback" not in first.output, first.output[-3000:]
    assert first.code == (EXIT_TOKEN_REJECTED if status == 403 else 0), first.output[-3000:]
    if status == 403:
        assert "superuser" in first.output
    assert server.report(job).delivered == 0
    server.set_faults("tasks", [])
    assert run_burst(server, tmp_path, AMI_AUTOTUNE="true").code == 0
    assert_resolved(server.report(job))


@pytest.mark.parametrize("num_workers", ["0", "2"])
def test_a_rejected_token_on_the_loaders_reserve_exits_3(fault_server, tiny_images, tmp_path, num_workers):
    """With autotune off no probe reserves in the main process: the loader's reserves (in loader
    workers, or in the main process with 0 workers) are the first to meet a 403 (a token that may
    list jobs but is not a superuser's). The job yields nothing, and ``--burst`` must say why: exit 3
    and the superuser hint, as when the probe's reserve is rejected, not 0 as if the queue were empty."""
    server = fault_server()
    job = _job(server, tiny_images)
    server.set_faults("tasks", [403] * 100)
    first = run_burst(server, tmp_path, AMI_AUTOTUNE="false", AMI_ANTENNA_API_DATALOADER_NUM_WORKERS=num_workers)
    assert "Traceback" not in first.output, first.output[-3000:]
    assert first.code == EXIT_TOKEN_REJECTED, first.output[-3000:]
    assert "superuser" in first.output and "AMI_ANTENNA_API_AUTH_TOKEN" in first.output
    assert server.report(job).delivered == 0
    server.set_faults("tasks", [])
    assert run_burst(server, tmp_path, AMI_AUTOTUNE="false", AMI_ANTENNA_API_DATALOADER_NUM_WORKERS=num_workers).code == 0
    assert_resolved(server.report(job))
