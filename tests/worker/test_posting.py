"""Result posting against the real local server: byte caps, bisection of 400s, spool and replay."""
from __future__ import annotations

import json
import logging
import os
import time

import pytest

from tests.conftest import TOKEN
from worker.antenna import AntennaClient
from worker.posting import ResultPoster, Spool, encode_items, split_under_cap
from worker.results import Failure, ImageResult


def error_items(tasks, note: str = "x") -> list[ImageResult]:
    return [ImageResult.error(t, Failure("other", note)) for t in tasks]


class RawResult:
    """A TEST DOUBLE for an ``ImageResult`` whose wire JSON is given as is: the worker's typed results
    cannot be invalid, but a server may still reject a body (a stricter server, a newer schema)."""

    def __init__(self, item: dict) -> None:
        self._item = item

    def item(self) -> "RawResult":
        return self

    def model_dump(self, mode: str) -> dict:
        return self._item


def make_poster(server, tmp_path, **kwargs) -> ResultPoster:
    client = AntennaClient(server.base_url, TOKEN, timeout_s=5.0, max_attempts=3, sleep=lambda s: None)
    return ResultPoster(client, Spool(tmp_path / "spool"), **kwargs)


def test_split_under_cap_keeps_every_body_under_the_cap_and_order():
    items = [{"reply_subject": f"s{i}", "result": {"error": "e" * (i * 37 % 500), "image_id": str(i)}}
             for i in range(200)]
    encoded = encode_items(items)
    groups = split_under_cap(encoded, 4096)
    assert [i for g in groups for i in g] == list(range(200))
    for group in groups:
        body = b'{"results":[' + b",".join(encoded[i] for i in group) + b"]}"
        assert len(body) <= 4096
        assert len(json.loads(body)["results"]) == len(group)


def test_an_item_over_the_cap_goes_alone():
    encoded = [b"a" * 10, b"b" * 5000, b"c" * 10]
    assert split_under_cap(encoded, 1000) == [[0], [1], [2]]


@pytest.mark.timeout(60)
def test_bodies_stay_under_a_proxy_limit(antenna_factory, tiny_images, tmp_path):
    server = antenna_factory(max_request_bytes=64 * 1024)
    job = server.add_job(tiny_images[:30], "synthetic-moths")
    tasks = AntennaClient(server.base_url, TOKEN).reserve_tasks(job, 30)
    poster = make_poster(server, tmp_path, max_post_bytes=64 * 1024)
    poster.submit(job, error_items(tasks, "e" * 6000))
    assert poster.flush(timeout_s=30)
    report = server.report(job)
    assert report.results_error == 30 and report.rejected_posts == 0
    assert poster.counters.posted_bodies >= 3 and poster.counters.spooled_items == 0


@pytest.mark.timeout(60)
def test_one_invalid_item_is_isolated_and_replaced_by_an_error_result(antenna, tiny_images, tmp_path):
    job = antenna.add_job(tiny_images[:8], "synthetic-moths")
    tasks = AntennaClient(antenna.base_url, TOKEN).reserve_tasks(job, 8)
    items = error_items(tasks)
    bad = tasks[5]
    items[5] = RawResult({"reply_subject": bad.reply_subject, "result": {
        "pipeline": "synthetic-moths", "algorithms": {}, "total_time": 0.1,
        "source_images": [{"id": bad.image_id, "url": bad.image_url}],
        "detections": [{"bbox": {"x1": 0, "y1": 0, "x2": 1, "y2": 1}}], "errors": None}})
    poster = make_poster(antenna, tmp_path)
    poster.submit(job, items)
    assert poster.flush(timeout_s=30)
    report = antenna.report(job)
    assert report.results_error == 8 and report.complete
    assert report.rejected_posts >= 2  # the whole body, then the halves that held the bad item
    assert poster.counters.replaced_items == 1 and poster.counters.dropped_items == 0


@pytest.mark.timeout(60)
def test_results_spool_while_the_api_is_down_and_replay_first_at_next_start(antenna, tiny_images, tmp_path):
    job = antenna.add_job(tiny_images[:6], "synthetic-moths")
    tasks = AntennaClient(antenna.base_url, TOKEN).reserve_tasks(job, 6)
    antenna.set_unavailable(True)
    poster = make_poster(antenna, tmp_path, max_post_bytes=64 * 1024)
    poster.submit(job, error_items(tasks[:3]))
    poster.submit(job, error_items(tasks[3:]))
    assert poster.flush(timeout_s=30)
    assert poster.counters.spooled_items == 6 and len(Spool(tmp_path / "spool").files()) == 2
    assert antenna.report(job).results_error == 0
    # Still down at the next start: nothing is lost, files stay.
    assert make_poster(antenna, tmp_path).replay_spool() == 0
    assert len(Spool(tmp_path / "spool").files()) == 2
    antenna.set_unavailable(False)
    replayed = make_poster(antenna, tmp_path).replay_spool()
    assert replayed == 6 and Spool(tmp_path / "spool").files() == []
    assert antenna.report(job).results_error == 6


@pytest.mark.timeout(60)
def test_submit_blocks_at_max_pending_posts(antenna, tiny_images, tmp_path):
    job = antenna.add_job(tiny_images[:10], "synthetic-moths")
    tasks = AntennaClient(antenna.base_url, TOKEN).reserve_tasks(job, 10)
    antenna.set_network(latency_s=0.1)
    poster = make_poster(antenna, tmp_path, max_pending_posts=2)
    seen = []
    for task in tasks:
        poster.submit(job, error_items([task]))
        seen.append(poster.pending_posts)
    assert poster.flush(timeout_s=30)
    assert max(seen) <= 2 and antenna.report(job).results_error == 10


# --- failure paths (issue 14 items 1, 2, 5, 6, 9). Each test failed on the poster whose replay
# --- stopped at the first failing file, read spool files unguarded, let flush raise, lost results
# --- when the spool could not be written, and replaced every item of a systematic 400.

class Clock:
    """A TEST DOUBLE for ``time.monotonic``: the replay backoff is timed without sleeping."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def spool_files(tmp_path) -> list:
    return Spool(tmp_path / "spool").files()


def reserve(server, job: int, n: int):
    return AntennaClient(server.base_url, TOKEN).reserve_tasks(job, n)


def items_of(results) -> list[dict]:
    return [r.item().model_dump(mode="json") for r in results]


@pytest.mark.timeout(30)
def test_flush_returns_false_at_its_deadline_instead_of_raising(antenna, tiny_images, tmp_path):
    job = antenna.add_job(tiny_images[:1], "synthetic-moths")
    tasks = reserve(antenna, job, 1)
    antenna.set_network(latency_s=1.5)
    poster = make_poster(antenna, tmp_path)
    poster.submit(job, error_items(tasks))
    assert poster.flush(timeout_s=0.2) is False
    assert poster.flush(timeout_s=20) is True and antenna.report(job).results_error == 1


@pytest.mark.timeout(60)
def test_replay_goes_past_a_failing_file_drops_a_deleted_jobs_results_and_retries_later(
        antenna, tiny_images, tmp_path, caplog):
    jobs = [antenna.add_job(tiny_images[i * 2:i * 2 + 2], "synthetic-moths") for i in range(3)]
    spool = Spool(tmp_path / "spool")
    for job in jobs:  # oldest first: the job whose posts fail, the deleted job, a healthy job
        spool.write(job, items_of(error_items(reserve(antenna, job, 2))))
    antenna.delete_job(jobs[1])
    antenna.set_faults("result", [503] * 3)  # the first file's three attempts
    clock = Clock()
    poster = make_poster(antenna, tmp_path, clock=clock, replay_backoff_s=5.0)
    caplog.set_level(logging.INFO, logger="worker.posting")
    assert poster.replay_spool() == 4  # 2 dropped (job gone), 2 posted; the first file is kept
    assert antenna.report(jobs[2]).results_error == 2 and antenna.report(jobs[0]).results_error == 0
    assert poster.counters.job_gone_items == 2 and len(spool_files(tmp_path)) == 1
    assert len([r for r in caplog.records if r.name == "worker.posting" and f"job {jobs[1]} " in r.getMessage()]) == 1
    assert poster.replay_spool() == 0  # not due yet: no POST
    clock.now_s += 5.0
    assert poster.replay_spool() == 2 and spool_files(tmp_path) == []
    assert antenna.report(jobs[0]).results_error == 2 and antenna.report(jobs[0]).duplicates == 0


@pytest.mark.timeout(60)
def test_replay_runs_again_by_itself_while_the_poster_lives(antenna, tiny_images, tmp_path):
    job = antenna.add_job(tiny_images[:2], "synthetic-moths")
    tasks = reserve(antenna, job, 2)
    antenna.set_unavailable(True)
    poster = make_poster(antenna, tmp_path, replay_backoff_s=0.2)
    poster.submit(job, error_items(tasks))
    assert poster.flush(timeout_s=20) and poster.counters.spooled_items == 2
    antenna.set_unavailable(False)
    deadline_s = time.monotonic() + 20
    while spool_files(tmp_path) and time.monotonic() < deadline_s:
        time.sleep(0.05)
    poster.close()
    assert spool_files(tmp_path) == [] and antenna.report(job).results_error == 2
    assert poster.counters.replayed_items == 2


@pytest.mark.timeout(60)
def test_a_413_splits_the_body_and_a_single_result_over_the_limit_becomes_an_error_result(
        antenna, tiny_images, tmp_path):
    job = antenna.add_job(tiny_images[:4], "synthetic-moths")
    tasks = reserve(antenna, job, 4)
    antenna.set_faults("result", [413, 413])  # the body of 4, then its first half of 2
    poster = make_poster(antenna, tmp_path)
    poster.submit(job, error_items(tasks))
    assert poster.flush(timeout_s=20)
    report = antenna.report(job)
    assert report.results_error == 4 and report.duplicates == 0 and poster.counters.spooled_items == 0
    assert poster.counters.posted_bodies == 3
    job2 = antenna.add_job(tiny_images[4:5], "synthetic-moths")
    tasks2 = reserve(antenna, job2, 1)
    ok = RawResult({"reply_subject": tasks2[0].reply_subject, "result": {
        "pipeline": "synthetic-moths", "algorithms": {}, "total_time": 0.1,
        "source_images": [{"id": tasks2[0].image_id, "url": tasks2[0].image_url}], "detections": [],
        "errors": None}})
    antenna.set_faults("result", [413])
    poster.submit(job2, [ok])
    assert poster.flush(timeout_s=20)
    assert antenna.report(job2).results_error == 1 and poster.counters.replaced_items == 1


@pytest.mark.timeout(60)
def test_a_corrupt_truncated_or_empty_spool_file_is_quarantined_and_replay_goes_on(
        antenna, tiny_images, tmp_path, caplog):
    job = antenna.add_job(tiny_images[:2], "synthetic-moths")
    spool = Spool(tmp_path / "spool")
    good = spool.write(job, items_of(error_items(reserve(antenna, job, 2))))
    text = good.read_text()
    (spool.directory / "1-1-aaaaaaaa.json").write_text(text[: len(text) // 2])  # truncated
    (spool.directory / "2-1-bbbbbbbb.json").write_text("")  # empty
    (spool.directory / "3-1-cccccccc.json").write_text('{"job_id": "x", "results": 5}')  # wrong shape
    stale = spool.directory / "4-1-dddddddd.tmp"
    stale.write_text("{")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    caplog.set_level(logging.INFO, logger="worker.posting")
    poster = make_poster(antenna, tmp_path)
    assert poster.replay_spool() == 2 and antenna.report(job).results_error == 2
    assert spool.files() == [] and not stale.exists()
    assert sorted(p.name for p in (spool.directory / "corrupt").iterdir()) == [
        "1-1-aaaaaaaa.json", "2-1-bbbbbbbb.json", "3-1-cccccccc.json"]
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 3
    assert poster.counters.corrupt_spool_files == 3


@pytest.mark.timeout(60)
def test_a_spool_that_cannot_be_written_is_an_error_counted_and_its_tasks_stranded(
        antenna, tiny_images, tmp_path, caplog):
    job = antenna.add_job(tiny_images[:3], "synthetic-moths")
    tasks = reserve(antenna, job, 3)
    (tmp_path / "spool").write_text("a file where the spool directory should be")  # ENOTDIR, even as root
    antenna.set_unavailable(True)
    poster = make_poster(antenna, tmp_path)
    caplog.set_level(logging.INFO, logger="worker.posting")
    poster.submit(job, error_items(tasks))
    assert poster.flush(timeout_s=20)
    assert poster.counters.spool_failed_items == 3 and poster.counters.spooled_items == 0
    assert poster.take_stranded(job) == 3 and poster.take_stranded(job) == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "stranded" in errors[0] and "crashed" not in caplog.text


@pytest.mark.timeout(60)
def test_a_400_for_every_item_holds_the_results_and_stops_posting_for_that_job(
        antenna, tiny_images, tmp_path, caplog):
    job = antenna.add_job(tiny_images[:16], "synthetic-moths")
    tasks = reserve(antenna, job, 16)
    cause = "algorithm key 'moth-classifier' is not registered for pipeline 'synthetic-moths'"
    antenna.reject_all_results(job, cause)
    poster = make_poster(antenna, tmp_path)
    caplog.set_level(logging.INFO, logger="worker.posting")
    poster.submit(job, error_items(tasks[:8]))
    assert poster.flush(timeout_s=20)
    poster.submit(job, error_items(tasks[8:]))
    assert poster.flush(timeout_s=20)
    report = antenna.report(job)
    assert report.results_error == 0 and report.rejected_posts == 3  # the body, then both halves
    assert poster.counters.replaced_items == 0 and poster.counters.spooled_items == 16
    assert cause in poster.rejected_jobs[job]
    assert Spool(tmp_path / "spool").rejections() == {job: poster.rejected_jobs[job]}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and cause in errors[0]
    # The cause fixed, the next start replays everything and clears the record.
    antenna.reject_all_results(job, None)
    assert make_poster(antenna, tmp_path).replay_spool() == 16
    assert antenna.report(job).results_error == 16 and Spool(tmp_path / "spool").rejections() == {}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [401, 403])
def test_an_auth_failure_on_results_keeps_them_spooled(antenna, tiny_images, tmp_path, caplog, status):
    job = antenna.add_job(tiny_images[:2], "synthetic-moths")
    tasks = reserve(antenna, job, 2)
    antenna.set_faults("result", [status])
    poster = make_poster(antenna, tmp_path)
    caplog.set_level(logging.INFO, logger="worker.posting")
    poster.submit(job, error_items(tasks))
    assert poster.flush(timeout_s=20)
    assert poster.counters.spooled_items == 2 and poster.client.auth_rejected
    assert antenna.report(job).results_error == 0
    if status == 403:
        assert "superuser" in caplog.text
    assert make_poster(antenna, tmp_path).replay_spool() == 2 and antenna.report(job).results_error == 2


@pytest.mark.timeout(30)
def test_close_after_a_missed_flush_deadline_stops_the_retries_and_spools_at_once(antenna, tiny_images, tmp_path):
    """Failed before: close() waited for every retry of the posts still in flight (here 20 attempts
    with real backoff, minutes), so the drain overran its grace."""
    job = antenna.add_job(tiny_images[:2], "synthetic-moths")
    tasks = reserve(antenna, job, 2)
    antenna.set_unavailable(True)
    client = AntennaClient(antenna.base_url, TOKEN, timeout_s=5.0, max_attempts=20, backoff_cap_s=30.0)
    poster = ResultPoster(client, Spool(tmp_path / "spool"))
    poster.submit(job, error_items(tasks))
    assert poster.flush(timeout_s=0.3) is False
    started_s = time.monotonic()
    poster.close()
    assert time.monotonic() - started_s < 5.0
    assert poster.counters.spooled_items == 2 and len(spool_files(tmp_path)) == 1


class GhostSpool(Spool):
    """A TEST DOUBLE of the spool whose listing names one file that is gone by the time it is read
    (another replayer posted and removed it): the race cannot be timed with real processes."""

    def files(self) -> list:
        return sorted([*super().files(), self.directory / "0-9-vanished.json"])


@pytest.mark.timeout(30)
def test_a_spool_file_that_vanished_before_its_replay_is_skipped(antenna, tiny_images, tmp_path):
    """Failed before: FileNotFoundError out of replay_spool (at start: exit 1)."""
    job = antenna.add_job(tiny_images[:2], "synthetic-moths")
    spool = GhostSpool(tmp_path / "spool")
    spool.write(job, items_of(error_items(reserve(antenna, job, 2))))
    client = AntennaClient(antenna.base_url, TOKEN, timeout_s=5.0, max_attempts=3, sleep=lambda s: None)
    poster = ResultPoster(client, spool)
    assert poster.replay_spool() == 2 and antenna.report(job).results_error == 2
    assert poster.counters.corrupt_spool_files == 0


@pytest.mark.timeout(60)
def test_a_413_from_a_proxy_splits_the_body_and_lowers_the_cap(antenna_factory, tiny_images, tmp_path):
    server = antenna_factory(max_request_bytes=240 * 1024)
    job = server.add_job(tiny_images[:12], "synthetic-moths")
    tasks = AntennaClient(server.base_url, TOKEN).reserve_tasks(job, 12)
    poster = make_poster(server, tmp_path, max_post_bytes=4 * 1024 * 1024)  # the worker's cap is above the proxy's
    poster.submit(job, error_items(tasks[:6], "e" * 30000))  # ~180 KB: under the proxy limit, one body
    poster.submit(job, error_items(tasks[6:], "e" * 60000))  # ~360 KB: 413, then halves of ~180 KB
    assert poster.flush(timeout_s=30)
    report = server.report(job)
    assert report.results_error == 12 and report.complete
    assert poster.counters.spooled_items == 0 and poster.counters.replaced_items == 0
    assert poster.counters.posted_bodies == 3
    assert poster.max_post_bytes < 240 * 1024, "later bodies are cut under the limit the 413 revealed"
