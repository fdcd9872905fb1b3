"""The worker loop: poll for jobs, per job build the loader, infer, post; drain on signals.

Mechanism only. Policy (plans, memory governance, metrics, service notifications) arrives through
``Middleware`` hooks. Signal handlers only set flags; the loop acts on them:
SIGTERM/SIGINT drain (no new reserves, finish and post in-flight work, exit 0 within
``AMI_SHUTDOWN_GRACE_S``), a second one forces; SIGUSR1 drains after the current job.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from autotune.plan import MINIMAL_PLAN, LoaderPlan
from worker.antenna import AntennaClient, AntennaError, JobRef, client_info
from worker.hooks import JobContext, Middleware
from worker.ingest import Batch, IngestSource, Loader, LoaderFailed
from worker.pipelines import Pipeline, run_batch
from worker.posting import ResultPoster
from worker.release import TaskReleaser
from worker.settings import Settings
from watchdog.limits import Limits
from watchdog.sampler import MemorySnapshot, Sampler

log = logging.getLogger(__name__)

BURST_LIST_LIMIT = 1000
MAX_LOADER_REBUILDS_PER_JOB = 3


@dataclass
class StopState:
    """What the signal handlers set; read by the loop."""

    draining: bool = False
    forced: bool = False
    after_job: bool = False
    drain_deadline_s: Optional[float] = None


def plan_from_settings(settings: Settings, *, cuda: bool) -> LoaderPlan:
    """The plan the operator's settings describe (ADC's meanings), used when autotune is off."""
    return LoaderPlan(
        tasks_per_reserve=settings.antenna_api_batch_size,
        batch_size=settings.antenna_api_batch_size,
        num_workers=settings.dataloader_num_workers,
        prefetch_factor=settings.antenna_api_dataloader_prefetch_factor,
        # Pinned host memory only helps host->GPU copies; without CUDA it is pure cost.
        pin_memory=settings.antenna_api_dataloader_pin_memory and cuda,
        download_threads=settings.antenna_api_dataloader_download_threads,
        source="settings",
    )


class Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        client: AntennaClient,
        poster: ResultPoster,
        pipelines: Callable[[str], Pipeline],
        pipeline_slugs: Sequence[str],
        middlewares: Sequence[Middleware] = (),
        burst: bool = False,
        cuda: bool = False,
        limits: Optional[Limits] = None,
        sampler: Optional[Sampler] = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.poster = poster
        self.pipelines = pipelines
        self.pipeline_slugs = list(pipeline_slugs)
        self.middlewares = list(middlewares)
        self.burst = burst
        self.cuda = cuda
        self.stop = StopState()
        self.releaser = TaskReleaser(settings.nats_url)
        self.wake = threading.Event()
        self.jobs_done = 0
        self.client_info = client_info(self.pipeline_slugs)
        self.limits = limits
        self.sampler = sampler
        self._sample_listeners: list[Callable[[MemorySnapshot], None]] = []
        self.current: Optional[JobContext] = None
        # torch's intra-op threads as the process started (CPU count or OMP_NUM_THREADS): what
        # probes time at, and what a plan with inference_threads=0 runs with.
        self.default_inference_threads = torch.get_num_threads()

    def add_sample_listener(self, listener: Callable[[MemorySnapshot], None]) -> None:
        """Call ``listener(snapshot)`` on the sampler thread after every memory sample."""
        self._sample_listeners.append(listener)

    def _on_sample(self, snapshot: MemorySnapshot) -> None:
        for listener in self._sample_listeners:
            listener(snapshot)

    # --- signals: handlers only set flags ---

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_terminate)
        signal.signal(signal.SIGINT, self._on_terminate)
        signal.signal(signal.SIGUSR1, self._on_recycle)

    def _on_terminate(self, signum: int, _frame: object) -> None:
        if self.stop.draining:
            self.stop.forced = True
        else:
            self.stop.draining = True
            self.stop.drain_deadline_s = time.monotonic() + self.settings.shutdown_grace_s
        self.wake.set()
        self._flag_loader()

    def _flag_loader(self) -> None:
        """Copy the stop flags into the live loader's shared control block now.

        Loader workers read it before every reserve and image; waiting for the loop to do this
        after the next batch let them keep reserving (lengthening the drain) meanwhile.
        """
        ctx = self.current
        loader = ctx.loader if ctx is not None else None
        if loader is None:
            return
        if self.stop.forced:
            loader.abandon()
        elif self.stop.draining:
            loader.stop_reserving(self.stop.drain_deadline_s)

    def _on_recycle(self, signum: int, _frame: object) -> None:
        self.stop.after_job = True
        self.wake.set()

    @property
    def stopping(self) -> bool:
        return self.stop.draining or self.stop.forced

    # --- the loop ---

    def run(self) -> int:
        """Run until stopped (or, in burst mode, until no job yields tasks). Returns the exit code."""
        self._call("on_start")
        if self.sampler is not None:
            self.sampler.start()
        self.poster.replay_spool()
        try:
            while not self.stopping and not self.stop.after_job:
                did_work = self._poll_once()
                if self.burst and not did_work:
                    log.info("burst: no job yielded tasks; exiting")
                    break
                if not did_work and not self.stopping:
                    self._call("on_idle")
                    self.wake.wait(self.settings.antenna_idle_sleep_seconds)
                    self.wake.clear()
        finally:
            self._shutdown()
        return 0

    def _poll_once(self) -> bool:
        try:
            jobs = self.client.list_jobs(self.pipeline_slugs, limit=BURST_LIST_LIMIT if self.burst else None)
        except AntennaError as error:
            log.warning("listing jobs failed: %s", error)
            return False
        did_work = False
        for job in jobs:
            if self.stopping or self.stop.after_job:
                break
            did_work = self.process_job(job) > 0 or did_work
        return did_work

    def process_job(self, job: JobRef) -> int:
        """Process what ``job`` hands out now; returns how many images got a result."""
        pipeline = self.pipelines(job.pipeline_slug)
        ctx = JobContext(job=job, plan=plan_from_settings(self.settings, cuda=self.cuda))
        ctx.notes["pipeline"] = pipeline
        self.current = ctx
        self._call("on_job_start", ctx)
        for attempt in range(MAX_LOADER_REBUILDS_PER_JOB + 1):
            self._run_loader(ctx, pipeline)
            if not ctx.rebuild_requested or self.stopping or attempt == MAX_LOADER_REBUILDS_PER_JOB:
                break
            log.warning("job %d: rebuilding the loader with the minimal plan (%s)", job.id,
                        ctx.notes.get("rebuild_reason", "requested"))
            ctx.rebuild_requested = False
            ctx.plan = MINIMAL_PLAN
        self._call("on_job_end", ctx)
        self._set_inference_threads(self.default_inference_threads)
        self.current = None
        self.jobs_done += 1
        log.info("job %d: %d images (%d ok, %d failed), %.2f images/s, %d stranded; %s",
                 job.id, ctx.stats.images, ctx.stats.images_ok, ctx.stats.images_failed,
                 ctx.stats.images_per_s(), ctx.stats.tasks_stranded, ctx.stats.observed())
        return ctx.stats.images

    def _run_loader(self, ctx: JobContext, pipeline: Pipeline) -> None:
        source = self.ingest_source(ctx.job.id)
        log.info("job %d: loader plan %s", ctx.job.id, ctx.plan.describe())
        self._set_inference_threads(ctx.plan.inference_threads or self.default_inference_threads)
        try:
            loader = Loader(source, ctx.plan)
        except LoaderFailed as error:  # out of file descriptors or processes: nothing was reserved
            log.error("job %d: loader failed: %s", ctx.job.id, str(error))
            ctx.rebuild_requested = True
            ctx.notes["rebuild_reason"] = f"loader failed: {str(error)[:200]}"
            return
        with loader:
            ctx.loader = loader
            self._call("on_loader_start", ctx)
            try:
                for batch in loader:
                    try:
                        self._handle_batch(ctx, pipeline, batch)
                    finally:
                        batch.release()  # results are computed: loader workers may reuse the buffers
                    del batch  # not held while the next batch is awaited (one batch of images)
                    if self._check_stop(ctx, loader):
                        break
            except LoaderFailed as error:
                # A loader worker died (the kernel's OOM killer, a segfault in a decoder): what it
                # held is stranded below; the job goes on with a fresh, minimal loader.
                log.error("job %d: loader failed: %s", ctx.job.id, str(error))
                ctx.rebuild_requested = True
                ctx.notes["rebuild_reason"] = f"loader failed: {str(error)[:200]}"
            ctx.loader = None
        # After close, not before: an abandoned loader's workers may still be inside a reserve
        # call or have ledger entries in flight; close() joins them and collects the ledger.
        stranded = loader.stranded()
        if stranded:
            ctx.stats.tasks_stranded += len(stranded)
            self.releaser.release(ctx.job.id, stranded, "reserved but not processed before the loader stopped")

    @staticmethod
    def _set_inference_threads(threads: int) -> None:
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def _check_stop(self, ctx: JobContext, loader: Loader) -> bool:
        """Act on flags between batches; True to leave the loader at once (forced)."""
        if self.stop.draining and self.stop.drain_deadline_s and time.monotonic() > self.stop.drain_deadline_s:
            log.warning("drain grace of %.0f s is over: forcing", self.settings.shutdown_grace_s)
            self.stop.forced = True
        if self.stop.forced:
            loader.abandon()
            return True
        if self.stop.draining:
            loader.stop_reserving(self.stop.drain_deadline_s)
        if ctx.rebuild_requested:
            loader.abandon()  # batches already decoded still arrive and get posted
        return False

    def _handle_batch(self, ctx: JobContext, pipeline: Pipeline, batch: Batch) -> None:
        started_s, started_cpu_s = time.perf_counter(), time.process_time()
        results = run_batch(pipeline, batch.items, ctx.job.pipeline_slug)
        ctx.stats.last_inference_s = time.perf_counter() - started_s
        ctx.stats.last_inference_cpu_s = time.process_time() - started_cpu_s
        self.poster.submit(ctx.job.id, results)
        ctx.stats.inference_s += ctx.stats.last_inference_s
        for item in batch.items:
            ctx.stats.download_bytes += item.jpeg_bytes
            if item.error is None:
                ctx.stats.timed_images += 1
                ctx.stats.download_s += item.download_s
                ctx.stats.decode_s += item.decode_s
        for result in results:
            if result.failure is not None:
                ctx.stats.images_failed += 1
                reason = result.failure.reason
                ctx.stats.failures_by_reason[reason] = ctx.stats.failures_by_reason.get(reason, 0) + 1
            else:
                ctx.stats.images_ok += 1
        ctx.stats.batches += 1
        self._call("after_batch", ctx, batch, results)

    def ingest_source(self, job_id: int) -> IngestSource:
        s = self.settings
        return IngestSource(
            base_url=s.antenna_api_base_url, token=s.token, job_id=job_id,
            api_timeout_s=s.antenna_api_timeout_s, api_max_attempts=s.antenna_api_max_attempts,
            image_timeout_s=s.antenna_api_timeout_s * 2, image_deadline_s=s.image_download_deadline_s,
            block_private_hosts=s.block_private_image_hosts, max_image_bytes=s.max_image_bytes,
            max_image_pixels=s.max_image_pixels, client_info=self.client_info,
        )

    def _shutdown(self) -> None:
        """One ordered sequence under one deadline: flush posts, hooks, close."""
        deadline_s = self.stop.drain_deadline_s or (time.monotonic() + self.settings.shutdown_grace_s)
        remaining_s = max(1.0, deadline_s - time.monotonic())
        log.info("shutdown: flushing %d pending result posts (%.1f s left)", self.poster.pending_posts, remaining_s)
        if not self.poster.flush(timeout_s=remaining_s):
            log.error("shutdown: result posts still pending at the deadline")
        self._call("on_stop")
        if self.sampler is not None:
            self.sampler.stop()
        self.poster.close()
        self.client.close()
        log.info("shutdown complete: %d jobs, %d results posted, %d spooled",
                 self.jobs_done, self.poster.counters.posted_items, self.poster.counters.spooled_items)

    def _call(self, hook: str, *args: object) -> None:
        for middleware in self.middlewares:
            try:
                getattr(middleware, hook)(self, *args)
            except Exception:
                log.exception("%s.%s failed", type(middleware).__name__, hook)
