"""The local Antenna server over real HTTP on loopback: the contract's semantics and its knobs."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
import simplejpeg
from PIL import Image

from worker.testing.antenna_server import (
    BOMB_SIDE_PX,
    IMAGE_FAULTS,
    LATE_ANSWER_S,
    TASK_QUEUE_DOWN,
    ImageSource,
    LocalAntenna,
    _Handler,
    _HTTPServer,
)
from worker.testing.synthetic import SyntheticImage, generate_preset

pytestmark = pytest.mark.timeout(60)

SLUG = "test_pipeline"
TOKEN = "local-token"
QUICK_TIMEOUT_S = 0.3


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticImage]:
    return generate_preset(tmp_path_factory.mktemp("synthetic"), "tiny", 6)


@pytest.fixture
def make_antenna(antenna_factory: Callable[..., LocalAntenna], tmp_path: Path) -> Callable[..., LocalAntenna]:
    """The shared factory (it stops every server), with this module's token and a private data dir."""

    def make(**kwargs: Any) -> LocalAntenna:
        kwargs.setdefault("data_dir", tmp_path / "data")
        kwargs.setdefault("token", TOKEN)
        kwargs.setdefault("rng_seed", None)
        return antenna_factory(**kwargs)

    return make


@pytest.fixture
def antenna(make_antenna: Callable[..., LocalAntenna]) -> LocalAntenna:
    return make_antenna(rng_seed=1)


@pytest.fixture
def api() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers["Authorization"] = f"Token {TOKEN}"
        yield session


def _jobs_query(**extra: Any) -> dict[str, Any]:
    return {"pipeline__slug__in": SLUG, "ids_only": 1, "incomplete_only": 1,
            "dispatch_mode": "async_api", **extra}


def _reserve(api: requests.Session, antenna: LocalAntenna, job_id: int, batch_size: int) -> list[dict]:
    response = api.post(f"{antenna.base_url}/jobs/{job_id}/tasks/", json={"batch_size": batch_size})
    assert response.status_code == 200, response.text
    return response.json()["tasks"]


def _post(api: requests.Session, antenna: LocalAntenna, job_id: int, items: list[dict]) -> requests.Response:
    return api.post(f"{antenna.base_url}/jobs/{job_id}/result/", json={"results": items})


def _ok(task: dict, image_id: str | None = None) -> dict:
    image_id = image_id or task["image_id"]
    algorithm = {"name": "Test detector", "key": "test-detector"}
    detection = {"source_image_id": image_id, "bbox": {"x1": 1.0, "y1": 2.0, "x2": 30.0, "y2": 40.0},
                 "inference_time": 0.01, "algorithm": algorithm, "timestamp": "2026-01-01T00:00:00+00:00",
                 "crop_image_url": None, "classifications": []}
    result = {"pipeline": SLUG, "algorithms": {}, "total_time": 0.1,
              "source_images": [{"id": image_id, "url": task["image_url"]}],
              "detections": [detection], "errors": None}
    return {"reply_subject": task["reply_subject"], "result": result}


def _error(task: dict, image_id: str | None = None) -> dict:
    return {"reply_subject": task["reply_subject"],
            "result": {"error": "could not decode", "image_id": image_id or task["image_id"]}}


# --------------------------------------------------------------------------- auth, routing


def test_api_needs_the_token_and_media_does_not(antenna: LocalAntenna, images: list) -> None:
    job_id = antenna.add_job(images[:1], SLUG)
    with requests.Session() as anonymous:
        missing = anonymous.get(f"{antenna.base_url}/jobs/", params=_jobs_query())
        wrong = anonymous.get(f"{antenna.base_url}/jobs/", params=_jobs_query(),
                              headers={"Authorization": "Token nope"})
        reserve = anonymous.post(f"{antenna.base_url}/jobs/{job_id}/tasks/", json={"batch_size": 1})
        assert [missing.status_code, wrong.status_code, reserve.status_code] == [401, 401, 401]
        assert "detail" in missing.json()
        assert antenna.report(job_id).delivered == 0
        url = f"{antenna.media_url}/"  # any media path answers without auth (404 here, not 401)
        assert anonymous.get(url + "nothing/here.jpg").status_code == 404


def test_a_reader_token_gets_403_on_tasks_and_results_after_the_reserve_body_is_validated(
        make_antenna: Callable[..., LocalAntenna], images: list) -> None:
    """As Antenna's views: the reserve validates ``batch_size`` before the job's permission (400 to any
    token), the result endpoint checks the permission before its body (403 whatever the body)."""
    antenna = make_antenna(reader_tokens=["reader"])
    job_id = antenna.add_job(images[:1], SLUG)
    with requests.Session() as reader:
        reader.headers["Authorization"] = "Token reader"
        tasks_url, result_url = (f"{antenna.base_url}/jobs/{job_id}/{name}/" for name in ("tasks", "result"))
        statuses = [reader.post(tasks_url, json={"batch_size": 0}).status_code,
                    reader.post(tasks_url, json={"batch_size": 1}).status_code,
                    reader.post(result_url, json={"results": []}).status_code,
                    reader.post(result_url, json={"bad": True}).status_code,
                    reader.get(f"{antenna.base_url}/jobs/", params=_jobs_query()).status_code]
    assert statuses == [400, 403, 403, 403, 200]
    assert antenna.report(job_id).delivered == 0 and antenna.reservations == []


def test_jobs_without_trailing_slash_redirects_with_the_query(antenna: LocalAntenna, api, images) -> None:
    antenna.add_job(images[:1], SLUG)
    response = api.get(f"{antenna.base_url}/jobs", params=_jobs_query(), allow_redirects=False)
    assert response.status_code == 301
    assert response.headers["Location"].startswith("/api/v2/jobs/?")
    assert "pipeline__slug__in=" + SLUG in response.headers["Location"]
    followed = api.get(f"{antenna.base_url}/jobs", params=_jobs_query())
    assert followed.status_code == 200 and followed.json()["results"][0]["pipeline_slug"] == SLUG
    not_slashed_post = api.post(f"{antenna.base_url}/jobs/1/tasks", json={"batch_size": 1})
    assert not_slashed_post.status_code == 404


def test_ids_only_hands_out_one_random_incomplete_job(antenna: LocalAntenna, api, images) -> None:
    ours = {antenna.add_job(images[:1], SLUG) for _ in range(3)}
    antenna.add_job(images[:1], "other_pipeline")
    antenna.add_job(images[:1], SLUG, dispatch_mode="sync_api")
    seen = set()
    for _ in range(40):
        body = api.get(f"{antenna.base_url}/jobs/", params=_jobs_query()).json()
        assert set(body) == {"count", "next", "previous", "results"}
        assert len(body["results"]) == 1
        seen.add(body["results"][0]["id"])
    assert seen == ours, "ids_only without limit should pick at random among all matching jobs"
    limited = api.get(f"{antenna.base_url}/jobs/", params=_jobs_query(limit=2)).json()
    assert len(limited["results"]) == 2 and {r["id"] for r in limited["results"]} <= ours
    none = api.get(f"{antenna.base_url}/jobs/", params=_jobs_query(pipeline__slug__in="nope")).json()
    assert none["results"] == [] and none["count"] == 0


# --------------------------------------------------------------------------- reserve


def test_reserve_hands_out_at_most_n_then_nothing(antenna: LocalAntenna, api, images) -> None:
    job_id = antenna.add_job(images[:5], SLUG)
    url = f"{antenna.base_url}/jobs/{job_id}/tasks/"
    first = api.post(url, json={"batch_size": 3, "client_info": {"hostname": "h1", "pid": 7}}).json()["tasks"]
    second = _reserve(api, antenna, job_id, 3)
    assert [len(first), len(second)] == [3, 2]
    assert _reserve(api, antenna, job_id, 3) == [], "everything is reserved"
    tasks = first + second
    assert {t["image_id"] for t in tasks} == {i.image_id for i in images[:5]}
    assert len({t["reply_subject"] for t in tasks}) == 5
    assert all(t["reply_subject"].startswith(f"$JS.ACK.job_{job_id}.") for t in tasks)
    assert all(set(t) == {"id", "image_id", "image_url", "reply_subject"} for t in tasks)
    assert antenna.reservations[0]["client_info"] == {"hostname": "h1", "pid": 7}
    report = antenna.report(job_id)
    assert (report.delivered, report.reserved, report.pending, report.redeliveries) == (5, 5, 0, 0)


@pytest.mark.parametrize("body", [{"batch_size": 0}, {}, {"batch_size": "3"}, {"batch_size": True},
                                  {"batch_size": -1}, {"batch_size": 1.5}])
def test_reserve_rejects_a_bad_batch_size(antenna: LocalAntenna, api, images, body) -> None:
    job_id = antenna.add_job(images[:2], SLUG)
    response = api.post(f"{antenna.base_url}/jobs/{job_id}/tasks/", json=body)
    assert response.status_code == 400
    assert antenna.report(job_id).delivered == 0


def test_reserve_rejects_unknown_and_sync_jobs(antenna: LocalAntenna, api, images) -> None:
    sync_id = antenna.add_job(images[:2], SLUG, dispatch_mode="sync_api")
    assert api.post(f"{antenna.base_url}/jobs/999/tasks/", json={"batch_size": 1}).status_code == 404
    response = api.post(f"{antenna.base_url}/jobs/{sync_id}/tasks/", json={"batch_size": 1})
    assert response.status_code == 400 and "async_api" in response.json()["detail"]


def test_expired_reservations_are_redelivered_then_lost(make_antenna, api, images) -> None:
    antenna = make_antenna(reservation_timeout_s=QUICK_TIMEOUT_S, max_deliveries=2)
    job_id = antenna.add_job(images[:3], SLUG)
    first = _reserve(api, antenna, job_id, 2)
    assert len(_reserve(api, antenna, job_id, 5)) == 1, "only the never-delivered task is left"
    time.sleep(QUICK_TIMEOUT_S + 0.15)
    again = _reserve(api, antenna, job_id, 5)
    # All three reservations (two from the first call, one from the second) have expired.
    assert len(again) == 3 and {t["id"] for t in first} < {t["id"] for t in again}
    assert not {t["reply_subject"] for t in again} & {t["reply_subject"] for t in first}
    report = antenna.report(job_id)
    assert (report.delivered, report.redeliveries, report.reserved, report.lost) == (6, 3, 3, 0)

    time.sleep(QUICK_TIMEOUT_S + 0.15)
    assert _reserve(api, antenna, job_id, 5) == [], "two deliveries used: nothing is redelivered"
    report = antenna.report(job_id)
    assert (report.lost, report.reserved, report.complete, report.settled) == (3, 0, False, True)
    listed = api.get(f"{antenna.base_url}/jobs/", params=_jobs_query()).json()["results"]
    assert listed == [], "a settled job is no longer listed as incomplete"

    # A late result on a stale (first-delivery) subject still counts while the task has none.
    assert _post(api, antenna, job_id, [_error(first[0])]).status_code == 200
    report = antenna.report(job_id)
    assert (report.lost, report.results_error) == (2, 1)


# --------------------------------------------------------------------------- results


def test_results_are_accepted_all_or_nothing_and_duplicates_are_harmless(antenna, api, images) -> None:
    job_id = antenna.add_job(images[:3], SLUG)
    tasks = _reserve(api, antenna, job_id, 3)

    accepted = _post(api, antenna, job_id, [_ok(tasks[0]), _error(tasks[1])])
    assert accepted.status_code == 200
    body = accepted.json()
    assert (body["status"], body["job_id"], body["results_queued"]) == ("accepted", job_id, 2)
    assert body["tasks"] == [{"reply_subject": t["reply_subject"], "status": "queued", "task_id": t["id"]}
                             for t in tasks[:2]]

    bad_shape = {"reply_subject": tasks[2]["reply_subject"], "result": {"pipeline": SLUG}}
    for items, index in [([_ok(tasks[2]), bad_shape], 1),
                         ([_error(tasks[2], image_id="someone-else")], 0),
                         ([_ok(tasks[2]), _ok(tasks[2], image_id="someone-else")], 1),
                         ([_ok(tasks[2]), {"reply_subject": "$JS.ACK.forged", "result": _error(tasks[2])["result"]}], 1),
                         ([_ok(tasks[2]), {"result": _error(tasks[2])["result"]}], 1)]:
        rejected = _post(api, antenna, job_id, items)
        assert rejected.status_code == 400, items
        assert f"results[{index}]" in rejected.json()["detail"]
    report = antenna.report(job_id)
    assert (report.results_ok, report.results_error, report.rejected_posts, report.complete) == (1, 1, 5, False)

    assert _post(api, antenna, job_id, [_ok(tasks[2])]).status_code == 200
    assert _post(api, antenna, job_id, [_ok(tasks[0]), _ok(tasks[2])]).status_code == 200
    report = antenna.report(job_id)
    assert (report.results_ok, report.results_error, report.duplicates) == (2, 1, 2)
    assert report.complete and report.settled
    assert len(antenna.result_posts) == 8, "every POST body is kept, accepted or not"
    assert api.get(f"{antenna.base_url}/jobs/", params=_jobs_query()).json()["results"] == []


def _over_the_limit(make_antenna, api, images) -> tuple[LocalAntenna, int, dict, dict]:
    """A server capping bodies at 2 KiB, a job, its reserved task and an error result over the cap."""
    antenna = make_antenna(max_request_bytes=2048)
    job_id = antenna.add_job(images[:1], SLUG)
    task = _reserve(api, antenna, job_id, 1)[0]
    big = _error(task)
    big["result"]["error"] = "x" * 4096
    return antenna, job_id, task, big


def test_max_request_bytes_answers_413(make_antenna, api, images) -> None:
    antenna, job_id, task, big = _over_the_limit(make_antenna, api, images)
    refused = _post(api, antenna, job_id, [big])
    assert refused.status_code == 413
    # The server closes after a 413 and says so; else the next POST may go down the closed
    # connection and be lost (it was, once, in a busy CI run).
    assert refused.headers.get("Connection") == "close"
    assert _post(api, antenna, job_id, [_error(task)]).status_code == 200


def test_a_chunked_body_over_the_limit_answers_413_and_closes(make_antenna, api, images) -> None:
    antenna, job_id, task, big = _over_the_limit(make_antenna, api, images)
    body = json.dumps({"results": [big]}).encode()
    chunks = (body[start:start + 1024] for start in range(0, len(body), 1024))  # no length: chunked
    refused = api.post(f"{antenna.base_url}/jobs/{job_id}/result/", data=chunks,
                       headers={"Content-Type": "application/json"})
    assert refused.status_code == 413 and refused.headers.get("Connection") == "close"
    assert _post(api, antenna, job_id, [_error(task)]).status_code == 200


def test_a_chunked_body_over_the_limit_is_read_to_its_end_before_the_413(make_antenna, images) -> None:
    """Closing on unread bytes resets the connection, and a client still sending then sees the reset,
    not the 413: the server reads a modest chunked body to its end first, as for a sized one."""
    antenna = make_antenna(max_request_bytes=2048)
    job_id = antenna.add_job(images[:1], SLUG)
    head = (f"POST /api/v2/jobs/{job_id}/result/ HTTP/1.1\r\nHost: {antenna.host}\r\n"
            f"Authorization: Token {TOKEN}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"%x\r\n%s\r\n" % (1024, b" " * 1024)
    with socket.create_connection((antenna.host, antenna.port), timeout=10) as conn:
        conn.sendall(head + chunk * 3)  # past the limit, not yet at the body's end
        conn.settimeout(0.5)
        with pytest.raises(TimeoutError):
            conn.recv(1)  # the server is still reading
        conn.settimeout(10)
        conn.sendall(chunk + b"0\r\n\r\n")
        answer = b""
        while data := conn.recv(65536):  # to the server's close: a FIN, not a reset
            answer += data
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"Connection: close" in answer


def test_register_pipelines_validates_and_records(antenna: LocalAntenna, api) -> None:
    projects = api.get(f"{antenna.base_url}/projects/").json()
    assert projects["results"][0]["id"] == 1
    body = {"processing_service_name": "Test service (host)",
            "pipelines": [{"name": "Test", "slug": SLUG, "version": 1, "description": "",
                           "algorithms": [{"name": "Det", "key": "det", "task_type": "localization"}],
                           "stages": []}]}
    created = api.post(f"{antenna.base_url}/projects/1/pipelines/", json=body)
    assert created.status_code == 201 and created.json()["pipelines_created"] == [SLUG]
    assert api.post(f"{antenna.base_url}/projects/1/pipelines/", json=body).json()["pipelines_updated"] == [SLUG]
    assert api.post(f"{antenna.base_url}/projects/1/pipelines/", json={"pipelines": []}).status_code == 400
    assert api.post(f"{antenna.base_url}/projects/9/pipelines/", json=body).status_code == 404
    assert antenna.registered == [body, body]


# --------------------------------------------------------------------------- faults


def test_injected_statuses_come_in_order_then_normal(antenna: LocalAntenna, api, images) -> None:
    job_id = antenna.add_job(images[:2], SLUG)
    url = f"{antenna.base_url}/jobs/{job_id}/tasks/"
    antenna.set_faults("tasks", [503, 503])
    statuses = [api.post(url, json={"batch_size": 1}) for _ in range(3)]
    assert [r.status_code for r in statuses] == [503, 503, 200]
    assert statuses[0].json() == TASK_QUEUE_DOWN
    assert antenna.report(job_id).delivered == 1, "a refused reserve delivers nothing"

    antenna.set_faults("jobs", [429], retry_after_s=2)
    limited = api.get(f"{antenna.base_url}/jobs/", params=_jobs_query())
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "2")
    antenna.set_faults("result", [429], retry_after_s=0.5)
    assert api.post(f"{antenna.base_url}/jobs/{job_id}/result/", json={"results": []}).headers["Retry-After"] == "0.5"
    assert api.get(f"{antenna.base_url}/jobs/", params=_jobs_query()).status_code == 200
    with pytest.raises(ValueError):
        antenna.set_faults("nope", [500])


def test_unavailable_server_answers_503_but_serves_media(antenna: LocalAntenna, api, images) -> None:
    job_id = antenna.add_job(images[:1], SLUG)
    task = _reserve(api, antenna, job_id, 1)[0]
    antenna.set_unavailable(True)
    assert api.get(f"{antenna.base_url}/jobs/", params=_jobs_query()).status_code == 503
    assert _post(api, antenna, job_id, [_error(task)]).status_code == 503
    assert requests.get(task["image_url"], timeout=10).status_code == 200
    antenna.set_unavailable(False)
    assert _post(api, antenna, job_id, [_error(task)]).status_code == 200


def _fetch_fault(antenna: LocalAntenna, api, images, kind: str) -> tuple[dict, Any]:
    job_id = antenna.add_job(images[:2], SLUG, image_faults={images[0].image_id: kind})
    tasks = {t["image_id"]: t for t in _reserve(api, antenna, job_id, 2)}
    assert requests.get(tasks[images[1].image_id]["image_url"], timeout=10).status_code == 200
    task = tasks[images[0].image_id]
    try:
        return task, requests.get(task["image_url"], timeout=(5, 1.5))
    except requests.RequestException as exc:
        return task, exc


@pytest.mark.parametrize("kind", IMAGE_FAULTS)
def test_each_image_fault_serves_its_broken_body(antenna: LocalAntenna, api, images, kind: str) -> None:
    real = images[0].path.read_bytes()
    task, got = _fetch_fault(antenna, api, images, kind)
    if kind in ("reset", "slow", "drip"):
        # reset: RST mid-body; slow: headers, then a 5 s stall that outlasts the 1.5 s read timeout;
        # drip: one byte every 2 s, each read outlasting the 1.5 s read timeout too.
        broken = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
        assert isinstance(got, broken), got
        return
    assert isinstance(got, requests.Response)
    if kind == "404":
        assert got.status_code == 404
        return
    assert got.status_code == 200
    body = got.content
    if kind == "empty":
        assert body == b""
    elif kind == "html":
        assert got.headers["Content-Type"].startswith("text/html") and b"<html" in body
    elif kind == "truncated":
        assert body == real[: len(real) // 2]
    elif kind == "corrupt":
        assert body[:2] == b"\xff\xd8" and body != real
        with pytest.raises(Exception):
            Image.open(io.BytesIO(body)).load()
    elif kind == "bomb":
        height, width = simplejpeg.decode_jpeg_header(body)[:2]
        assert (height, width) == (BOMB_SIDE_PX, BOMB_SIDE_PX) and len(body) < 10_000


@pytest.mark.timeout(30)
def test_the_drip_fault_sends_the_real_body_one_byte_every_interval(antenna: LocalAntenna, api, images) -> None:
    from worker.testing.antenna_server import DRIP_INTERVAL_S

    job_id = antenna.add_job(images[:1], SLUG, image_faults={images[0].image_id: "drip"})
    task = _reserve(api, antenna, job_id, 1)[0]
    with requests.get(task["image_url"], stream=True, timeout=(5, DRIP_INTERVAL_S + 3)) as response:
        assert int(response.headers["Content-Length"]) == images[0].path.stat().st_size
        started_s = time.monotonic()
        first, second = response.raw.read(1), response.raw.read(1)
        took_s = time.monotonic() - started_s
    assert first + second == images[0].path.read_bytes()[:2]
    assert 2 * DRIP_INTERVAL_S - 0.5 <= took_s < 2 * DRIP_INTERVAL_S + 2


def test_faults_on_an_external_image_source_use_a_stand_in_jpeg(antenna: LocalAntenna, api) -> None:
    sources = [ImageSource("ext-1", "http://images.invalid/1.jpg")]
    job_id = antenna.add_job(sources, SLUG, image_faults={"ext-1": "truncated"})
    task = _reserve(api, antenna, job_id, 1)[0]
    assert task["image_url"].startswith(antenna.media_url)
    body = requests.get(task["image_url"], timeout=10).content
    assert body[:2] == b"\xff\xd8" and len(body) > 1000
    plain_id = antenna.add_job(sources, SLUG)
    assert _reserve(api, antenna, plain_id, 1)[0]["image_url"] == "http://images.invalid/1.jpg"


def test_add_job_rejects_bad_fault_specs(antenna: LocalAntenna, images) -> None:
    with pytest.raises(ValueError, match="unknown image faults"):
        antenna.add_job(images[:1], SLUG, image_faults={images[0].image_id: "melted"})
    with pytest.raises(ValueError, match="not in the job"):
        antenna.add_job(images[:1], SLUG, image_faults={"absent": "404"})


# --------------------------------------------------------------------------- media


def test_bandwidth_cap_slows_a_media_download(antenna: LocalAntenna, api, images) -> None:
    image = images[0]
    job_id = antenna.add_job([image], SLUG)
    url = _reserve(api, antenna, job_id, 1)[0]["image_url"]
    started_s = time.monotonic()
    fast = requests.get(url, timeout=10)
    fast_s = time.monotonic() - started_s

    bandwidth_bytes_per_s = image.jpeg_bytes / 0.5  # half a second's worth
    antenna.set_network(bandwidth_bytes_per_s=bandwidth_bytes_per_s)
    started_s = time.monotonic()
    slow = requests.get(url, timeout=10)
    slow_s = time.monotonic() - started_s

    assert fast.content == slow.content == image.path.read_bytes()
    # The cap sleeps after each slice until sent/bandwidth has elapsed: a hard lower bound.
    assert slow_s >= 0.9 * image.jpeg_bytes / bandwidth_bytes_per_s
    assert slow_s > 3 * fast_s
    assert antenna.report(job_id).media_bytes_served == 2 * image.jpeg_bytes


def test_media_requests_carrying_auth_are_counted(antenna: LocalAntenna, api, images) -> None:
    job_id = antenna.add_job(images[:1], SLUG)
    url = _reserve(api, antenna, job_id, 1)[0]["image_url"]
    assert api.get(url).status_code == 200  # the API session leaks its token to media
    assert api.get(url).status_code == 200
    assert requests.get(url, timeout=10).status_code == 200
    assert antenna.report(job_id).media_requests_with_auth == 2


def test_latency_is_added_to_api_calls(antenna: LocalAntenna, api) -> None:
    antenna.set_network(latency_s=0.3)
    started_s = time.monotonic()
    assert api.get(f"{antenna.base_url}/projects/").status_code == 200
    assert time.monotonic() - started_s >= 0.3


# --------------------------------------------------------------------------- control API, process


def test_control_api_drives_a_server(antenna: LocalAntenna, api) -> None:
    control = antenna.origin + "/_control"
    with requests.Session() as session:
        created = session.post(f"{control}/jobs", json={"preset": "tiny", "count": 2, "seed": 3,
                                                        "pipeline_slug": SLUG})
        assert created.status_code == 200
        job_id = created.json()["job_id"]
        task = _reserve(api, antenna, job_id, 1)[0]
        assert session.get(task["image_url"]).status_code == 200
        report = session.get(f"{control}/jobs/{job_id}/report").json()
        assert (report["tasks"], report["delivered"], report["reserved"]) == (2, 1, 1)
        assert session.get(f"{control}/jobs/99/report").status_code == 404

        assert session.post(f"{control}/faults", json={"endpoint": "tasks", "statuses": [503]}).ok
        assert api.post(f"{antenna.base_url}/jobs/{job_id}/tasks/", json={"batch_size": 1}).status_code == 503
        assert session.post(f"{control}/unavailable", json={"unavailable": True}).ok
        assert api.get(f"{antenna.base_url}/projects/").status_code == 503
        assert session.post(f"{control}/unavailable", json={"unavailable": False}).ok
        assert session.post(f"{control}/network", json={"latency_s": 0.0, "bandwidth_bytes_per_s": 1e6}).ok
        assert antenna.conditions.network.bandwidth_bytes_per_s == 1e6
        assert session.post(f"{control}/jobs", json={"preset": "nope", "pipeline_slug": SLUG}).status_code == 400


@pytest.mark.timeout(60)
def test_serve_antenna_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    script = ("import argparse, sys; from worker.testing.antenna_server import add_server_arguments, run_server; "
              "p = argparse.ArgumentParser(); add_server_arguments(p); sys.exit(run_server(p.parse_args()))")
    command = [sys.executable, "-c", script, "--port", "0", "--data-dir", str(tmp_path),
               "--job", "tiny:2", "--pipeline", SLUG, "--token", "t0k"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:"), line + process.stderr.read()
        base_url = line.split()[1]
        with requests.Session() as session:
            session.headers["Authorization"] = "Token t0k"
            jobs = session.get(f"{base_url}/jobs/", params=_jobs_query()).json()["results"]
            assert jobs == [{"id": 1, "pipeline_slug": SLUG}]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def test_a_mounted_directory_is_served_by_relative_path(antenna: LocalAntenna, tmp_path: Path) -> None:
    (tmp_path / "mirror" / "moths").mkdir(parents=True)
    (tmp_path / "mirror" / "moths" / "w 1.pt").write_bytes(b"\x00" * 1000)
    (tmp_path / "secret.txt").write_text("no")
    base = antenna.mount(tmp_path / "mirror")
    response = requests.get(f"{base}/moths/w%201.pt")
    assert response.status_code == 200 and response.headers["Content-Length"] == "1000"
    assert requests.get(f"{base}/moths/missing.pt").status_code == 404
    assert requests.get(f"{base}/..%2Fsecret.txt").status_code == 404


def test_worker_serve_antenna_takes_its_own_options(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "worker.cli", "--env-file", os.devnull, "serve-antenna", "--port", "0",
               "--data-dir", str(tmp_path), "--token", "t0k", "--require-registration", "--projects", "12"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path) as process:
        try:
            line = process.stdout.readline()
            assert line.startswith("serving http://127.0.0.1:"), line + process.stderr.read()
            second = requests.get(f"{line.split()[1]}/projects/?page=2", headers={"Authorization": "Token t0k"}).json()
            assert [p["id"] for p in second["results"]] == [11, 12]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()


# --- response and job faults (the reliability suite's knobs)

def test_response_faults_break_the_answer_after_the_work_is_done(antenna: LocalAntenna, api, images) -> None:
    job_id = antenna.add_job(images[:4], SLUG)
    antenna.set_response_faults("tasks", ["malformed", "misshapen", "reset"])
    first = api.post(f"{antenna.base_url}/jobs/{job_id}/tasks/", json={"batch_size": 1})
    with pytest.raises(ValueError):
        first.json()
    assert api.post(f"{antenna.base_url}/jobs/{job_id}/tasks/", json={"batch_size": 1}).json()["tasks"] == [
        {"unexpected": True}]
    with pytest.raises(requests.exceptions.RequestException):
        api.post(f"{antenna.base_url}/jobs/{job_id}/tasks/", json={"batch_size": 1})
    assert antenna.report(job_id).reserved == 3  # each call reserved before its answer broke
    assert len(_reserve(api, antenna, job_id, 1)) == 1
    with pytest.raises(ValueError, match="unknown response faults"):
        antenna.set_response_faults("tasks", ["teapot"])


def test_a_late_answer_is_whole_and_comes_after_the_work_is_done(antenna: LocalAntenna, api, images) -> None:
    job_id = antenna.add_job(images[:4], SLUG)
    antenna.set_response_faults("tasks", ["none", "late"])
    assert len(_reserve(api, antenna, job_id, 1)) == 1
    answered = []
    reserving = threading.Thread(target=lambda: answered.append(_reserve(api, antenna, job_id, 2)))
    reserving.start()
    reserving.join(timeout=LATE_ANSWER_S / 2)
    assert answered == [] and antenna.report(job_id).reserved == 3  # reserved, not yet answered
    reserving.join(timeout=LATE_ANSWER_S * 5)
    assert [len(tasks) for tasks in answered] == [2]


def test_a_deleted_job_answers_404_everywhere_and_leaves_the_listing(antenna: LocalAntenna, api, images) -> None:
    job_id = antenna.add_job(images[:3], SLUG)
    antenna.delete_job(job_id, after_results=1)
    tasks = _reserve(api, antenna, job_id, 2)
    items = [{"reply_subject": t["reply_subject"], "result": {"error": "e", "image_id": t["image_id"]}} for t in tasks]
    assert api.post(f"{antenna.base_url}/jobs/{job_id}/result/", json={"results": items[:1]}).status_code == 200
    assert api.post(f"{antenna.base_url}/jobs/{job_id}/result/", json={"results": items[1:]}).status_code == 404
    assert api.post(f"{antenna.base_url}/jobs/{job_id}/tasks/", json={"batch_size": 1}).status_code == 404
    assert api.get(f"{antenna.base_url}/jobs/", params=_jobs_query()).json()["results"] == []
    assert antenna.report(job_id).results_error == 1


def test_reject_all_results_answers_400_for_every_post_until_cleared(antenna: LocalAntenna, api, images) -> None:
    job_id = antenna.add_job(images[:2], SLUG)
    tasks = _reserve(api, antenna, job_id, 2)
    items = [{"reply_subject": t["reply_subject"], "result": {"error": "e", "image_id": t["image_id"]}} for t in tasks]
    antenna.reject_all_results(job_id, "algorithm key 'k' is not registered")
    for part in (items, items[:1], items[1:]):
        answer = api.post(f"{antenna.base_url}/jobs/{job_id}/result/", json={"results": part})
        assert answer.status_code == 400 and "algorithm key 'k'" in answer.json()["detail"]
    antenna.reject_all_results(job_id, None)
    assert api.post(f"{antenna.base_url}/jobs/{job_id}/result/", json={"results": items}).status_code == 200
    report = antenna.report(job_id)
    assert report.rejected_posts == 3 and report.results_error == 2


def test_a_burst_of_connections_waits_in_the_backlog_while_the_server_is_busy(tmp_path: Path) -> None:
    """Many lanes connect at once; a server thread busy for a moment must not drop their SYNs.

    socketserver's default backlog of 5 drops the sixth SYN, and the client's retry comes after
    1 s: a download with a 1 s connect timeout then failed as a timeout (seen in CI). The server
    here is built but not yet serving, so nothing is accepted while 32 clients connect."""
    server = _HTTPServer(("127.0.0.1", 0), _Handler, LocalAntenna())
    clients: list[socket.socket] = []
    try:
        for _ in range(32):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.settimeout(0.5)
            clients.append(client)
            client.connect(server.server_address)  # raises TimeoutError once the backlog is full
    finally:
        for client in clients:
            client.close()
        server.server_close()
    assert len(clients) == 32
