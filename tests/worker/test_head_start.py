"""The head start: tasks the probe reserves once its first image declares its size, handled by the
main process while the loader's lanes make their first downloads.

Against the real local Antenna server over loopback; the byte budget with real threads."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TOKEN, worker_env
from tests.worker.worker_process import WorkerProcess
from worker.antenna import AntennaClient
from worker.app import build_worker
from worker.head_start import ByteBudget, HeadStart
from worker.imaging import ImageError, download, image_session
from worker.loading import ImageLoader

PIPELINE = "synthetic-moths"
MB = 1_000_000
MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]


def loader(max_bytes: int = 100 * MB) -> ImageLoader:
    return ImageLoader(max_bytes=max_bytes, max_pixels=80_000_000, timeout_s=10.0, deadline_s=30.0)


@pytest.mark.timeout(180)
def test_every_head_start_task_gets_one_result_and_the_reserve_follows_the_probe(antenna, settings_for, tiny_images):
    job_id = antenna.add_job(tiny_images[:40], PIPELINE)
    settings = settings_for(antenna, autotune=True, antenna_pipelines=PIPELINE, autotune_probe_tasks=3,
                            autotune_head_start_tasks=8)
    worker = build_worker(settings, burst=True)
    assert worker.run() == 0

    report = antenna.report(job_id)
    assert (report.results_ok, report.results_error, report.lost, report.redeliveries) == (40, 0, 0, 0)
    probe, head_start = antenna.reservations[0], antenna.reservations[1]
    assert len(probe["task_ids"]) == 3
    assert head_start["batch_size"] == 8 and len(head_start["task_ids"]) == 8  # tiny images: the count binds
    posted = [item["reply_subject"] for post in antenna.result_posts for item in post["results"]]
    assert len(posted) == len(set(posted)) == 40


def _burst_with_probe_of_3(antenna, settings_for, images, **overrides):
    """A job of ``images``, one autotuned burst run (a probe of 3 tasks) with ``overrides``; the job's report."""
    job_id = antenna.add_job(images, PIPELINE)
    settings = settings_for(antenna, autotune=True, antenna_pipelines=PIPELINE, autotune_probe_tasks=3, **overrides)
    assert build_worker(settings, burst=True).run() == 0
    return antenna.report(job_id)


@pytest.mark.timeout(180)
def test_no_head_start_when_it_is_set_to_zero(antenna, settings_for, tiny_images):
    report = _burst_with_probe_of_3(antenna, settings_for, tiny_images[:20], autotune_head_start_tasks=0,
                                    antenna_api_batch_size=5)
    assert (report.results_ok, report.lost) == (20, 0)
    # after the probe's reserve, only the loader's lanes reserve (at the pinned 5 tasks)
    assert {reservation["batch_size"] for reservation in antenna.reservations[1:]} == {5}


def test_the_count_follows_the_byte_budget_and_the_first_image_size():
    head_start = HeadStart(loader(max_bytes=100 * MB), 64 * MB, wanted=64, reserve=lambda n: [])
    assert head_start.count_for(100_000) == 64  # small images: the wanted count binds
    assert head_start.count_for(23 * MB) == 2  # large ones: what the budget holds
    assert head_start.count_for(None) == 0  # undeclared: priced at the image size limit


HELD_BYTES_SCRIPT = """
import os
from watchdog.sampler import sample_tree
from worker.head_start import anonymous_buffer, anonymous_image
MIB = 1024 * 1024
before = sample_tree(os.getpid()).used_bytes
body = anonymous_buffer(32 * MIB)
body.write(b"\\xff" * (32 * MIB))
image = anonymous_image(2048, 2048)  # 12 MiB
image.fill_(1)
held = sample_tree(os.getpid()).used_bytes
del body, image
after = sample_tree(os.getpid()).used_bytes
print(held - before, held - after)
"""


def test_its_bodies_and_images_count_in_the_watchdogs_used_bytes():
    """The watchdog's reading without an owned cgroup (PSS less shmem, plus /dev/shm files) sees
    what the head start holds, and sees it go when the buffers go.

    In an interpreter of its own: this one's threads, left by earlier tests, free memory of their
    own between two readings (once 0.1 MiB, enough to read 43.9 MiB held for 44)."""
    done = subprocess.run([sys.executable, "-c", HELD_BYTES_SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rise, drop = (int(value) for value in done.stdout.split())
    assert rise >= 44 * MIB
    assert drop >= 40 * MIB


def test_the_byte_budget_holds_bodies_back_until_bytes_are_freed():
    budget = ByteBudget(10)
    budget.admit(6)
    admitted = threading.Event()

    def second() -> None:
        budget.admit(6)
        admitted.set()

    threading.Thread(target=second, daemon=True).start()
    assert not admitted.wait(0.5)  # 12 > 10: it waits
    budget.free(6)
    assert admitted.wait(10)
    assert budget.held_bytes == 6


def test_one_body_over_the_budget_is_admitted_when_nothing_is_held_and_close_ends_waits():
    budget = ByteBudget(10)
    budget.admit(25)  # alone: it would otherwise never load
    errors: list[BaseException] = []

    def waiting() -> None:
        try:
            budget.admit(1)
        except ImageError as error:
            errors.append(error)

    thread = threading.Thread(target=waiting, daemon=True)
    thread.start()
    budget.close()
    thread.join(10)
    assert not thread.is_alive() and len(errors) == 1


def test_waiting_for_the_budget_does_not_count_against_the_download_deadline(antenna, tiny_images):
    job_id = antenna.add_job(tiny_images[:1], PIPELINE)
    url = antenna.image_urls(job_id)[0]
    body = download(image_session(1), url, max_bytes=100 * MB, timeout_s=5.0, deadline_s=0.5,
                    admit=lambda declared: time.sleep(1.0))
    assert len(body) > 0


@pytest.mark.timeout(120)
def test_abandoned_it_returns_exactly_the_tasks_no_batch_carried(antenna, tiny_images):
    job_id = antenna.add_job(tiny_images[:12], PIPELINE)
    client = AntennaClient(antenna.base_url, TOKEN, timeout_s=10.0)
    antenna.set_network(latency_s=0.0, bandwidth_bytes_per_s=None, jitter_s=2.0, seed=1)  # a slow tail
    head_start = HeadStart(loader(), 64 * MB, wanted=12, reserve=lambda n: client.reserve_tasks(job_id, n, {}))
    head_start.begin(10_000)
    batches = head_start.batches(2)
    first = next(batches)
    batches.close()
    left = head_start.abandon()
    assert len(head_start.tasks) == 12
    carried = {item.task.id for item in first.items}
    assert len(carried) == 2
    assert {task.id for task in left} == {task.id for task in head_start.tasks} - carried
    assert head_start.settled and not head_start.done


def _start_tuned(antenna, tmp_path, **extra: str) -> WorkerProcess:
    # Each request waits 1 s and each image trickles at 20 KB/s: the head start's downloads are
    # still under way when its tasks reach the loop.
    antenna.set_network(latency_s=1.0, bandwidth_bytes_per_s=20_000)
    env = worker_env(antenna, tmp_path, AMI_AUTOTUNE="true", AMI_ANTENNA_PIPELINES=PIPELINE,
                     AMI_AUTOTUNE_PROBE_TASKS="2", AMI_AUTOTUNE_HEAD_START_TASKS="10", AMI_SHUTDOWN_GRACE_S="30",
                     **extra)
    return WorkerProcess(["run"], env, tmp_path)


def _done_and_stranded(worker: WorkerProcess, job_id: int) -> tuple[int, int]:
    line = worker.wait_for(rf"job {job_id}: (\d+) images .*, (\d+) stranded", 5)
    return int(line.group(1)), int(line.group(2))


def _stopped_during_the_head_start(antenna, tiny_images, tmp_path, *, forced: bool) -> tuple[int, int, int]:
    """(job, images done, stranded) of a job whose worker got SIGTERM (twice when ``forced``) as
    the head start's tasks reached the loop; the worker exited 0."""
    job_id = antenna.add_job(tiny_images[:40], PIPELINE)
    worker = _start_tuned(antenna, tmp_path)
    try:
        worker.wait_for(rf"job {job_id}: head start of 10 tasks", 120)
        worker.send(signal.SIGTERM)
        if forced:
            worker.wait_for(r"stop requested: draining", 10)
            worker.send(signal.SIGTERM)
        code = worker.wait(60 if forced else 90)
    finally:
        worker.kill()
    assert code == 0, worker.output[-3000:]
    return (job_id, *_done_and_stranded(worker, job_id))


@pytest.mark.timeout(240)
def test_a_drain_during_the_head_start_finishes_its_tasks(antenna, tiny_images, tmp_path):
    job_id, done, stranded = _stopped_during_the_head_start(antenna, tiny_images, tmp_path, forced=False)
    report = antenna.report(job_id)
    assert stranded == 0 and report.lost == 0
    assert report.results_ok + report.results_error == report.delivered == done >= 12  # probe + head start
    assert (report.reserved, report.redeliveries, report.duplicates) == (0, 0, 0)


@pytest.mark.timeout(240)
def test_forced_during_the_head_start_what_it_held_is_counted_stranded(antenna, tiny_images, tmp_path):
    job_id, done, stranded = _stopped_during_the_head_start(antenna, tiny_images, tmp_path, forced=True)
    report = antenna.report(job_id)
    assert stranded > 0, "the head start's downloads trickle: some were still held when forced"
    assert report.lost == 0
    assert report.results_ok + report.results_error == done
    assert report.reserved == stranded and report.delivered == done + stranded


def test_a_slow_pipeline_gets_a_smaller_head_start_and_an_unmeasured_one_none(settings_for, antenna):
    from types import SimpleNamespace

    from worker.pipelines import NullPipeline
    from worker.pipelines.base import _ONE_IMAGE_S
    from worker.planning import HEAD_START_MAX_BYTES, head_start_size

    settings = settings_for(antenna, autotune_head_start_tasks=64, antenna_reservation_timeout_s=300.0)
    worker = SimpleNamespace(settings=settings, limits=None)
    pipeline = NullPipeline(torch.device("cpu"))
    assert head_start_size(worker, pipeline) == (0, 0)  # its start-up time was never measured
    _ONE_IMAGE_S[pipeline] = 0.001
    tasks, bytes_ = head_start_size(worker, pipeline)
    assert tasks == 64 and 0 < bytes_ <= HEAD_START_MAX_BYTES
    _ONE_IMAGE_S[pipeline] = 2.0  # 4 x 2 s per image within 30 s of the 300 s timeout: 3 tasks
    assert head_start_size(worker, pipeline)[0] == 3


def test_a_pinned_reserve_size_caps_the_head_start(settings_for, antenna):
    """AMI_ANTENNA_API_BATCH_SIZE is ADC's tasks per reserve: set, the head start's reserve, like
    the lanes', asks for at most that many."""
    from types import SimpleNamespace

    from worker.pipelines import NullPipeline
    from worker.pipelines.base import _ONE_IMAGE_S
    from worker.planning import head_start_size

    pipeline = NullPipeline(torch.device("cpu"))
    _ONE_IMAGE_S[pipeline] = 0.001
    pinned = settings_for(antenna, autotune_head_start_tasks=64, antenna_api_batch_size=5)
    assert head_start_size(SimpleNamespace(settings=pinned, limits=None), pipeline)[0] == 5
    unpinned = settings_for(antenna, autotune_head_start_tasks=64)
    assert head_start_size(SimpleNamespace(settings=unpinned, limits=None), pipeline)[0] == 64


@pytest.mark.timeout(180)
def test_with_a_pinned_reserve_size_no_reserve_asks_for_more(antenna, settings_for, tiny_images):
    report = _burst_with_probe_of_3(antenna, settings_for, tiny_images[:30], autotune_head_start_tasks=16,
                                    antenna_api_batch_size=4)
    assert (report.results_ok, report.results_error, report.lost) == (30, 0, 0)
    sizes = [reservation["batch_size"] for reservation in antenna.reservations]
    assert sizes and max(sizes) <= 4, sizes
