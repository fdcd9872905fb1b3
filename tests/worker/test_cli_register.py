"""``worker register`` as a real subprocess against the local server (strict, as Antenna)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from tests.conftest import TOKEN, worker_env
from worker.app import build_worker
from worker.testing.synthetic import with_integer_ids


def run_register(server, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", "--env-file", os.devnull, "register"],
                          env=worker_env(server, tmp_path), capture_output=True, text=True, timeout=100,
                          cwd=tmp_path)


@pytest.mark.timeout(120)
def test_register_reaches_every_project_past_the_first_page_and_twice_changes_nothing(antenna_factory, tmp_path):
    server = antenna_factory(project_count=12, require_registration=True)
    done = run_register(server, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == [
        f"registered 2 pipelines with project {p}" for p in range(1, 13)]
    snapshot = server.registry.snapshot()
    assert {slug: p["projects"] for slug, p in snapshot["pipelines"].items()} == {
        "synthetic-moths": list(range(1, 13)), "null": list(range(1, 13))}
    again = run_register(server, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert server.registry.snapshot() == snapshot


@pytest.mark.timeout(120)
def test_a_registration_the_server_refuses_is_one_line_and_exit_3(antenna_factory, tmp_path):
    server = antenna_factory(require_registration=True)
    # Another service already holds the detector's (name, version) under another key.
    taken = {"processing_service_name": "other (host)", "pipelines": [{
        "name": "Other", "slug": "other", "version": 1, "algorithms": [
            {"name": "Synthetic moths (reference) detector", "key": "someone-elses-key", "task_type": "localization"}]}]}
    assert requests.post(f"{server.base_url}/projects/1/pipelines/", json=taken, timeout=10,
                         headers={"Authorization": f"Token {TOKEN}"}).status_code == 201
    done = run_register(server, tmp_path)
    assert done.returncode == 3, done.stderr[-2000:]  # EXIT_API_REJECTED
    assert "Traceback" not in done.stderr
    line = [text for text in done.stderr.splitlines() if text.startswith("worker:")]
    assert len(line) == 1 and "project 1" in line[0] and "HTTP 400" in line[0] and "(name, version)" in line[0]


@pytest.mark.timeout(120)
def test_a_token_that_sees_no_project_registers_nothing_and_says_so(antenna_factory, tmp_path):
    """Before: no line and exit 0, as if every project had the pipelines."""
    server = antenna_factory(project_count=0, require_registration=True)
    done = run_register(server, tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    line = [text for text in done.stderr.splitlines() if text.startswith("worker:")]
    assert len(line) == 1 and "no project" in line[0] and "--project" in line[0], done.stderr[-2000:]
    assert server.registered == [] and done.stdout == ""


@pytest.mark.timeout(120)
def test_without_registration_a_strict_server_saves_nothing(antenna_factory, settings_for, tiny_images):
    """What an operator who skips `worker register` sees on Antenna: every POST answered 200, the
    run ends well, and no result is saved; the tasks wait for redelivery (then are lost, as the
    server tests show)."""
    server = antenna_factory(require_registration=True)
    job = server.add_job(with_integer_ids(tiny_images[:3], first=77), "synthetic-moths")
    settings = settings_for(server, antenna_api_dataloader_num_workers=0, antenna_api_batch_size=3)
    worker = build_worker(settings, burst=True, middlewares=[])
    assert worker.run() == 0 and worker.poster.counters.posted_items == 3
    report = server.report(job)
    assert (report.results_ok, report.results_unsaved, report.rejected_posts) == (0, 3, 0)
    assert (report.reserved, report.complete) == (3, False)
    assert "'synthetic-moths' is not registered" in report.unsaved_reasons[0]


@pytest.mark.timeout(120)
def test_a_registration_over_the_proxys_body_cap_says_how_big_it_was_and_what_to_raise(antenna_factory, tmp_path):
    """ADC's wide classifiers make registration bodies of megabytes; nginx's default cap is 1 MB."""
    server = antenna_factory(require_registration=True, max_request_bytes=300)
    done = run_register(server, tmp_path)
    assert done.returncode == 3, done.stderr[-2000:]
    line = [text for text in done.stderr.splitlines() if text.startswith("worker:")]
    assert len(line) == 1 and "HTTP 413" in line[0], done.stderr[-2000:]
    assert "the registration body was" in line[0] and "client_max_body_size" in line[0]
    assert server.registered == []
