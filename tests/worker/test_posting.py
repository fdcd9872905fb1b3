"""Result posting against the real local server: byte caps, bisection of 400s, spool and replay."""
from __future__ import annotations

import json

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


@pytest.mark.timeout(60)
def test_one_result_over_the_proxy_limit_becomes_an_error_result(antenna_factory, tiny_images, tmp_path):
    server = antenna_factory(max_request_bytes=8 * 1024)
    job = server.add_job(tiny_images[:2], "synthetic-moths")
    tasks = AntennaClient(server.base_url, TOKEN).reserve_tasks(job, 2)
    poster = make_poster(server, tmp_path, max_post_bytes=1024 * 1024)
    wide = tasks[1]
    huge = RawResult({"reply_subject": wide.reply_subject, "result": {
        "pipeline": "synthetic-moths", "algorithms": {}, "total_time": 0.1,
        "source_images": [{"id": wide.image_id, "url": wide.image_url}],
        "detections": [{"source_image_id": wide.image_id, "bbox": {"x1": 0, "y1": 0, "x2": 1, "y2": 1},
                        "algorithm": {"name": "d", "key": "d"}, "timestamp": "2026-01-01T00:00:00",
                        "classifications": [{"classification": "c", "scores": [0.0001] * 4000,
                                             "algorithm": {"name": "c", "key": "c"},
                                             "timestamp": "2026-01-01T00:00:00"}]}]}})
    poster.submit(job, error_items(tasks[:1], "e" * 100) + [huge])
    assert poster.flush(timeout_s=30)
    report = server.report(job)
    assert report.results_error == 2 and report.complete and poster.counters.spooled_items == 0
    assert poster.counters.replaced_items == 1
    replaced = server.result_posts[-1]["results"][0]["result"]
    assert replaced["image_id"] == tasks[1].image_id and "413" in replaced["error"]
