"""Autotune's learning after each job: the observed peak of the process tree against the raw
predicted peak (the per-pipeline correction learns from it), and a memory advisory under
``AMI_USER_DATA_PATH/advisories/``.

The probe and the plan are the loop's planning step (``worker.planning.AutotunePlanner``), which
leaves what it measured in ``JobContext.tuning``; this middleware only reads it.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from autotune import CorrectionStore, MemoryCalibration, build_advisory, load_calibration, plan_options, write_advisory
from autotune.corrections import default_correction_path
from autotune.files import write_json_atomically
from watchdog.sampler import MemorySnapshot, sample_tree
from worker.hooks import JobContext, JobTuning, Middleware
from worker.ingest import Batch
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.daemon import Worker
    from worker.results import ImageResult

log = logging.getLogger(__name__)


class TuningMiddleware(Middleware):
    """After each autotuned job: learn the memory correction, write the advisory."""

    def __init__(self, settings: Settings, calibration: Optional[MemoryCalibration] = None) -> None:
        self.calibration = calibration or load_calibration()
        self.corrections = CorrectionStore(default_correction_path(settings.user_data_path))
        self.advisory_dir = Path(settings.user_data_path) / "advisories"
        self._lock = threading.Lock()
        self._peak_bytes = 0
        self._end_of_batch_bytes: list[int] = []
        self._listening = False
        self._latest: Optional[MemorySnapshot] = None

    def on_start(self, worker: "Worker") -> None:
        if not self._listening:
            worker.add_sample_listener(self._on_sample)
            self._listening = True

    def _on_sample(self, snapshot: MemorySnapshot) -> None:
        with self._lock:
            self._latest = snapshot
            self._peak_bytes = max(self._peak_bytes, observed_bytes(snapshot))

    def on_job_start(self, worker: "Worker", ctx: JobContext) -> None:
        with self._lock:  # the job's peak includes its probe, which runs after this hook
            self._peak_bytes, self._end_of_batch_bytes = 0, []

    def after_batch(self, worker: "Worker", ctx: JobContext, batch: Batch, results: "list[ImageResult]") -> None:
        with self._lock:
            latest = self._latest
        if latest is not None:
            self._end_of_batch_bytes.append(observed_bytes(latest))

    def on_job_end(self, worker: "Worker", ctx: JobContext) -> None:
        tuning = ctx.tuning
        if tuning is None:
            return
        with self._lock:
            observed = self._peak_bytes
            end_of_batch = list(self._end_of_batch_bytes)
        if observed <= 0:  # no sampler running: one exact reading is better than none
            observed = observed_bytes(sample_tree(os.getpid()))
        slug = ctx.job.pipeline_slug
        try:
            self.corrections.update(slug, tuning.decision.memory.raw_job_peak_bytes, observed)
            self._write_advisory(worker, ctx, tuning, observed, end_of_batch)
        except OSError as error:  # an unwritable AMI_USER_DATA_PATH: said once at the start, here per job
            log.warning("job %d: memory correction and advisory not saved under %s (%s)", ctx.job.id,
                        worker.settings.user_data_path, error.strerror or error)

    def _write_advisory(self, worker: "Worker", ctx: JobContext, tuning: JobTuning,
                        observed_peak_bytes: int, end_of_batch: list[int]) -> None:
        settings = worker.settings
        alternatives = plan_options(tuning.probe, tuning.constraints, self.calibration, tuning.correction)
        advisory = build_advisory(
            ctx.job.pipeline_slug, ctx.job.id,
            limit_bytes=worker.limits.effective_limit_bytes if worker.limits else 0,
            reserve_bytes=settings.memory_reserve_bytes, safety_factor=settings.memory_safety_factor,
            memory_samples_bytes=end_of_batch, peak_bytes=observed_peak_bytes,
            predicted_bytes=tuning.decision.memory.job_peak_bytes, plan=tuning.decision.plan,
            alternatives=alternatives,
        )
        path = write_advisory(advisory, self.advisory_dir)
        write_json_atomically(path.with_name(path.stem + ".plan.json"), {
            "probe": tuning.probe.as_dict(), "decision": tuning.decision.as_dict(),
            "probe_wall_s": tuning.probe_wall_s, "probe_overhead_s": tuning.probe_overhead_s,
            "observed_peak_bytes": observed_peak_bytes,
            "images": ctx.stats.images,
        })
        log.info("job %d: memory advisory written to %s", ctx.job.id, path)


def observed_bytes(snapshot: MemorySnapshot) -> int:
    """The tree's memory in the model's terms: PSS less shmem, plus every /dev/shm segment once.

    Plain PSS misses decoded batches queued in shared memory (held by a descriptor, or mapped
    but not yet read), and holds the segments a process has mapped and touched (a loader's
    reused image buffers): PSS plus the segments would count those twice. Without an owned
    cgroup this is the sampler's ``used_bytes``; with one, ``used_bytes`` is the cgroup's usage,
    page cache included, and the same two parts are read beside it.
    """
    return snapshot.tree_private_bytes + snapshot.shm_bytes
