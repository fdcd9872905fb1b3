"""Prometheus metrics: the HTTP endpoint on AMI_METRICS_ADDR and the middleware that feeds it.

``MetricsMiddleware`` updates the objects in ``worker.metrics`` from the loop's hooks (images,
failures by reason, batches, plan, per-job progress), from every memory sample (tree memory,
open FDs, /dev/shm) and from the poster's counters (posted/spooled/replayed). The poster's
counters are also copied at every scrape, so a scrape never lags the server by a sampler tick.

Counted in this process only: the loader worker processes reserve tasks and retry their own API
calls, so ``tasks_reserved_total`` comes from the loader's shared counter and
``api_retries_total`` covers the main process's clients (job listing, result posts).
"""
from __future__ import annotations

import logging
import math
import socket
import threading
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Callable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from worker import metrics
from worker.hooks import JobContext, Middleware
from worker.metrics import REGISTRY
from watchdog.sampler import MemorySnapshot

if TYPE_CHECKING:
    from worker.results import ImageResult
    from worker.daemon import Worker
    from worker.ingest import Batch

log = logging.getLogger(__name__)

# "unauthorized": the last listing or result post was answered 401/403 (wins over idle and working).
STATES = ("starting", "idle", "working", "draining", "stopped", "unauthorized")
PLAN_KNOBS = ("tasks_per_reserve", "batch_size", "num_workers", "prefetch_factor", "pin_memory", "download_threads")


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) -> (host, port). Port 0 picks a free port."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit():
        raise ValueError(f"AMI_METRICS_ADDR={addr!r} is not HOST:PORT such as 127.0.0.1:9464")
    return host, int(port)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    address_family = socket.AF_INET


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        """Scrapes every few seconds would drown the worker's own log lines."""


class MetricsServer:
    """``/metrics`` over HTTP on a daemon thread; ``on_scrape`` runs before each exposition."""

    def __init__(self, addr: str, *, registry=REGISTRY, on_scrape: Optional[Callable[[], None]] = None) -> None:
        self.host, self.port = parse_addr(addr)
        self._app = make_wsgi_app(registry)
        self._on_scrape = on_scrape
        self._server: Optional[WSGIServer] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "MetricsServer":
        server_class = type("_Server", (_ThreadingWSGIServer,), {
            "address_family": socket.AF_INET6 if ":" in self.host else socket.AF_INET})
        self._server = make_server(self.host, self.port, self._wsgi, server_class, handler_class=_QuietHandler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.2,),
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def _wsgi(self, environ: dict, start_response: Callable) -> object:
        if self._on_scrape is not None:
            try:
                self._on_scrape()
            except Exception:  # a stale number beats a failed scrape
                log.exception("refreshing metrics before a scrape failed")
        return self._app(environ, start_response)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


class _Deltas:
    """Turns running totals owned elsewhere into counter increments (thread-safe)."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def advance(self, key: str, total: int) -> int:
        with self._lock:
            delta = total - self._seen.get(key, 0)
            if delta > 0:
                self._seen[key] = total
            return max(0, delta)


def queued_after(reply_subject: str) -> Optional[int]:
    """Tasks still queued when this task was delivered, from a JetStream ack subject's pending count.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (9 tokens) or the
    newer ``$JS.ACK.<domain>.<account>.<stream>.….<pending>.<token>`` (12). The contract calls the
    subject opaque, so any other shape gives None (unknown) rather than a guess.
    """
    tokens = reply_subject.split(".")
    if tokens[:2] != ["$JS", "ACK"]:
        return None
    pending = tokens[8] if len(tokens) == 9 else tokens[10] if len(tokens) >= 12 else ""
    return int(pending) if pending.isdigit() else None


class MetricsMiddleware(Middleware):
    """Feeds ``worker.metrics``; serves them on ``addr`` (``HOST:PORT``) from ``on_start`` to ``on_stop``."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.server: Optional[MetricsServer] = None
        self._worker: Optional["Worker"] = None
        self._deltas = _Deltas()
        self._job_reserved = 0

    # --- lifecycle

    def on_start(self, worker: "Worker") -> None:
        self._worker = worker
        self._set_state("starting")
        for slug in worker.pipeline_slugs:  # zeros from the start, so rate() sees the first increment
            metrics.images_processed.labels(pipeline=slug)
            metrics.batches.labels(pipeline=slug)
        metrics.current_job.set(0)
        if worker.limits is not None:
            for kind, value in (("effective", worker.limits.effective_limit_bytes),
                                ("soft_cap", worker.limits.soft_cap_bytes),
                                ("hard_cap", worker.limits.hard_cap_bytes)):
                metrics.memory_limit_bytes.labels(kind=kind).set(value)
        worker.poster.post_timer = metrics.post_seconds.observe
        worker.add_sample_listener(self.on_sample)
        self.server = MetricsServer(self.addr, on_scrape=self.refresh).start()

    def on_idle(self, worker: "Worker") -> None:
        self._set_state("idle")
        self.refresh()

    def on_stop(self, worker: "Worker") -> None:
        self.refresh()  # the loop flushed posts before on_stop: these are the final numbers
        self._set_state("stopped")
        if self.server is not None:
            self.server.stop()

    # --- per job

    def on_job_start(self, worker: "Worker", ctx: JobContext) -> None:
        metrics.jobs.inc()
        metrics.current_job.set(ctx.job.id)
        metrics.job_images_done.set(0)
        metrics.job_tasks_queued.set(math.nan)
        self._job_reserved = 0
        self._set_state("draining" if worker.stopping else "working")

    def on_loader_start(self, worker: "Worker", ctx: JobContext) -> None:
        """The plan's gauges and one count per loader built (a rebuild's minimal plan counts too)."""
        plan = ctx.plan
        for knob in PLAN_KNOBS:
            metrics.plan_value.labels(knob=knob).set(float(getattr(plan, knob)))
        metrics.plan_changes.labels(source=plan.source).inc()
        if ctx.tuning is not None and ctx.tuning.decision.plan == plan:
            metrics.plan_predicted_peak_bytes.set(ctx.tuning.decision.memory.total_bytes)
            metrics.plan_predicted_images_per_second.set(ctx.tuning.decision.rate.pipeline_images_per_s)

    def after_batch(self, worker: "Worker", ctx: JobContext, batch: "Batch", results: "list[ImageResult]") -> None:
        slug = ctx.job.pipeline_slug
        ok = 0
        for result in results:
            if result.failure is None:
                ok += 1
            else:
                metrics.images_failed.labels(pipeline=slug, reason=result.failure.reason).inc()
        metrics.images_processed.labels(pipeline=slug).inc(ok)
        metrics.batches.labels(pipeline=slug).inc()
        metrics.inference_seconds.labels(pipeline=slug).observe(ctx.stats.last_inference_s)
        for loaded in batch.items:
            if loaded.error is None:
                metrics.download_seconds.observe(loaded.download_s)
                metrics.decode_seconds.observe(loaded.decode_s)
                metrics.download_bytes.inc(loaded.jpeg_bytes)
        metrics.job_images_done.set(ctx.stats.images)
        if batch.items and (queued := queued_after(batch.items[-1].task.reply_subject)) is not None:
            metrics.job_tasks_queued.set(queued)
        if ctx.loader is not None:
            self._count_reserved(ctx.stats.images + _held(ctx))
        self._set_state("draining" if worker.stopping else "working")
        self.refresh()

    def on_job_end(self, worker: "Worker", ctx: JobContext) -> None:
        # Every reserved task either reached the loop (one result each) or was stranded.
        self._count_reserved(ctx.stats.images + ctx.stats.tasks_stranded)
        metrics.tasks_stranded.inc(ctx.stats.tasks_stranded)
        metrics.current_job.set(0)
        self.refresh()

    def _count_reserved(self, job_total: int) -> None:
        if job_total > self._job_reserved:
            metrics.tasks_reserved.inc(job_total - self._job_reserved)
            self._job_reserved = job_total

    # --- sampled and copied values

    def on_sample(self, snapshot: MemorySnapshot) -> None:
        metrics.memory_used_bytes.set(snapshot.used_bytes)
        metrics.memory_rss_bytes.set(snapshot.tree_rss_bytes)
        metrics.memory_available_bytes.set(snapshot.mem_available_bytes)
        metrics.processes.set(snapshot.process_count)
        metrics.open_fds.set(snapshot.open_fds)
        metrics.shm_bytes.set(snapshot.shm_bytes)
        if snapshot.psi_some_avg10 is not None:
            metrics.memory_pressure_some_ratio.set(snapshot.psi_some_avg10 / 100.0)
        self.refresh()

    def refresh(self) -> None:
        """Copy running totals owned by the poster, clients and sampler (any thread)."""
        worker = self._worker
        if worker is None:
            return
        counters = worker.poster.counters
        metrics.results_posted.inc(self._deltas.advance("posted", counters.posted_items))
        metrics.results_spooled.inc(self._deltas.advance("spooled", counters.spooled_items))
        metrics.results_replayed.inc(self._deltas.advance("replayed", counters.replayed_items))
        metrics.posts_pending.set(worker.poster.pending_posts)
        retries = worker.client.retries_total + worker.poster.client.retries_total
        metrics.api_retries.inc(self._deltas.advance("retries", retries))
        self._refresh_failures(worker)
        if worker.sampler is not None:
            metrics.watchdog_sampler_cpu_seconds.set(worker.sampler.cpu_seconds)
        if worker.stopping:
            self._set_state("draining")
        elif worker.client.auth_rejected or worker.poster.client.auth_rejected:
            self._set_state("unauthorized")

    def _refresh_failures(self, worker: "Worker") -> None:
        counters = worker.poster.counters
        metrics.results_job_gone.inc(self._deltas.advance("job_gone", counters.job_gone_items))
        metrics.results_spool_failed.inc(self._deltas.advance("spool_failed", counters.spool_failed_items))
        metrics.spool_corrupt_files.inc(self._deltas.advance("corrupt", counters.corrupt_spool_files))
        metrics.jobs_rejecting_results.set(len(worker.poster.rejected_jobs))
        auth = worker.client.auth_failures_total + worker.poster.client.auth_failures_total
        metrics.api_auth_failures.inc(self._deltas.advance("auth", auth))

    @staticmethod
    def _set_state(current: str) -> None:
        for name in STATES:
            metrics.state.labels(state=name).set(1.0 if name == current else 0.0)


def _held(ctx: JobContext) -> int:
    """Tasks the loader's workers reserved that have not reached the loop yet (0 if unknown)."""
    loader = ctx.loader
    if loader is None:
        return 0
    reserved = int(loader.control.reserved_total.value)
    received = len(loader.received)
    return max(0, reserved - received)

