"""The progress line on a terminal, against log records written from other threads."""
from __future__ import annotations

import logging
import os
import sys
import threading

import pytest

from worker.antenna import JobRef
from worker.app import build_worker
from worker.hooks import JobContext
from worker.middleware.progress import ProgressMiddleware

RECORDS = 6000


@pytest.mark.timeout(120)
def test_a_log_record_from_another_thread_never_lands_on_a_drawn_bar(antenna, settings_for):
    """The loop redraws the bar while poster and loader threads log: every record must start on a
    line of its own, never right after a bar drawn between the line being cleared and the record
    written. Real handler, real threads, a real pipe as the terminal (``tty=True``)."""
    worker = build_worker(settings_for(antenna), middlewares=[])
    ctx = JobContext(job=JobRef(7, "null"), pipeline=worker.pipelines("null"))
    read_end, write_end = os.pipe()
    terminal = os.fdopen(write_end, "w", buffering=1)
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    progress = ProgressMiddleware(terminal, tty=True)
    chunks: list[bytes] = []
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the interpreter switches threads often: the race shows in a run
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b"")))
    reader.start()
    try:
        progress.on_start(worker)
        logger = logging.getLogger("tests.progress")
        logger.setLevel(logging.INFO)
        logging_thread = threading.Thread(target=lambda: [logger.info("record %d", i) for i in range(RECORDS)])
        logging_thread.start()
        draws = 0
        while logging_thread.is_alive():
            progress.draw(worker, ctx, None)
            draws += 1
        logging_thread.join()
        progress.on_job_end(worker, ctx)
        progress.on_stop(worker)
    finally:
        sys.setswitchinterval(switch_interval)
        root.removeHandler(handler)
        terminal.close()
        reader.join(timeout=10)
        os.close(read_end)
    output = b"".join(chunks).decode()
    assert output.count("LOG record") == RECORDS and draws > 10
    glued = [piece for piece in output.split("\r\x1b[K") if piece.startswith("job 7:") and "LOG record" in piece]
    assert glued == [], f"{len(glued)} records written right after a bar, e.g. {glued[0][:120]!r}"
