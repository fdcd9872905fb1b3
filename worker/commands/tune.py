"""``worker tune``: a dry run of autotune for operators.

Probes a sample of a job (``--job ID``), of the next job of the configured pipelines (no
argument), or of sample images (``--images DIR|URL...``: downloaded or read and decoded here, no
task reserved), then prints the measured numbers, the memory table of the recommended plan next
to the current settings', the predicted images/s of each, what in the current settings exceeds
the budget and by how much, and the env lines to pin a good static plan (``--write-env FILE``
writes them). Probed tasks are inferred and their results posted like the worker's own: a tune
run never strands a task, and says so. The API token never reaches the output.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, TextIO

import torch

from autotune import (
    MemoryCalibration,
    PlanConstraints,
    PlanDecision,
    Probe,
    choose_plan,
    compare_table,
    load_calibration,
    price_plan,
)
from autotune.corrections import CorrectionStore, default_correction_path
from autotune.planner import BATCH_SIZES
from autotune.throughput_model import bounds, connections_in_flight
from worker.antenna import JobRef
from worker.hooks import JobContext
from worker.imaging import image_session
from worker.loading import ImageLoader, LoadedImage
from worker.planning import THREADS_ENV, constraints_for, env_name_for, plan_from_settings
from worker.probing import (
    ImageGeometry,
    baseline_bytes,
    cpu_count,
    fit_probe,
    image_samples,
    inference_memory,
    openmp_threads_sleep,
    overhead_floor,
    sample_job,
    time_inference,
)
from worker.schema import Task
from worker.settings import Settings, SettingsError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
MAX_LOCAL_IMAGES = 8

# Env names per LoaderPlan field that a static setting can express (one batch size for both).
ENV_NAMES = tuple((env_name_for(field), field) for field in (
    "batch_size", "num_workers", "prefetch_factor", "pin_memory", "download_threads",
)) + ((THREADS_ENV, "inference_threads"),)  # torch's intra-op threads; 0 (default) writes no line
# Which settings drive each memory component (for "what exceeds the budget").
COMPONENT_SETTINGS = {
    "loader worker processes": "AMI_ANTENNA_API_DATALOADER_NUM_WORKERS",
    "in-flight downloads": "AMI_ANTENNA_API_DATALOADER_DOWNLOAD_THREADS x AMI_ANTENNA_API_DATALOADER_NUM_WORKERS",
    "decode scratch": "AMI_ANTENNA_API_DATALOADER_NUM_WORKERS",
    "batches assembling/queued": "AMI_ANTENNA_API_BATCH_SIZE x AMI_ANTENNA_API_DATALOADER_PREFETCH_FACTOR "
                                 "x AMI_ANTENNA_API_DATALOADER_NUM_WORKERS",
    "pinned copies": "AMI_ANTENNA_API_DATALOADER_PIN_MEMORY",
    "batch being inferred": "AMI_ANTENNA_API_BATCH_SIZE",
}


@dataclass(frozen=True)
class TuneReport:
    """Everything ``worker tune`` prints."""

    source: str
    probe: Probe
    recommended: PlanDecision
    static: PlanDecision
    current: PlanDecision
    constraints: PlanConstraints
    tasks_probed: int
    results_posted: int
    # What `worker run` plans with autotune on: the operator's pinned knobs kept, the rest chosen.
    # None when nothing is pinned (then it is the recommended plan).
    at_run: Optional[PlanDecision] = None

    def env_lines(self) -> list[str]:
        """``NAME=value`` for the static plan (booleans as ``true``/``false``)."""
        plan = self.static.plan
        return [f"{name}={_env_value(getattr(plan, field))}" for name, field in ENV_NAMES
                if not (field == "inference_threads" and plan.inference_threads == 0)]

    def text(self) -> str:
        c = self.constraints
        limits = bounds(self.probe, connections_in_flight(self.recommended.plan))
        out = [f"worker tune: {self.source}", "", "Measured", self.probe.describe(), "",
               "Bounds (each stage alone; no plan beats the lowest)", *limits.lines(self.probe),
               f"  the recommended plan is {self.recommended.rate.regime or self.recommended.rate.bottleneck}: "
               f"{self.recommended.rate.pipeline_images_per_s:.2f} images/s predicted", "",
               f"Budget: {c.budget_bytes / MiB:,.0f} MiB ((effective limit - reserve) x safety), "
               f"reservation timeout {c.reservation_timeout_s:.0f} s", "",
               "Predicted peak memory: recommended plan vs current settings",
               compare_table(self.recommended.memory, self.current.memory, ("recommended", "current")), "",
               f"recommended  {self.recommended.plan.describe()}",
               f"             {self.recommended.rate.describe()}",
               f"current      {self.current.plan.describe()}",
               f"             {self.current.rate.describe()}", ""]
        if self.at_run is not None:
            out[-1:] = [f"with your pins {self.at_run.plan.describe()}",
                        f"             {self.at_run.rate.describe()}; predicted peak "
                        f"{self.at_run.memory.total_bytes / MiB:,.0f} MiB",
                        "             (what `worker run` plans with AMI_AUTOTUNE=true: your pinned knobs as "
                        "given, the rest chosen)", ""]
        out.extend(self._over_budget_lines())
        out.extend(["", "Recommended env lines (a static plan settings can express: one batch size for reserve "
                    f"and inference; predicted {self.static.rate.pipeline_images_per_s:.2f} images/s, "
                    f"peak {self.static.memory.total_bytes / MiB:,.0f} MiB)"])
        out.extend(self.env_lines())
        out.append("# or keep AMI_AUTOTUNE=true (the default) and leave these unset: the worker then plans per job")
        if c.pinned:
            out.append("# note: your settings pin " + ", ".join(f"{k}={v}" for k, v in sorted(c.pinned.items()))
                       + "; at run time autotune keeps those as given (the 'with your pins' plan above)")
        out.extend(["", self._tasks_line()])
        return "\n".join(out) + "\n"

    def _over_budget_lines(self) -> list[str]:
        over = self.current.memory.bound_bytes - self.constraints.budget_bytes
        if over <= 0:
            return [f"Current settings fit the budget: predicted peak {self.current.memory.bound_bytes / MiB:,.0f} MiB "
                    f"with every queue full <= {self.constraints.budget_bytes / MiB:,.0f} MiB"]
        lines = [f"Current settings EXCEED the budget by {over / MiB:,.0f} MiB "
                 f"({self.current.memory.bound_bytes / MiB:,.0f} MiB predicted with every queue full vs "
                 f"{self.constraints.budget_bytes / MiB:,.0f} MiB):"]
        for (label, current), (_, recommended) in zip(self.current.memory.components(),
                                                      self.recommended.memory.components()):
            if current > recommended and label in COMPONENT_SETTINGS:
                lines.append(f"  {label}: {current / MiB:,.0f} MiB (+{(current - recommended) / MiB:,.0f} MiB "
                             f"over the recommended plan), set by {COMPONENT_SETTINGS[label]}")
        return lines

    def _tasks_line(self) -> str:
        if self.tasks_probed == 0:
            return "No task was reserved (sample images only): nothing to post, nothing stranded."
        return (f"{self.tasks_probed} tasks were reserved for the probe; {self.results_posted} results were "
                "posted to the API (inferred like any others): no task stranded.")


def _env_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def static_decision(probe: Probe, constraints: PlanConstraints, calibration: MemoryCalibration,
                    correction: float) -> PlanDecision:
    """Best plan with tasks_per_reserve == batch_size (what AMI_ANTENNA_API_BATCH_SIZE expresses)."""
    best: Optional[PlanDecision] = None
    for size in BATCH_SIZES:
        pinned = {**constraints.pinned, "tasks_per_reserve": size, "batch_size": size}
        option = choose_plan(probe, PlanConstraints(
            constraints.budget_bytes, constraints.reservation_timeout_s, constraints.cuda,
            constraints.cpu_count, pinned, constraints.max_workers, constraints.timeout_margin,
        ), calibration, correction)
        if not option.fits:
            continue
        if best is None or option.rate.pipeline_images_per_s > best.rate.pipeline_images_per_s * 1.02:
            best = option
    return best or choose_plan(probe, constraints, calibration, correction)


def tune_report(worker, probe: Probe, source: str, tasks_probed: int, results_posted: int,
                pipeline_slug: str) -> TuneReport:
    settings: Settings = worker.settings
    calibration = load_calibration()
    correction = CorrectionStore(default_correction_path(settings.user_data_path)).get(pipeline_slug)
    constraints = constraints_for(worker, probe)
    free = PlanConstraints(constraints.budget_bytes, constraints.reservation_timeout_s, constraints.cuda,
                           constraints.cpu_count)
    recommended = choose_plan(probe, free, calibration, correction)
    current = price_plan(plan_from_settings(settings, cuda=worker.cuda), probe, free, calibration, correction)
    static = static_decision(probe, free, calibration, correction)
    at_run = choose_plan(probe, constraints, calibration, correction) if constraints.pinned else None
    return TuneReport(source, probe, recommended, static, current, constraints, tasks_probed, results_posted,
                      at_run)


def tune_job(worker, job: JobRef, probe_tasks: int) -> Optional[TuneReport]:
    """Probe ``job`` through the worker's own path, post the probed results, report."""
    pipeline = worker.pipelines(job.pipeline_slug)
    ctx = JobContext(job=job, pipeline=pipeline)
    sample = sample_job(worker.client, job, pipeline, worker.settings, tasks_wanted=probe_tasks,
                        client_info=worker.client_info, cuda=worker.cuda,
                        threads_sleep=openmp_threads_sleep(worker.environ))
    if sample.batch is not None:
        try:
            worker.handle_batch(ctx, sample.batch)  # posted like the worker's own
        finally:
            sample.batch.release()
    run = fit_probe(sample, ctx.stats, worker.settings, calibration=load_calibration(), cuda=worker.cuda,
                    forward_batch_size=pipeline.localization_batch_size)
    if not worker.poster.flush(timeout_s=worker.settings.shutdown_grace_s):
        log.error("tune: result posts still pending; they were spooled or will be redelivered")
    if run.probe is None:
        return None
    source = (f"job {job.id} (pipeline {job.pipeline_slug}), probe of {run.tasks} tasks in {run.wall_s:.2f} s")
    return tune_report(worker, run.probe, source, run.tasks, ctx.stats.images, job.pipeline_slug)


def tune_images(worker, sources: Sequence[str], pipeline_slug: str) -> Optional[TuneReport]:
    """Probe local files or URLs: nothing is reserved or posted."""
    pipeline = worker.pipelines(pipeline_slug)
    items, samples = _load_images(_expand(sources), worker.settings)
    inference = time_inference(pipeline, items, pipeline_slug, cuda=worker.cuda,
                               threads_sleep=openmp_threads_sleep(worker.environ))
    if not samples or not inference:
        return None
    geometry = ImageGeometry.largest(pipeline, samples)
    probe = Probe.from_samples(samples, inference, baseline_bytes=baseline_bytes(items), cpu_count=cpu_count(),
                               cuda=worker.cuda, reservation_timeout_s=worker.settings.antenna_reservation_timeout_s,
                               max_pending_posts=worker.settings.antenna_max_pending_posts,
                               forward_batch_size=pipeline.localization_batch_size,
                               inference_threads=torch.get_num_threads(),
                               inference_overhead_floor_s=overhead_floor(pipeline) or 0.0,
                               inference_memory=None if worker.cuda else inference_memory(pipeline),
                               model_input_pixels=geometry.model_input_pixels,
                               float_copy_bytes_per_image=geometry.float_copy_bytes)
    del items  # before planning: the sample images are not part of any plan's memory
    return tune_report(worker, probe, f"{len(samples)} sample images (pipeline {pipeline_slug}); "
                       "local files time as a fast network", 0, 0, pipeline_slug)


def _expand(sources: Sequence[str]) -> list[str]:
    out: list[str] = []
    for source in sources:
        path = Path(source)
        if source.startswith(("http://", "https://")):
            out.append(source)
        elif path.is_dir():
            out.extend(str(p) for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            out.append(str(path))
        else:
            raise SettingsError(f"--images {source}: not a folder, a file or an http(s) URL")
    if not out:
        raise SettingsError("--images: no images found (looked for " + ", ".join(IMAGE_SUFFIXES) + ")")
    return out[:MAX_LOCAL_IMAGES]


def _load_images(sources: Sequence[str], settings: Settings) -> tuple[list[LoadedImage], list]:
    """Each of ``sources`` loaded one after another through the worker's own image path and
    limits (``worker.loading.ImageLoader``), local files read as they are; an unusable one is
    logged and left out of the samples."""
    images = ImageLoader.from_settings(settings, local_files=True)
    session = image_session(1)
    items: list[LoadedImage] = []
    try:
        for index, source in enumerate(sources):
            task = Task(id=f"tune-{index}", image_id=Path(source).name, image_url=source, reply_subject="tune")
            item = images.load(session, task)
            if item.error is not None:
                log.warning("tune: %s unusable: %s", source, item.error)
            items.append(item)
    finally:
        session.close()
    return items, image_samples(items)


def run_tune(settings: Settings, *, job_id: Optional[int], images: Sequence[str], pipeline: Optional[str],
             write_env: Optional[Path], out: TextIO, probe_tasks: Optional[int] = None,
             environ: Mapping[str, str] = {}) -> int:
    """The ``worker tune`` command; returns the exit code."""
    from worker.app import build_worker, offered_slugs

    if write_env is not None:
        _check_writable(write_env)  # before anything is reserved
    worker = build_worker(settings, burst=True, middlewares=[], environ=environ)
    try:
        slugs = offered_slugs(settings)
        tasks = probe_tasks or settings.autotune_probe_tasks
        if images:
            try:
                worker.pipelines(pipeline or slugs[0])
            except ValueError as error:  # an unknown slug
                raise SettingsError(f"--pipeline: {str(error).splitlines()[0]}") from None
            report = tune_images(worker, images, pipeline or slugs[0])
        else:
            job = _pick_job(worker, job_id, slugs)
            if job is None:
                print("worker tune: no incomplete job for pipelines " + ", ".join(slugs)
                      + "; pass --job ID or --images DIR", file=out)
                return 1
            report = tune_job(worker, job, tasks)
        if report is None:
            print("worker tune: no usable image in the sample (see the log); nothing to recommend", file=out)
            return 1
        out.write(report.text())
        if write_env is not None:
            write_env.write_text("\n".join(report.env_lines()) + "\n", encoding="utf-8")
            print(f"wrote {len(report.env_lines())} env lines to {write_env}", file=out)
        return 0
    finally:
        worker.poster.close()
        worker.client.close()


def _check_writable(path: Path) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK) or (
            path.exists() and not os.access(path, os.W_OK)):
        raise SettingsError(f"--write-env {path}: cannot write a file there")


def _pick_job(worker, job_id: Optional[int], slugs: Sequence[str]) -> Optional[JobRef]:
    """The job to probe: ``job_id`` if it is an incomplete job of an offered pipeline, else the
    first such job. A job of a pipeline this worker does not offer is refused (``worker run``
    never takes it, and its results would be posted under the wrong pipeline); one not listed at
    all (complete, not a pull-mode job, unknown) is left to the server to answer: its reserve
    gets nothing, or an error."""
    jobs = worker.client.list_jobs(slugs, limit=1000, every_page=True)
    if job_id is None:
        return jobs[0] if jobs else None
    for job in jobs:
        if job.id == job_id:
            return job
    for job in worker.client.list_jobs(None, limit=1000, every_page=True):
        if job.id == job_id:
            raise SettingsError(f"--job {job_id} is a job of pipeline {job.pipeline_slug!r}, which this worker "
                                f"does not offer (AMI_ANTENNA_PIPELINES: {', '.join(slugs)}); nothing reserved")
    return JobRef(job_id, slugs[0])
