"""Prometheus metrics: the HTTP endpoint on AMI_METRICS_ADDR and the middleware that feeds it.

``MetricsMiddleware`` updates the objects in ``worker.metrics`` from the loop's hooks (images,
failures by reason, batches, plan, per-job progress), from every memory sample (tree memory,
open FDs, /dev/shm) and from the poster's counters (posted/spooled/replayed). The poster's
counters are also copied at every scrape, so a scrape never lags the server by a sampler tick.

Counted in this process only: the loader worker processes reserve tasks and retry their own API
calls, so ``tasks_reserved_total`` comes from the loader's shared counter, and
``api_retries_total``, ``api_errors_total`` and the last-success timestamp cover the main
process's clients (job polls, result posts, and reserves when there are no loader workers). The
spool backlog is read from disk at each scrape, so it includes what an earlier process left.
"""
from __future__ import annotations

import errno
import logging
import math
import re
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Callable, Optional, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from worker import __version__, metrics
from worker.hooks import JobContext, Middleware
from worker.metrics import REGISTRY
from worker.settings import SettingsError
from watchdog.sampler import MemorySnapshot

if TYPE_CHECKING:
    from worker.results import ImageResult
    from worker.daemon import Worker
    from worker.ingest import Batch
    from worker.posting import Spool

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

    def bind(self, port_attempts: int = 1) -> "MetricsServer":
        """Listen on the port, or on the next free one of ``port_attempts`` upward from it.

        Raises ``SettingsError`` (one line naming AMI_METRICS_ADDR) when every port tried is in
        use or cannot be bound, so a second instance on a busy port never runs without metrics.
        Port 0 takes any free port.
        """
        server_class = type("_Server", (_ThreadingWSGIServer,), {
            "address_family": socket.AF_INET6 if ":" in self.host else socket.AF_INET})
        first_port = self.port
        last_error: Optional[OSError] = None
        ports = [0] if first_port == 0 else range(first_port, min(65536, first_port + max(1, port_attempts)))
        for port in ports:
            try:
                self._server = make_server(self.host, port, self._wsgi, server_class, handler_class=_QuietHandler)
                break
            except OSError as error:
                last_error = error
        else:
            raise SettingsError(_bind_failure(self.host, first_port, port_attempts, last_error))
        self.port = self._server.server_address[1]
        return self

    def start(self, port_attempts: int = 1) -> "MetricsServer":
        """Serve on a daemon thread (binding first if ``bind`` was not called)."""
        if self._server is None:
            self.bind(port_attempts)
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
        if self._thread is not None:  # shutdown() waits for serve_forever, which a bound-only server never ran
            server.shutdown()
            self._thread.join(timeout=5.0)
        server.server_close()


def _bind_failure(host: str, first_port: int, port_attempts: int, error: Optional[OSError]) -> str:
    tried = f"port {first_port}" if port_attempts <= 1 else f"ports {first_port}-{first_port + port_attempts - 1}"
    reason = "in use (another worker?)" if error is not None and error.errno == errno.EADDRINUSE \
        else f"not available ({error.strerror if error is not None else 'unknown error'})"
    return (f"AMI_METRICS_ADDR={host}:{first_port}: {tried} {reason}; give each instance its own port, "
            f"{host}:0 for any free port, AMI_METRICS_PORT_ATTEMPTS=N to take the next free one, "
            "or empty to disable metrics")


class _Deltas:
    """Turns running totals owned elsewhere into counter increments (thread-safe)."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def advance(self, key: str, total: float) -> float:
        with self._lock:
            delta = total - self._seen.get(key, 0)
            if delta > 0:
                self._seen[key] = total
            return max(0, delta)


_ID_SEGMENT = re.compile(r"/\d+(?=/)")


def count_api_attempt(method: str, path: str, status: str) -> None:
    """An ``AntennaClient.on_attempt`` hook: failures by endpoint and status, and the time of the
    last success. Ids in paths become ``{id}`` so the label set stays small."""
    if status.isdigit() and int(status) < 400:
        metrics.api_last_success.set(time.time())
        return
    metrics.api_errors.labels(endpoint=_ID_SEGMENT.sub("/{id}", path), status=status).inc()


def read_spool_backlog(spool: "Spool") -> None:
    """Spool files and bytes as they are on disk now (a spool outlives the process that wrote it)."""
    files_n = bytes_n = 0
    for path in spool.files():
        try:
            bytes_n += path.stat().st_size
        except FileNotFoundError:  # replayed and removed since the listing
            continue
        files_n += 1
    metrics.spool_files.set(files_n)
    metrics.spool_bytes.set(bytes_n)


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


def queued_after_batch(items: Sequence) -> Optional[int]:
    """Tasks still queued after the latest delivered task of a batch: the smallest pending count
    of its items' reply subjects (None when none carries one). A batch's items are not in delivery
    order (a lane decodes downloads as they finish), so its last item may be an earlier task."""
    counts = [count for item in items if (count := queued_after(item.task.reply_subject)) is not None]
    return min(counts) if counts else None


class MetricsMiddleware(Middleware):
    """Feeds ``worker.metrics``; serves them on ``addr`` (``HOST:PORT``) from ``on_start`` to ``on_stop``.

    The port is bound here, at wiring, so a busy one fails the start (``SettingsError``) instead
    of a worker running without metrics. With ``serve=False`` (a ``worker run --processes`` child,
    whose values go to prometheus-client's multiprocess files) it feeds and binds nothing: the
    parent serves every child's values on one endpoint.
    """

    def __init__(self, addr: str, *, port_attempts: int = 1, serve: bool = True) -> None:
        self.addr = addr
        self.server: Optional[MetricsServer] = (
            MetricsServer(addr, on_scrape=self.on_scrape).bind(port_attempts) if serve else None)
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
        _label_build(worker)
        for client in (worker.client, worker.poster.client):
            client.on_attempt = count_api_attempt
        worker.poster.post_timer = metrics.post_seconds.observe
        worker.add_sample_listener(self.on_sample)
        read_spool_backlog(worker.poster.spool)
        if self.server is not None:
            self.server.start()

    def on_idle(self, worker: "Worker") -> None:
        self._set_state("idle")
        self.refresh()

    def on_scrape(self) -> None:
        self.refresh()
        if self._worker is not None:
            read_spool_backlog(self._worker.poster.spool)

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
            metrics.plan_predicted_peak_bytes.set(ctx.tuning.decision.memory.job_peak_bytes)
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
        if (queued := queued_after_batch(batch.items)) is not None:
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
            metrics.watchdog_sampler_cpu_seconds.inc(self._deltas.advance("sampler_cpu_s", worker.sampler.cpu_seconds))
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


def _label_build(worker: "Worker") -> None:
    import torch

    metrics.build_info.info({"version": __version__, "torch": torch.__version__, "cuda": torch.version.cuda or "none",
                             "device": "cuda" if worker.cuda else "cpu"})
