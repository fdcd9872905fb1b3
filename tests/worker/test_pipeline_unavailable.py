"""A pipeline whose models cannot be loaded when a job comes (unloaded after
AMI_PIPELINE_IDLE_EVICT_S, then a weights file gone bad and its source gone, or a shared card out
of memory): no task of the job is reserved, so none burns a delivery or gets an error result that
would mark its image failed for good; the worker retries the load with a backoff and takes the job
once the models load. In a burst it exits 1 naming the pipeline.

Real ADC architectures (random weights) from a file:// mirror, the real local server."""
from __future__ import annotations

import logging
import signal
import threading
import time

import pytest

from tests.conftest import data_cache
from worker.app import build_worker
from worker.testing.adc_models import relative_path, write_models
from worker.testing.synthetic import generate_images

PIPELINE = "moth_binary"
WEIGHTS = "moth-nonmoth_resnet50_20240417_b4fe3efe.pth"

pytestmark = pytest.mark.timeout(300)


def _broken_worker(antenna, settings_for, tmp_path, *, burst: bool):
    """A worker that started with good files; then its models were unloaded, its cached binary
    classifier truncated and the mirror's copy removed. Returns (worker, mirror file, its bytes)."""
    root = tmp_path / "mirror"
    write_models(root, [PIPELINE])
    settings = settings_for(antenna, antenna_pipelines=PIPELINE, models_base_url="file://" + str(root),
                            antenna_api_dataloader_num_workers=0, antenna_idle_sleep_seconds=0.05)
    worker = build_worker(settings, burst=burst, middlewares=[])
    assert worker.pipelines(PIPELINE).unload()  # as after AMI_PIPELINE_IDLE_EVICT_S without a job
    cached = settings.models_path / WEIGHTS
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 2])
    mirrored = next(path for path in root.rglob(WEIGHTS))
    mirrored.unlink()
    return worker, mirrored, good


def _images(count: int):
    return generate_images(data_cache() / "adc-320x240", count, 320, 240, quality=85, seed=11, noise=4.0,
                           prefix="adc-")


def test_a_burst_reserves_nothing_of_a_job_whose_models_cannot_load_and_exits_1(
        antenna, settings_for, tmp_path, caplog):
    worker, _, _ = _broken_worker(antenna, settings_for, tmp_path, burst=True)
    job = antenna.add_job(_images(2), PIPELINE)
    caplog.set_level(logging.INFO)
    assert worker.run() == 1
    report = antenna.report(job)
    assert antenna.reservations == [], "a reserve spends one of each task's two deliveries"
    assert (report.results_ok, report.results_error, report.pending) == (0, 0, 2), report
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"pipeline {PIPELINE}" in line and "could not be loaded" in line for line in errors), errors


def test_once_the_models_load_again_the_job_is_taken_and_nothing_was_lost(antenna, settings_for, tmp_path, caplog):
    worker, mirrored, good = _broken_worker(antenna, settings_for, tmp_path, burst=False)
    job = antenna.add_job(_images(1), PIPELINE)  # random weights: ~7 s of crops to classify per image
    caplog.set_level(logging.INFO)
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    try:
        deadline_s = time.monotonic() + 60
        while "could not be loaded" not in caplog.text:
            assert time.monotonic() < deadline_s and runner.is_alive(), caplog.text[-3000:]
            time.sleep(0.05)
        assert antenna.reservations == []
        # the unreadable file of the cache is set aside, so the next try fetches it
        assert (mirrored.parent / WEIGHTS).exists() is False
        assert any(p.name == WEIGHTS + ".unreadable" for p in worker.settings.models_path.iterdir())
        mirrored.write_bytes(good)  # the source is back: the next try fetches the file again and loads
        while not antenna.report(job).complete:
            assert time.monotonic() < deadline_s + 60 and runner.is_alive(), caplog.text[-3000:]
            time.sleep(0.1)
    finally:
        worker._on_terminate(signal.SIGTERM, None)
        worker.wake.set()
        runner.join(timeout=60)
    assert not runner.is_alive()
    report = antenna.report(job)
    assert (report.results_ok, report.results_error, report.lost, report.redeliveries) == (1, 0, 0, 0), report


def test_the_mirror_layout_is_what_the_worker_fetches():
    """The tests above remove the mirror's copy by name: the name is the file the pipeline loads."""
    from worker.pipelines.catalog import BINARY

    assert relative_path(BINARY.weights_url).endswith(WEIGHTS)
