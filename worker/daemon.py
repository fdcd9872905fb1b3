"""The worker loop: poll for jobs; per job plan, build the loader, infer, post; drain on signals.

Mechanism only. The plan comes from one injected ``Planner`` (``worker.planning``), a step of the
loop; the rest of policy (memory governance, metrics, service notifications, autotune's learning)
arrives through ``Middleware`` hooks (``worker.hooks``). Signal handlers only set flags; a watcher
thread woken by ``signal.set_wakeup_fd`` passes them on to the live loader and wakes the loop:
SIGTERM/SIGINT drain (no new reserves, finish and post in-flight work, exit 0 within
``AMI_SHUTDOWN_GRACE_S``), a second one forces; SIGUSR1 drains after the current job.

A listing, or a loader's reserve, rejected for auth (401/403) is an ERROR and backs off (up to
``AUTH_BACKOFF_CAP_S``); ``run`` in burst mode then returns ``EXIT_TOKEN_REJECTED`` (also when
result posts were rejected).

A pipeline's models are loaded (``Pipeline.ensure_loaded``) before any task of its job is
reserved. Where they cannot be, the job is skipped with an ERROR and the load is tried again with
a backoff (up to ``PIPELINE_BACKOFF_CAP_S``): an error result would mark each image failed for
good, and a reserve would spend one of each task's deliveries. Should the load fail inside a job,
its tasks are given back (``TaskReleaser``) and the job left. ``run`` in burst mode then returns
``EXIT_PIPELINE_UNAVAILABLE``.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from autotune.memory_model import head_start_decoders
from autotune.plan import MINIMAL_PLAN
from watchdog.limits import Limits
from watchdog.sampler import MemorySnapshot, Sampler
from worker.antenna import AntennaClient, AntennaError, AntennaRejected, AntennaUnavailable, JobRef, client_info
from worker.backoff import backoff_delay_s
from worker.head_start import HeadStart
from worker.hooks import JobContext, Middleware
from worker.ingest import Batch, IngestSource, Loader, LoaderFailed
from worker.loading import image_timeout_s
from worker.pipelines import Pipeline, PipelineUnavailable, run_batch
from worker.planning import Planner, SettingsPlanner
from worker.probing import cpu_count
from worker.posting import ResultPoster
from worker.release import TaskReleaser
from worker.results import Failure, ImageResult
from worker.settings import Settings
from worker.stops import FLEET_CHILD_VARIABLE, FORCE_SIGNAL

log = logging.getLogger(__name__)

BURST_LIST_LIMIT = 1000
MAX_LOADER_REBUILDS_PER_JOB = 3
EXIT_TOKEN_REJECTED = 3  # burst mode: the API answered 401/403 to the last listing, reserve or result post
# burst mode: the last listing failed through every retry (unreachable, 5xx, a bad body) or was refused
# other than for the token (a 404 from a wrong path in AMI_ANTENNA_API_BASE_URL); or in the last poll
# a job's reserve was refused other than for the token or a deleted job (a 400: a request it will not take)
EXIT_API_UNREACHABLE = 4
AUTH_BACKOFF_CAP_S = 300.0
EXIT_PIPELINE_UNAVAILABLE = 1  # burst mode: a job was left because its pipeline's models could not be loaded
PIPELINE_BACKOFF_CAP_S = 300.0
# The server marks a pull-mode service offline after 60 s without an API call: keep a margin.
KEEPALIVE_AFTER_S = 45.0
KEEPALIVE_POLL_S = 5.0
# The wake-up byte is written before the Python-level handler runs on the main thread, which then
# sets the flags between two bytecodes: a few milliseconds cover it on a busy host.
SIGNAL_SETTLE_S = 0.02


@dataclass
class StopState:
    """What the signal handlers set; read by the loop."""

    draining: bool = False
    forced: bool = False
    after_job: bool = False
    drain_deadline_s: Optional[float] = None


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
        planner: Optional[Planner] = None,
        burst: bool = False,
        cuda: bool = False,
        limits: Optional[Limits] = None,
        sampler: Optional[Sampler] = None,
        environ: Mapping[str, str] = {},
    ) -> None:
        self.settings = settings
        self.client = client
        self.poster = poster
        self.pipelines = pipelines
        self.pipeline_slugs = list(pipeline_slugs)
        self.middlewares = list(middlewares)
        self.planner = planner if planner is not None else SettingsPlanner()
        self.environ = environ  # the process environment as the CLI read it (OMP_NUM_THREADS, say)
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
        self.auth_failures_in_row = 0
        self._auth_wait_s = 0.0
        self.reserve_rejected = False  # a loader's reserve met 401/403 in the last poll
        self.reserve_refusals: dict[int, int] = {}  # job id -> a loader's reserve's other 4xx, last poll
        # pipeline slug -> (failed loads in a row, monotonic time of the next try)
        self.unavailable_pipelines: dict[str, tuple[int, float]] = {}
        self.listing_failure: Optional[str] = None  # how the last listing failed, unless for the token
        # torch's intra-op threads as the process started (CPU count or OMP_NUM_THREADS): what
        # probes time at, and what a plan with inference_threads=0 runs with.
        self.default_inference_threads = torch.get_num_threads()
        self._drain_timer: Optional[threading.Timer] = None  # forces the stop when the drain's grace is over
        self.keepalive_after_s = KEEPALIVE_AFTER_S
        # One attempt per keep-alive: the next comes a poll later anyway.
        self._keepalive_client = AntennaClient(settings.antenna_api_base_url, settings.token,
                                               timeout_s=settings.antenna_api_timeout_s, max_attempts=1)
        self._keepalive_stop = threading.Event()
        self._keepalive: Optional[threading.Thread] = None

    def add_sample_listener(self, listener: Callable[[MemorySnapshot], None]) -> None:
        """Call ``listener(snapshot)`` on the sampler thread after every memory sample."""
        self._sample_listeners.append(listener)

    def _on_sample(self, snapshot: MemorySnapshot) -> None:
        for listener in self._sample_listeners:
            listener(snapshot)

    # --- signals: handlers only set flags ---

    def install_signal_handlers(self) -> None:
        """Handlers that only set flags (main thread only). The interpreter writes each signal's
        number to a pipe (``signal.set_wakeup_fd``); a watcher thread reads it, passes the flags on
        to the live loader and wakes the loop. An ``Event.set()`` inside the handler could deadlock
        against the interrupted ``wait()``, which holds the same lock."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        if self.environ.get(FLEET_CHILD_VARIABLE) == "1":
            # A fleet's child: a stop sent to every process (scancel, a cgroup's SIGTERM) comes
            # twice, directly and from the parent; only the parent's FORCE_SIGNAL forces.
            signal.signal(signal.SIGTERM, self._on_drain)
            signal.signal(signal.SIGINT, self._on_drain)
            signal.signal(FORCE_SIGNAL, self._on_force)
        else:
            signal.signal(signal.SIGTERM, self._on_terminate)
            signal.signal(signal.SIGINT, self._on_terminate)
        signal.signal(signal.SIGUSR1, self._on_recycle)
        threading.Thread(target=self._watch_signals, args=(read_fd,), name="signal-watch", daemon=True).start()

    def _on_terminate(self, signum: int, _frame: object) -> None:
        if self.stop.draining:
            self.stop.forced = True
        else:
            self._on_drain(signum, _frame)

    def _on_drain(self, signum: int, _frame: object) -> None:
        if not self.stop.draining:
            self.stop.draining = True
            self.stop.drain_deadline_s = time.monotonic() + self.settings.shutdown_grace_s

    def _on_force(self, signum: int, _frame: object) -> None:
        self._on_drain(signum, _frame)
        self.stop.forced = True

    def _watch_signals(self, read_fd: int) -> None:
        while True:
            select.select([read_fd], [], [])
            if not os.read(read_fd, 512):
                return
            # The handler runs (in the main thread) after the wake-up byte is written: wait for its
            # flags before acting on them.
            time.sleep(SIGNAL_SETTLE_S)
            self.wake.set()
            self._flag_loader()
            self._flag_poster()

    def _flag_poster(self) -> None:
        """A drain replays no more spooled files; forced, or once the drain's grace is over, posts
        give up their retries: the loop may be blocked in ``submit`` behind retrying posts, where
        ``_check_stop`` cannot see the deadline."""
        if not self.stopping:
            return
        self.poster.stop_replay()
        if self.stop.forced:
            self.poster.give_up()
        elif self._drain_timer is None and self.stop.drain_deadline_s is not None:
            self._drain_timer = threading.Timer(max(0.0, self.stop.drain_deadline_s - time.monotonic()),
                                                self._drain_grace_over)
            self._drain_timer.daemon = True
            self._drain_timer.start()

    def _drain_grace_over(self) -> None:
        if self.stop.forced:
            return
        log.warning("drain grace of %.0f s is over: forcing", self.settings.shutdown_grace_s)
        self.stop.forced = True
        self._flag_loader()
        self.poster.give_up()
        self.wake.set()

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

    @property
    def stopping(self) -> bool:
        return self.stop.draining or self.stop.forced

    # --- the loop ---

    def run(self) -> int:
        """Run until stopped (or, in burst mode, until no job yields tasks). Returns the exit code."""
        self._call("on_start")
        if self.sampler is not None:
            self.sampler.start()
        self.planner.start(self)
        self._keepalive = threading.Thread(target=self._keep_alive, name="api-keepalive", daemon=True)
        self._keepalive.start()
        try:
            self.poster.replay_spool()
            while not self.stopping and not self.stop.after_job:
                did_work = self._poll_once()
                if self.burst and not did_work:
                    log.info("burst: no job yielded tasks; exiting")
                    break
                if not did_work and not self.stopping:
                    self._call("on_idle")
                    self.wake.wait(self._auth_wait_s or self.settings.antenna_idle_sleep_seconds)
                    self.wake.clear()
        finally:
            self._shutdown()
        return self._exit_code()

    def _keep_alive(self) -> None:
        """List jobs when no API call has been made for ``keepalive_after_s``: the server marks a
        pull-mode service offline after 60 s without a call, and a long batch, the probe of large
        images on a slow link, an auth backoff or a long idle sleep can each be that quiet. Loader
        workers' reserves count on the server but are not seen here: this may call when it need not."""
        clients = (self.client, self.poster.client, self._keepalive_client)
        while not self._keepalive_stop.wait(min(KEEPALIVE_POLL_S, self.keepalive_after_s / 4)):
            if time.monotonic() - max(client.last_call_s for client in clients) < self.keepalive_after_s:
                continue
            try:
                self._keepalive_client.list_jobs(self.pipeline_slugs, limit=1)
            except AntennaError as error:  # the loop's own calls report failures
                log.debug("keep-alive listing failed: %s", error)

    def _exit_code(self) -> int:
        if self.burst and (self.client.auth_rejected or self.poster.client.auth_rejected or self.reserve_rejected):
            log.error("burst: exiting %d, the API rejected the token: check AMI_ANTENNA_API_AUTH_TOKEN",
                      EXIT_TOKEN_REJECTED)
            return EXIT_TOKEN_REJECTED
        if self.burst and self.listing_failure is not None:
            log.error("burst: exiting %d, the last job listing %s: check AMI_ANTENNA_API_BASE_URL and the network",
                      EXIT_API_UNREACHABLE, self.listing_failure)
            return EXIT_API_UNREACHABLE
        if self.burst and self.reserve_refusals:
            job_id, status = next(iter(self.reserve_refusals.items()))
            log.error("burst: exiting %d, the API refused the reserve of job %d (HTTP %d; see the loader's WARNING "
                      "above), %d job(s) in all: check AMI_ANTENNA_API_BASE_URL and that the server speaks this "
                      "worker's API version", EXIT_API_UNREACHABLE, job_id, status, len(self.reserve_refusals))
            return EXIT_API_UNREACHABLE
        if self.burst and self.unavailable_pipelines:
            log.error("burst: exiting %d, the models of pipeline %s could not be loaded: their jobs were left "
                      "unreserved (see the lines above; `worker check` tries every pipeline)",
                      EXIT_PIPELINE_UNAVAILABLE, ", ".join(sorted(self.unavailable_pipelines)))
            return EXIT_PIPELINE_UNAVAILABLE
        return 0

    def _poll_once(self) -> bool:
        try:
            jobs = self.client.list_jobs(self.pipeline_slugs, limit=BURST_LIST_LIMIT if self.burst else None,
                                         every_page=self.burst)
        except AntennaError as error:
            self.listing_failure = _listing_failure(error)
            self._listing_failed(error)
            return False
        self.listing_failure = None
        self.reserve_rejected = False
        self.reserve_refusals = {}
        did_work = False
        rejecting = self.poster.rejected_jobs
        for job in jobs:
            if self.stopping or self.stop.after_job:
                break
            if job.id in rejecting:  # its results could not be posted: a reservation would only burn a delivery
                log.debug("job %d: skipped, the server rejects every result of it (%s)", job.id, rejecting[job.id])
                continue
            if not self._pipeline_ready(job):  # nothing could be done with its tasks: none is reserved
                continue
            did_work = self.process_job(job) > 0 or did_work
        if not self.reserve_rejected:
            self.auth_failures_in_row, self._auth_wait_s = 0, 0.0
        return did_work

    def _pipeline_ready(self, job: JobRef) -> bool:
        """Whether the job's pipeline has its models loaded (loading them now if needed); False,
        without trying, while a failed load's backoff runs."""
        slug = job.pipeline_slug
        down = self.unavailable_pipelines.get(slug)
        if down is not None and time.monotonic() < down[1]:
            log.debug("job %d: skipped, pipeline %s is unavailable (next load in %.0f s)", job.id, slug,
                      down[1] - time.monotonic())
            return False
        try:
            self.pipelines(slug).ensure_loaded()
        except PipelineUnavailable as error:
            self._pipeline_failed(slug, error)
            return False
        if down is not None:
            del self.unavailable_pipelines[slug]
            log.info("pipeline %s: models loaded after %d failed tries; its jobs are taken again", slug, down[0])
        return True

    def _pipeline_failed(self, slug: str, error: PipelineUnavailable) -> None:
        failures = self.unavailable_pipelines.get(slug, (0, 0.0))[0] + 1
        wait_s = self._poll_backoff_s(failures, PIPELINE_BACKOFF_CAP_S)
        self.unavailable_pipelines[slug] = (failures, time.monotonic() + wait_s)
        log.error("%s; no task of its jobs is reserved until they load (failed %d in a row; next try in %.0f s)",
                  error, failures, wait_s)

    def _poll_backoff_s(self, failures: int, cap_s: float) -> float:
        """The wait after ``failures`` in a row: from max(idle sleep, 1 s), doubling to ``cap_s``."""
        return backoff_delay_s(failures, base_s=max(self.settings.antenna_idle_sleep_seconds, 1.0), cap_s=cap_s)

    def _listing_failed(self, error: AntennaError) -> None:
        if not (isinstance(error, AntennaRejected) and error.auth):
            log.warning("listing jobs failed: %s", error)
            return
        self._token_rejected(f"listing jobs: {error}")

    def _token_rejected(self, what: str) -> None:
        """The API rejected the token (a listing, or a reserve in the loader): ERROR, back off, and
        in burst mode exit ``EXIT_TOKEN_REJECTED``. A reserve made in a loader worker is seen here
        only through the loader (the worker logged the server's answer and the superuser hint)."""
        self.auth_failures_in_row += 1
        self._auth_wait_s = max(self.settings.antenna_idle_sleep_seconds,
                                self._poll_backoff_s(self.auth_failures_in_row, AUTH_BACKOFF_CAP_S))
        log.error("%s: the API rejected the token (%d in a row); check AMI_ANTENNA_API_AUTH_TOKEN "
                  "(reserving tasks needs a superuser's); next try in %.1f s", what, self.auth_failures_in_row,
                  self._auth_wait_s)

    def process_job(self, job: JobRef) -> int:
        """Process what ``job`` hands out now; returns how many images got a result."""
        ctx = JobContext(job=job, pipeline=self.pipelines(job.pipeline_slug))
        self.current = ctx
        self._call("on_job_start", ctx)
        head_start = self._plan(ctx)
        if ctx.nothing_deliverable and head_start is None:
            log.debug("job %d: nothing deliverable now (the planner's reserve answered []): no loader this poll",
                      job.id)
        for attempt in range(MAX_LOADER_REBUILDS_PER_JOB + 1):
            if self.stopping or ctx.pipeline_unavailable or (ctx.nothing_deliverable and head_start is None):
                break  # no loader, so nothing more is reserved
            self._run_loader(ctx, head_start)
            if (ctx.rebuild_reason is None or ctx.results_rejected or self.stopping or ctx.pipeline_unavailable
                    or attempt == MAX_LOADER_REBUILDS_PER_JOB):
                break
            log.warning("job %d: rebuilding the loader with the minimal plan (%s)", job.id, ctx.rebuild_reason)
            ctx.rebuild_reason = None
            ctx.plan = MINIMAL_PLAN
        if head_start is not None:  # unless a loader's start handled them (no loader was built): here
            self._run_head_start(ctx, head_start)
        ctx.stats.tasks_stranded += self.poster.take_stranded(job.id)  # results it could not post nor spool
        self._call("on_job_end", ctx)
        self._set_inference_threads(self.default_inference_threads)
        self.current = None
        self.jobs_done += 1
        log.info("job %d: %d images (%d ok, %d failed), %.2f images/s, %d stranded; %s",
                 job.id, ctx.stats.images, ctx.stats.images_ok, ctx.stats.images_failed,
                 ctx.stats.images_per_s(), ctx.stats.tasks_stranded, ctx.stats.observed())
        return ctx.stats.images

    def _plan(self, ctx: JobContext) -> Optional[HeadStart]:
        """The planning step: the planner's batch (the probe's tasks) through the batch path, then
        the plan. The loop is ``ctx.plan``'s only writer. Returns the planner's head start, whose
        tasks the loop handles once the loader is started."""
        sample = self.planner.sample(self, ctx)
        try:
            if sample is not None:
                try:
                    self.handle_batch(ctx, sample)
                finally:
                    sample.release()
            ctx.plan = self.planner.plan(self, ctx)
        except BaseException:
            head_start = self.planner.head_start(self, ctx)
            if head_start is not None:  # held: released, not left to the reservation timeout
                self._release_head_start(ctx, head_start, "the planning step failed")
            raise
        return self.planner.head_start(self, ctx)

    def _run_head_start(self, ctx: JobContext, head_start: HeadStart, loader: Optional[Loader] = None) -> None:
        """The head start's images as they arrive, decoded here in batches of the plan's size,
        through the batch path; forced to stop, what is left is released."""
        if head_start.settled:
            return
        batch_size = max(1, ctx.plan.batch_size if ctx.plan is not None else 1)
        head_start.wait_reserved()
        if head_start.tasks:
            log.info("job %d: head start of %d tasks (at most %.0f MiB of images held), handled here while the "
                     "loader starts", ctx.job.id, len(head_start.tasks), head_start.budget.limit_bytes / 2**20)
        for batch in head_start.batches(batch_size, stopped=lambda: self.stop.forced,
                                          decoders=head_start_decoders(cpu_count())):
            try:
                self.handle_batch(ctx, batch)
            finally:
                batch.release()
            del batch
            if loader is not None and self._check_stop(ctx, loader):
                break
            if ctx.pipeline_unavailable:
                break
        if head_start.done:
            head_start.close()
            return
        self._release_head_start(ctx, head_start, ctx.pipeline_unavailable
                                 or "head start not processed before the worker was forced to stop")

    def _release_head_start(self, ctx: JobContext, head_start: HeadStart, why: str) -> None:
        left = head_start.abandon()
        ctx.stats.tasks_stranded += len(left)
        self.releaser.release(ctx.job.id, left, why)

    def _run_loader(self, ctx: JobContext, head_start: Optional[HeadStart] = None) -> None:
        assert ctx.plan is not None, "the planning step sets the plan before any loader"
        source = self.ingest_source(ctx.job.id)
        log.info("job %d: loader plan %s", ctx.job.id, ctx.plan.describe())
        self._set_inference_threads(ctx.plan.inference_threads or self.default_inference_threads)
        try:
            loader = Loader(source, ctx.plan)
        except LoaderFailed as error:  # out of file descriptors or processes: nothing was reserved
            log.error("job %d: loader failed: %s", ctx.job.id, str(error))
            ctx.request_rebuild(f"loader failed: {str(error)[:200]}")
            return
        with loader:
            ctx.loader = loader
            self._flag_loader()  # a stop since the check in process_job: its workers reserve nothing
            self._call("on_loader_start", ctx)
            try:
                if head_start is not None:  # while the loader's lanes make their first downloads
                    loader.start()
                    self._run_head_start(ctx, head_start, loader)
                for batch in (() if self.stop.forced else loader):
                    try:
                        self.handle_batch(ctx, batch)
                    finally:
                        batch.release()  # results are computed: loader workers may reuse the buffers
                    del batch  # not held while the next batch is awaited (one batch of images)
                    if self._check_stop(ctx, loader):
                        break
            except LoaderFailed as error:
                # A loader worker died (the kernel's OOM killer, a segfault in a decoder): what it
                # held is stranded below; the job goes on with a fresh, minimal loader.
                log.error("job %d: loader failed: %s", ctx.job.id, str(error))
                ctx.request_rebuild(f"loader failed: {str(error)[:200]}")
            ctx.loader = None
        # After close, not before: an abandoned loader's workers may still be inside a reserve
        # call or have ledger entries in flight; close() joins them and collects the ledger.
        refused_status = loader.reserve_refused_status()
        if refused_status in (401, 403):
            self.reserve_rejected = True
            self._token_rejected(f"the loader's reserve for job {ctx.job.id} got HTTP {refused_status}")
        elif refused_status is not None and refused_status != 404:  # 404: the job was deleted, its end
            self.reserve_refusals[ctx.job.id] = refused_status
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
        if (not self.stop.forced and self.stop.draining and self.stop.drain_deadline_s
                and time.monotonic() > self.stop.drain_deadline_s):
            self._drain_grace_over()
        if self.stop.forced:
            loader.abandon()
            return True
        if self.stop.draining:
            loader.stop_reserving(self.stop.drain_deadline_s)
        if not ctx.results_rejected and ctx.job.id in self.poster.rejected_jobs:
            # Every task reserved from now on would cost a delivery for a result the server refuses:
            # what the lanes hold is finished and spooled (for a restart once the cause is fixed).
            ctx.results_rejected = True
            log.error("job %d: no more tasks are reserved from it while the server rejects its results",
                      ctx.job.id)
            loader.stop_reserving()
        if ctx.rebuild_reason is not None:
            loader.abandon()  # batches already decoded still arrive and get posted
        if ctx.pipeline_unavailable:
            loader.abandon()  # what it holds is given back once it has stopped
            return True
        return False

    def handle_batch(self, ctx: JobContext, batch: Batch) -> None:
        """Infer ``batch``, hand its results to the poster, count them, call ``after_batch``.

        The loop's one batch path: the planner's probe batch and every loader batch come here.
        Whatever the pipeline raises, every item ends as a result (an error result where it failed),
        except where its models cannot be loaded: then no image was tried, and the tasks are given
        back (``ctx.pipeline_unavailable``), as are those of every later batch of the job.
        """
        if ctx.pipeline_unavailable:  # the models could not be loaded in this job: give the tasks back
            self._give_back(ctx, batch)
            return
        started_s, started_cpu_s = time.perf_counter(), time.process_time()
        try:
            results = self._infer(ctx, batch)
        except PipelineUnavailable as error:
            ctx.pipeline_unavailable = f"its pipeline's models could not be loaded ({error})"
            self._pipeline_failed(ctx.job.pipeline_slug, error)
            self._give_back(ctx, batch)
            return
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

    def _give_back(self, ctx: JobContext, batch: Batch) -> None:
        """No result for ``batch``'s tasks: released (or left for the reservation timeout)."""
        tasks = [item.task for item in batch.items]
        ctx.stats.tasks_stranded += len(tasks)
        self.releaser.release(ctx.job.id, tasks, ctx.pipeline_unavailable or "not processed")

    def _infer(self, ctx: JobContext, batch: Batch) -> list[ImageResult]:
        try:
            return run_batch(ctx.pipeline, batch.items, ctx.job.pipeline_slug)
        except PipelineUnavailable:
            raise
        except Exception as error:  # a pipeline that breaks its contract costs this batch, not the job
            log.exception("job %d: pipeline %s failed on a batch of %d images: each gets an error result",
                          ctx.job.id, ctx.job.pipeline_slug, len(batch.items))
            failure = Failure("pipeline", f"batch processing failed: {type(error).__name__}: {str(error)[:300]}")
            return [ImageResult.error(item.task, failure) for item in batch.items]

    def ingest_source(self, job_id: int) -> IngestSource:
        s = self.settings
        return IngestSource(
            base_url=s.antenna_api_base_url, token=s.token, job_id=job_id,
            api_timeout_s=s.antenna_api_timeout_s, api_max_attempts=s.antenna_api_max_attempts,
            image_timeout_s=image_timeout_s(s), image_deadline_s=s.image_download_deadline_s,
            block_private_hosts=s.block_private_image_hosts, max_image_bytes=s.max_image_bytes,
            max_image_pixels=s.max_image_pixels, client_info=self.client_info,
        )

    def _shutdown(self) -> None:
        """One ordered sequence under one deadline: flush posts, hooks, close."""
        if self._drain_timer is not None:  # from here the flush below keeps the deadline
            self._drain_timer.cancel()
        self._keepalive_stop.set()  # the flush's posts are calls of their own
        deadline_s = self.stop.drain_deadline_s or (time.monotonic() + self.settings.shutdown_grace_s)
        remaining_s = max(1.0, deadline_s - time.monotonic())
        log.info("shutdown: flushing %d pending result posts (%.1f s left)", self.poster.pending_posts, remaining_s)
        if not self.poster.flush(timeout_s=remaining_s):
            log.error("shutdown: result posts still pending at the deadline")
        self._call("on_stop")
        if self.sampler is not None:
            self.sampler.stop()
        self.poster.close()
        if self._keepalive is not None:  # a listing in flight is not waited for: the thread is a daemon
            self._keepalive.join(timeout=1.0)
        self._keepalive_client.close()
        self.client.close()
        counters = self.poster.counters
        log.info("shutdown complete: %d jobs, %d results posted, %d spooled, %d results stranded (neither "
                 "posted nor spooled)", self.jobs_done, counters.posted_items, counters.spooled_items,
                 counters.spool_failed_items)

    def _call(self, hook: str, *args: object) -> None:
        for middleware in self.middlewares:
            try:
                getattr(middleware, hook)(self, *args)
            except Exception:
                log.exception("%s.%s failed", type(middleware).__name__, hook)


def _listing_failure(error: AntennaError) -> Optional[str]:
    """How a listing failed, for ``--burst``'s exit line; None when the token was rejected (that
    has its own exit code)."""
    if isinstance(error, AntennaRejected) and error.auth:
        return None
    how = "failed through every retry" if isinstance(error, AntennaUnavailable) else "was refused"
    return f"{how} ({str(error).splitlines()[0][:200]})"
