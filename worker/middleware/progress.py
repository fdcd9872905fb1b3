"""A per-job progress line: done/total, images/s, memory vs the soft cap.

On a TTY the line is redrawn in place; elsewhere (journald, pipes) the same line is a DEBUG log
record at most every ``REDRAW_INTERVAL_S``, so INFO logs stay one line per decision. The line is redrawn
in place with ``\\r``. A record written to the same terminal clears it first, inside its
handler's lock (the handler's formatter is wrapped), and the bar is drawn under that lock too: a
record logged by another thread while the loop redraws never lands glued to a bar. The total is the server's queue
count read from the reply subjects of the last processed batch (``prometheus.queued_after_batch``),
so it shows as ``~total`` and only when a subject carries it.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Optional

from worker.hooks import JobContext, Middleware
from worker.middleware.prometheus import queued_after_batch

if TYPE_CHECKING:
    from worker.results import ImageResult
    from worker.daemon import Worker
    from worker.ingest import Batch

log = logging.getLogger(__name__)

GIB = 1024**3
REDRAW_INTERVAL_S = 0.5


def format_progress(job_id: int, done: int, total: Optional[int], images_per_s: float,
                    used_bytes: Optional[int], cap_bytes: Optional[int]) -> str:
    """One line, e.g. ``job 3: 120/~400 images  12.3 images/s  mem 1.20/4.00 GiB (30% of soft cap)``."""
    count = f"{done}/~{total}" if total is not None else f"{done}"
    line = f"job {job_id}: {count} images  {images_per_s:.1f} images/s"
    if used_bytes is not None:
        line += f"  mem {used_bytes / GIB:.2f}"
        if cap_bytes:
            line += f"/{cap_bytes / GIB:.2f} GiB ({used_bytes / cap_bytes:.0%} of soft cap)"
        else:
            line += " GiB"
    return line


class _ClearLine(logging.Formatter):
    """The handler's own formatter, after clearing the bar: ``format`` runs inside the handler's
    ``emit``, under its lock, so no redraw comes between the clearing and the record."""

    def __init__(self, progress: "ProgressMiddleware", inner: Optional[logging.Formatter]) -> None:
        super().__init__()
        self.progress = progress
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        self.progress.clear()
        return self.inner.format(record)


class ProgressMiddleware(Middleware):
    def __init__(self, stream: IO[str] = sys.stderr, *, tty: Optional[bool] = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._lock = threading.Lock()
        self._shown = False
        self._drawn_s = 0.0
        self._handlers: list[logging.Handler] = []  # the root's handlers writing to this terminal
        self._total: Optional[int] = None  # the job's images, done and queued, from the last batch

    def on_start(self, worker: "Worker") -> None:
        if not self.tty:
            return
        for handler in logging.getLogger().handlers:
            if getattr(handler, "stream", None) is self.stream:
                handler.setFormatter(_ClearLine(self, handler.formatter))
                self._handlers.append(handler)

    def after_batch(self, worker: "Worker", ctx: JobContext, batch: "Batch", results: "list[ImageResult]") -> None:
        now_s = time.monotonic()
        if now_s - self._drawn_s < REDRAW_INTERVAL_S:
            return
        self._drawn_s = now_s
        self.draw(worker, ctx, batch)

    def on_job_start(self, worker: "Worker", ctx: JobContext) -> None:
        self._total = None

    def on_job_end(self, worker: "Worker", ctx: JobContext) -> None:
        self.draw(worker, ctx, None)
        with self._lock:
            if self._shown:
                self.stream.write("\n")
                self.stream.flush()
                self._shown = False

    def on_stop(self, worker: "Worker") -> None:
        for handler in self._handlers:
            if isinstance(handler.formatter, _ClearLine) and handler.formatter.progress is self:
                handler.setFormatter(handler.formatter.inner)
        self._handlers = []

    def draw(self, worker: "Worker", ctx: JobContext, batch: Optional["Batch"]) -> None:
        if batch is not None and batch.items:
            queued = queued_after_batch(batch.items)
            self._total = None if queued is None else ctx.stats.images + queued
        snapshot = worker.sampler.latest if worker.sampler is not None else None
        line = format_progress(
            ctx.job.id, ctx.stats.images, self._total, ctx.stats.images_per_s(),
            snapshot.used_bytes if snapshot is not None else None,
            worker.limits.soft_cap_bytes if worker.limits is not None else None,
        )
        if not self.tty:
            log.debug("%s", line)
            return
        for handler in self._handlers:  # so no record is between its clearing and its write
            handler.acquire()
        try:
            with self._lock:
                self.stream.write("\r\x1b[K" + line)
                self.stream.flush()
                self._shown = True
        finally:
            for handler in reversed(self._handlers):
                handler.release()

    def clear(self) -> None:
        with self._lock:
            if self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = False
