"""Liveness: the server marks a pull-mode service offline after 60 s without an API call, so the
worker calls at least that often even while one batch takes longer (here scaled down: a 1 s
keep-alive against a 5 s batch). Real worker, real local server, which records every call."""
from __future__ import annotations

import time

import pytest

from worker.app import build_worker
from worker.hooks import Middleware


class LongBatch(Middleware):
    """A STAND-IN for a batch whose inference takes long (a large CPU batch): the loop is held
    after the batch's results are handed to the poster, making no API call of its own."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def after_batch(self, worker, ctx, batch, results) -> None:
        time.sleep(self.seconds)


@pytest.mark.timeout(120)
def test_a_long_batch_does_not_leave_the_server_without_a_call(antenna, settings_for, tiny_images):
    job_id = antenna.add_job(tiny_images[:4], "synthetic-moths")
    settings = settings_for(antenna, antenna_api_batch_size=4, antenna_api_dataloader_num_workers=0)
    worker = build_worker(settings, burst=True, middlewares=[LongBatch(5.0)])
    worker.keepalive_after_s = 1.0
    assert worker.run() == 0
    assert antenna.report(job_id).results_ok == 4
    calls = antenna.service_calls_s
    assert antenna.longest_silence_s(calls[0], calls[-1]) < 3.0
