"""The API client against the real local server: contract calls, retries, token hygiene."""
from __future__ import annotations

import http.server
import json
import logging
import os
import random
import threading
import time

import pytest

from tests.conftest import TOKEN
from worker.antenna import AntennaClient, AntennaRejected, AntennaUnavailable
from worker.backoff import backoff_delay_s


def client_for(server, sleeps: list[float] | None = None, **kwargs) -> AntennaClient:
    sleep = sleeps.append if sleeps is not None else (lambda s: None)
    return AntennaClient(server.base_url, TOKEN, timeout_s=5.0, sleep=sleep, **kwargs)


def test_backoff_is_bounded_exponential_with_jitter_and_honours_retry_after():
    rng = random.Random(1)
    delays = [backoff_delay_s(n, base_s=0.5, cap_s=8.0, rng=rng) for n in range(1, 12)]
    assert all(0 <= d <= min(8.0, 0.5 * 2 ** (n - 1)) for n, d in zip(range(1, 12), delays))
    assert len(set(delays)) == len(delays)
    assert backoff_delay_s(3, retry_after_s=2.5) == 2.5
    assert backoff_delay_s(3, retry_after_s=99.0, cap_s=30.0) == 30.0


@pytest.mark.timeout(30)
def test_list_reserve_post_register(antenna, tiny_images):
    job = antenna.add_job(tiny_images[:3], "synthetic-moths")
    client = client_for(antenna)
    jobs = client.list_jobs(["synthetic-moths"])
    assert [(j.id, j.pipeline_slug) for j in jobs] == [(job, "synthetic-moths")]
    assert client.list_jobs(["other"]) == []
    tasks = client.reserve_tasks(job, 2, {"hostname": "h"})
    assert len(tasks) == 2 and tasks[0].reply_subject.startswith("$JS.ACK.")
    assert antenna.reservations[-1]["client_info"] == {"hostname": "h"}
    items = [{"reply_subject": t.reply_subject, "result": {"error": "x", "image_id": t.image_id}} for t in tasks]
    body = client.post_results(job, items)
    assert body["status"] == "accepted" and body["results_queued"] == 2
    projects = client.list_projects()
    client.register_pipelines(int(projects[0]["id"]), "svc", [{
        "name": "n", "slug": "s", "version": 1, "algorithms": [{"name": "a", "key": "k", "task_type": "detection"}]}])
    assert antenna.registered and antenna.registered[0]["processing_service_name"].startswith("svc (")


@pytest.mark.timeout(30)
def test_429_and_503_bursts_are_retried_with_retry_after(antenna, tiny_images):
    job = antenna.add_job(tiny_images[:2], "synthetic-moths")
    sleeps: list[float] = []
    client = client_for(antenna, sleeps, max_attempts=5)
    antenna.set_faults("tasks", [503, 429, 503], retry_after_s=0.7)
    tasks = client.reserve_tasks(job, 2)
    assert len(tasks) == 2 and len(sleeps) == 3 and 0.7 in sleeps
    antenna.set_faults("result", [502, 429], retry_after_s=0.2)
    client.post_results(job, [{"reply_subject": t.reply_subject,
                               "result": {"error": "e", "image_id": t.image_id}} for t in tasks])
    assert len(sleeps) == 5 and antenna.report(job).results_error == 2


@pytest.mark.timeout(30)
def test_gives_up_after_max_attempts_and_400_is_not_retried(antenna, tiny_images):
    job = antenna.add_job(tiny_images[:1], "synthetic-moths")
    sleeps: list[float] = []
    client = client_for(antenna, sleeps, max_attempts=3)
    antenna.set_faults("tasks", [503] * 3)
    with pytest.raises(AntennaUnavailable):
        client.reserve_tasks(job, 1)
    assert len(sleeps) == 2
    with pytest.raises(AntennaRejected) as rejected:
        client.reserve_tasks(job, 0)
    assert rejected.value.status == 400 and len(sleeps) == 2


@pytest.mark.timeout(30)
def test_connection_refused_is_retried_then_unavailable(antenna):
    port = antenna.port
    antenna.stop()
    sleeps: list[float] = []
    client = AntennaClient(f"http://127.0.0.1:{port}/api/v2", TOKEN, timeout_s=1.0, max_attempts=3,
                           sleep=sleeps.append)
    with pytest.raises(AntennaUnavailable):
        client.list_jobs(["x"])
    assert len(sleeps) == 2


@pytest.mark.timeout(30)
def test_wrong_token_is_rejected_401_and_token_never_logged(antenna, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AntennaRejected) as rejected:
        AntennaClient(antenna.base_url, "wrong-token-value", sleep=lambda s: None).list_jobs(["x"])
    assert rejected.value.status == 401
    antenna.set_faults("jobs", [503, 503])
    client_for(antenna).list_jobs(["x"])
    assert "wrong-token-value" not in caplog.text and TOKEN not in caplog.text
    assert "retry in" in caplog.text


@pytest.mark.timeout(30)
def test_list_projects_follows_every_page(antenna_factory):
    antenna = antenna_factory(project_count=12)  # the server pages /projects/ 10 at a time
    projects = client_for(antenna).list_projects()
    assert sorted(int(p["id"]) for p in projects) == list(range(1, 13))


@pytest.mark.timeout(120)
@pytest.mark.timeout(30)
def test_a_job_listing_follows_next_when_asked(antenna, tiny_images):
    jobs = [antenna.add_job(tiny_images[i:i + 1], "null") for i in range(5)]
    antenna.set_job_page_cap(2)  # the server's max_limit: pages of 2, whatever limit asks
    client = client_for(antenna)
    assert [j.id for j in client.list_jobs(["null"], limit=1000)] == jobs[:2]
    assert [j.id for j in client.list_jobs(["null"], limit=1000, every_page=True)] == jobs


@pytest.mark.timeout(30)
def test_listings_follow_next_behind_a_proxy_that_adds_a_path_prefix(antenna_factory, tiny_images):
    """The API configured as /antenna/api/v2 through a proxy that strips the prefix: the server writes
    its page links without it. Before, the client followed none of them: 10 of 12 projects, 2 of 5
    jobs, one WARNING line each."""
    antenna = antenna_factory(project_count=12, proxy_prefix="/antenna")
    jobs = [antenna.add_job(tiny_images[i:i + 1], "null") for i in range(5)]
    antenna.set_job_page_cap(2)
    client = AntennaClient(antenna.origin + "/antenna/api/v2", TOKEN, timeout_s=5.0, sleep=lambda s: None)
    assert sorted(int(p["id"]) for p in client.list_projects()) == list(range(1, 13))
    assert [j.id for j in client.list_jobs(["null"], limit=1000, every_page=True)] == jobs


@pytest.mark.timeout(30)
def test_a_post_redirected_into_a_get_is_refused_naming_where_it_was_sent(antenna_factory, tiny_images):
    """A base URL the server redirects (a moved site, http to https): a GET follows the 301, but a
    POST followed there becomes a GET. Before, a reserve or result post failed as HTTP 405 'Method
    GET not allowed', naming neither the redirect nor the setting."""
    antenna = antenna_factory(proxy_prefix="/moved", redirect_api_to="/moved")  # /api/v2 -> /moved/api/v2
    job = antenna.add_job(tiny_images[:1], "null")
    client = AntennaClient(antenna.base_url, TOKEN, timeout_s=5.0, sleep=lambda s: None)
    assert [j.id for j in client.list_jobs(["null"])] == [job]
    for call in (lambda: client.reserve_tasks(job, 1), lambda: client.post_results(job, [])):
        with pytest.raises(AntennaRejected) as rejected:
            call()
        text = str(rejected.value)
        assert rejected.value.status == 301 and f"/moved/api/v2/jobs/{job}/" in text, text
        assert "AMI_ANTENNA_API_BASE_URL" in text and len(text.splitlines()) == 1
    assert antenna.reservations == [] and antenna.result_posts == []


@pytest.mark.timeout(30)
def test_a_redirect_to_another_origin_is_refused_naming_it_not_blamed_on_the_token(antenna_factory, tiny_images):
    """The client sends the token to the configured origin only, so a redirect to another one is
    answered 401 there. Before, that read as 'the API rejected the token' (an auth failure, the
    token backoff, --burst exit 3) for a token that was never sent."""
    real = antenna_factory()
    real.add_job(tiny_images[:1], "null")
    moved = antenna_factory(redirect_api_to=real.origin)
    client = AntennaClient(moved.base_url, TOKEN, timeout_s=5.0, sleep=lambda s: None)
    with pytest.raises(AntennaRejected) as rejected:
        client.list_jobs(["null"])
    text = str(rejected.value)
    assert rejected.value.status == 301 and not rejected.value.auth, text
    assert f"{real.base_url}/jobs/" in text and "AMI_ANTENNA_API_BASE_URL" in text
    assert not client.auth_rejected and client.auth_failures_total == 0


def test_register_registers_with_projects_on_every_page(antenna_factory, tmp_path):
    import subprocess

    from tests.worker.worker_process import worker_command

    antenna = antenna_factory(project_count=12)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMI_")}
    env.update(AMI_ANTENNA_API_BASE_URL=antenna.base_url, AMI_ANTENNA_API_AUTH_TOKEN=TOKEN,
               AMI_ANTENNA_PIPELINES="null", AMI_METRICS_ADDR="")
    done = subprocess.run(worker_command("register"), env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=100)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(antenna.registered_projects) == list(range(1, 13))


# --- failure paths (issue 14 items 6, 10, 11): each fails on a client that let requests errors and
# --- malformed bodies escape, retried every reserve, or said nothing of 403's superuser need.

def _error_items(tasks) -> list[dict]:
    return [{"reply_subject": t.reply_subject, "result": {"error": "e", "image_id": t.image_id}} for t in tasks]


@pytest.mark.timeout(30)
def test_a_reset_mid_response_on_a_listing_is_retried(antenna, tiny_images):
    job = antenna.add_job(tiny_images[:1], "synthetic-moths")
    sleeps: list[float] = []
    antenna.set_response_faults("jobs", ["reset"])
    assert [j.id for j in client_for(antenna, sleeps).list_jobs(["synthetic-moths"])] == [job]
    assert len(sleeps) == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["malformed", "misshapen", "empty"])
def test_a_broken_listing_is_unavailable_never_a_crash(antenna, tiny_images, kind):
    """"empty" (a 200 with no body): before, read as a listing of no job, so a burst exited 0."""
    antenna.add_job(tiny_images[:1], "synthetic-moths")
    sleeps: list[float] = []
    antenna.set_response_faults("jobs", [kind] * 2)
    with pytest.raises(AntennaUnavailable) as unavailable:
        client_for(antenna, sleeps, max_attempts=2).list_jobs(["synthetic-moths"])
    assert unavailable.value.reason == "bad_response" and len(sleeps) == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fault", ["502", "504", "reset", "malformed", "misshapen"])
def test_a_reserve_that_may_have_reserved_is_never_retried(antenna, tiny_images, fault):
    job = antenna.add_job(tiny_images[:4], "synthetic-moths")
    sleeps: list[float] = []
    if fault.isdigit():
        antenna.set_faults("tasks", [int(fault)])
    else:
        antenna.set_response_faults("tasks", [fault])
    with pytest.raises(AntennaUnavailable):
        client_for(antenna, sleeps, max_attempts=4).reserve_tasks(job, 2)
    assert sleeps == [] and len(antenna.reservations) == (0 if fault.isdigit() else 1)


@pytest.mark.timeout(30)
def test_a_reserve_read_timeout_is_not_retried_and_the_server_did_reserve(antenna, tiny_images):
    job = antenna.add_job(tiny_images[:4], "synthetic-moths")
    antenna.set_network(latency_s=1.0)
    sleeps: list[float] = []
    client = AntennaClient(antenna.base_url, TOKEN, timeout_s=0.4, max_attempts=4, sleep=sleeps.append)
    with pytest.raises(AntennaUnavailable) as unavailable:
        client.reserve_tasks(job, 2)
    assert unavailable.value.reason == "read_timeout" and sleeps == []
    antenna.set_network(latency_s=0.0)
    deadline_s = time.monotonic() + 5
    while not antenna.reservations and time.monotonic() < deadline_s:
        time.sleep(0.05)
    assert len(antenna.reservations) == 1 and antenna.report(job).reserved == 2


@pytest.mark.timeout(30)
def test_a_reserve_refused_429_or_503_is_retried(antenna, tiny_images):
    job = antenna.add_job(tiny_images[:4], "synthetic-moths")
    sleeps: list[float] = []
    antenna.set_faults("tasks", [429, 503], retry_after_s=0.1)
    assert len(client_for(antenna, sleeps, max_attempts=4).reserve_tasks(job, 2)) == 2
    assert len(sleeps) == 2 and len(antenna.reservations) == 1


@pytest.mark.timeout(30)
def test_a_result_post_answered_200_with_a_broken_body_counts_as_posted(antenna, tiny_images):
    job = antenna.add_job(tiny_images[:2], "synthetic-moths")
    client = client_for(antenna)
    tasks = client.reserve_tasks(job, 2)
    antenna.set_response_faults("result", ["malformed"])
    client.post_results(job, _error_items(tasks))
    report = antenna.report(job)
    assert report.results_error == 2 and report.duplicates == 0


@pytest.mark.timeout(30)
def test_a_result_post_reset_mid_response_is_retried_and_the_repeat_is_a_harmless_duplicate(antenna, tiny_images):
    job = antenna.add_job(tiny_images[:2], "synthetic-moths")
    sleeps: list[float] = []
    client = client_for(antenna, sleeps)
    tasks = client.reserve_tasks(job, 2)
    antenna.set_response_faults("result", ["reset"])
    client.post_results(job, _error_items(tasks))
    report = antenna.report(job)
    assert len(sleeps) == 1 and report.results_error == 2 and report.duplicates == 2


@pytest.mark.timeout(30)
def test_auth_failures_carry_their_reason_and_403_on_tasks_names_the_superuser_need(antenna, tiny_images):
    job = antenna.add_job(tiny_images[:2], "synthetic-moths")
    client = client_for(antenna)
    antenna.set_faults("jobs", [401])
    with pytest.raises(AntennaRejected) as rejected:
        client.list_jobs(["synthetic-moths"])
    assert rejected.value.reason == "unauthorized" and client.auth_rejected and client.auth_failures_total == 1
    antenna.set_faults("tasks", [403])
    with pytest.raises(AntennaRejected) as forbidden:
        client.reserve_tasks(job, 1)
    assert forbidden.value.reason == "forbidden" and "superuser" in str(forbidden.value)
    assert len(str(forbidden.value).splitlines()) == 1 and client.auth_failures_total == 2
    client.list_jobs(["synthetic-moths"])
    assert not client.auth_rejected


@pytest.mark.timeout(30)
def test_a_netrc_entry_for_the_antenna_host_does_not_replace_the_token(antenna, tiny_images, loopback_netrc):
    """requests builds Basic credentials from ~/.netrc (``NETRC``) for a matching host and sends
    them instead of a session's Authorization header: the API then answered 401 to a worker whose
    operator keeps a netrc entry for the server."""
    job = antenna.add_job(tiny_images[:1], "synthetic-moths")
    client = client_for(antenna)
    assert len(client.reserve_tasks(job, 1)) == 1
    client.close()


def _reserve_answered(body: object, caplog) -> list:
    """``reserve_tasks`` against a one-route server that answers every reserve with ``body``."""
    payload = json.dumps(body).encode()

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (stdlib name)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    caplog.set_level(logging.WARNING, logger="worker.antenna")
    try:
        client = AntennaClient(f"http://127.0.0.1:{server.server_address[1]}/api/v2", TOKEN, timeout_s=5,
                               max_attempts=1, sleep=lambda s: None)
        return client.reserve_tasks(1, 4)
    finally:
        server.shutdown()
        server.server_close()


def test_a_reserve_keeps_its_good_rows_and_answers_the_broken_ones_it_can(caplog):
    good = {"id": "1", "image_id": "10", "image_url": "http://x/a.jpg", "reply_subject": "$JS.ACK.a",
            "problem": "a field of the server's own"}  # not read as the worker's own field
    tasks = _reserve_answered({"tasks": [
        good,
        {"id": 2, "image_id": 20, "image_url": "http://x/b.jpg", "reply_subject": "$JS.ACK.b"},  # numbers: read as text
        {"id": "3", "image_id": "30", "image_url": None, "reply_subject": "$JS.ACK.c"},
        {"id": "4", "image_url": "http://x/d.jpg", "reply_subject": "$JS.ACK.d"},
        {"id": None, "image_id": "60", "image_url": "http://x/f.jpg", "reply_subject": "$JS.ACK.f"},
        {"id": "5", "image_id": "50", "image_url": "http://x/e.jpg"},  # nothing to answer it by
        "not a row",
    ]}, caplog)
    assert [(t.id, t.image_id, t.image_url, t.reply_subject) for t in tasks] == [
        ("1", "10", "http://x/a.jpg", "$JS.ACK.a"), ("2", "20", "http://x/b.jpg", "$JS.ACK.b"),
        ("3", "30", "", "$JS.ACK.c"), ("4", "", "http://x/d.jpg", "$JS.ACK.d"),
        ("$JS.ACK.f", "60", "http://x/f.jpg", "$JS.ACK.f")]
    assert [t.problem for t in tasks] == [None, None, "the server sent this task malformed: image_url is null",
                                          "the server sent this task malformed: image_id is missing",
                                          "the server sent this task malformed: id is null"]
    assert "task row with image_id '30': image_url is null" in caplog.text
    assert "task row with image_id None: image_id is missing" in caplog.text
    assert "task row with image_id '60': id is null" in caplog.text
    assert caplog.text.count("has no reply_subject, so no result can answer it") == 2


@pytest.mark.parametrize("body", [{"tasks": [{"id": "5", "image_url": None}]}, {"status": "ok"}, {"tasks": {}}])
def test_a_reserve_answer_with_no_answerable_row_is_a_bad_response(body, caplog):
    with pytest.raises(AntennaUnavailable) as unavailable:
        _reserve_answered(body, caplog)
    assert unavailable.value.reason == "bad_response"
