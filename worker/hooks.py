"""The hook contract between the loop and its middlewares, and the per-job context they share.

Policy plugs in here (the watchdog, metrics, the progress line, systemd notifications, autotune's
learning) so the loop grows no special cases (dramatiq's ``Middleware`` is the model). The loop
(``worker.daemon.Worker``) calls every hook on its own thread, the loop thread, and calls each
hook on the middlewares in stack order (``worker.middleware.build_middlewares``); a hook that
raises is logged and does not stop the loop or the other middlewares.

A job runs as: every ``on_job_start``; the planning step (``worker.planning``: the planner may
hand the loop the probe's batch, which goes through ``after_batch`` like any other, then the loop
writes ``ctx.plan``); then per loader (one, or more after a rebuild) ``on_loader_start`` and
``after_batch`` per batch; then every ``on_job_end``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from autotune import LoaderPlan, PlanConstraints, PlanDecision, Probe

if TYPE_CHECKING:
    from worker.antenna import JobRef
    from worker.daemon import Worker
    from worker.ingest import Batch, Loader
    from worker.pipelines import Pipeline
    from worker.results import FailureReason, ImageResult


@dataclass
class JobStats:
    """Counts and timings of one job; the loop is their only writer."""

    images_ok: int = 0
    images_failed: int = 0
    failures_by_reason: "dict[FailureReason, int]" = field(default_factory=dict)
    batches: int = 0
    tasks_stranded: int = 0
    download_bytes: int = 0
    last_inference_s: float = 0.0
    last_inference_cpu_s: float = 0.0  # the process's CPU seconds over that batch (all threads)
    started_s: float = field(default_factory=time.monotonic)
    # Sums over the images that loaded (``timed_images``) and over batches: what the job saw, to
    # set beside what the probe measured (downloads slow down when the host is busy, say).
    timed_images: int = 0
    download_s: float = 0.0
    decode_s: float = 0.0
    inference_s: float = 0.0

    def observed(self) -> str:
        """Mean seconds per loaded image: download, decode, inference (per batch over its images)."""
        if not self.timed_images:
            return "no image loaded"
        n = self.timed_images
        return (f"per image: download {self.download_s / n:.3f} s, decode {self.decode_s / n:.4f} s, "
                f"inference {self.inference_s / max(1, self.images):.4f} s over {self.batches} batches")

    @property
    def images(self) -> int:
        return self.images_ok + self.images_failed

    def images_per_s(self) -> float:
        elapsed_s = time.monotonic() - self.started_s
        return self.images / elapsed_s if elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class JobTuning:
    """What autotune measured and decided for a job; written by ``AutotunePlanner``, read after the
    job by the autotune middleware (corrections, advisory) and by the metrics."""

    probe: Probe
    decision: PlanDecision
    constraints: PlanConstraints
    correction: float
    probe_wall_s: float
    probe_overhead_s: float


@dataclass
class JobContext:
    """One job's shared state. ``plan`` is None until the loop's planning step, which runs after
    every ``on_job_start``; the loop is its only writer (the planner's value, or the minimal plan
    on a rebuild)."""

    job: "JobRef"
    pipeline: "Pipeline"
    plan: Optional[LoaderPlan] = None
    stats: JobStats = field(default_factory=JobStats)
    loader: Optional["Loader"] = None
    tuning: Optional[JobTuning] = None
    rebuild_reason: Optional[str] = None  # set (with a reason) to rebuild the loader with the minimal plan
    results_rejected: bool = False  # the server rejects every result of the job: the loop reserves it no more
    pipeline_unavailable: Optional[str] = None  # its models could not be loaded: what is held is given back
    nothing_deliverable: bool = False  # the planner's reserve answered []: no loader for the job this poll

    def request_rebuild(self, reason: str) -> None:
        """Ask the loop to end this loader and go on with the minimal plan. Any thread may call it;
        the loop acts between batches."""
        self.rebuild_reason = reason


class Middleware:
    """Override what you need; every hook has a no-op default.

    ``worker`` gives read access to the settings, the client, the poster, the limits and the
    sampler. Unless a hook says otherwise it runs on the loop thread, and a middleware may write
    only its own state and the ``JobContext`` fields its hook names.
    """

    def on_start(self, worker: "Worker") -> None:
        """Once per ``Worker.run``, before the sampler starts, the planner's start and any poll. In
        stack order: a later middleware (systemd's READY=1) runs after the earlier ones are ready.
        May register sample listeners (``worker.add_sample_listener``: those run on the sampler
        thread and must only read the snapshot and set their own state)."""

    def on_idle(self, worker: "Worker") -> None:
        """When a poll found no work, before the idle sleep."""

    def on_job_start(self, worker: "Worker", ctx: JobContext) -> None:
        """Before the job's planning step: ``ctx.plan`` is still None and no task is reserved. May
        reset per-job state; must not reserve tasks."""

    def on_loader_start(self, worker: "Worker", ctx: JobContext) -> None:
        """A loader for ``ctx.plan`` has started (``ctx.loader`` is live): once per job, again after
        each rebuild. May apply limits to the loader (the watchdog does)."""

    def after_batch(self, worker: "Worker", ctx: JobContext, batch: "Batch", results: "list[ImageResult]") -> None:
        """A batch was inferred and its ``results`` handed to the poster (one per item, in order);
        ``ctx.stats`` already counts it. The probe's batch comes here too, before ``ctx.plan`` is
        set. Must not keep ``batch``: its images return to the loader once the hooks are done."""

    def on_job_end(self, worker: "Worker", ctx: JobContext) -> None:
        """After the job's last loader closed and its stranded tasks were counted."""

    def on_stop(self, worker: "Worker") -> None:
        """Once, during shutdown, after pending result posts were flushed and before the sampler and
        the poster stop. Runs whatever ended the loop (signals, burst end, an error)."""
