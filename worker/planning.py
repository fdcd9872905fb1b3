"""Planning, a step of the loop: after every middleware's ``on_job_start``, the loop asks its one
``Planner`` for the job's ``LoaderPlan`` and writes it to ``JobContext.plan`` (the plan's only
writer).

- ``SettingsPlanner``: the plan the operator's settings describe (ADC's meanings); autotune off.
- ``AutotunePlanner``: probes the job (``worker.probing``), then lets ``autotune.choose_plan`` pick
  the plan within the memory budget; what it measured goes to ``JobContext.tuning``.
- ``ForcedPlanner``: one full plan for every job, ``tensor_dtype`` included
  (``AMI_BENCHMARK_PLAN_JSON``, benchmarks only: it reproduces the ADC worker's float32 ingest).

A planner may hand the loop a batch first (``Planner.sample``: the probe's reserved tasks), which
the loop processes through its own batch path before it asks for the plan.
"""
from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Mapping, Optional

import torch

from autotune import (
    MINIMAL_PLAN,
    CorrectionStore,
    LoaderPlan,
    MemoryCalibration,
    PlanConstraints,
    Probe,
    budget_bytes,
    choose_plan,
    load_calibration,
)
from autotune.corrections import default_correction_path
from watchdog.limits import Limits, read_limits
from worker.antenna import AntennaError
from worker.hooks import JobContext, JobTuning
from worker.head_start import HeadStart
from worker.ingest import Batch
from worker.pipelines import Pipeline, one_image_s
from worker.probing import (
    ProbeRun,
    ProbeSample,
    fit_probe,
    openmp_threads_sleep,
    overhead_floor,
    plan_device_batches,
    sample_job,
)
from worker.settings import Settings, SettingsError

if TYPE_CHECKING:
    from worker.daemon import Worker

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Start-up time autotune may spend timing the offered pipelines' per-batch cost (see AutotunePlanner.start).
START_MEASURING_BUDGET_S = 30.0
# OpenMP's (and so torch's) thread count: set, it pins the plan's inference_threads.
THREADS_ENV = "OMP_NUM_THREADS"

# The one mapping from operator settings to the LoaderPlan fields they pin (env name -> fields).
# AMI_ANTENNA_API_BATCH_SIZE is ADC's one number for both the reserve size and the inference
# batch, so it pins both. ``worker tune`` writes env lines from the same table.
PINNING_SETTINGS: dict[str, tuple[str, ...]] = {
    "AMI_ANTENNA_API_BATCH_SIZE": ("tasks_per_reserve", "batch_size"),
    "AMI_ANTENNA_API_DATALOADER_NUM_WORKERS": ("num_workers",),
    "AMI_NUM_WORKERS": ("num_workers",),
    "AMI_ANTENNA_API_DATALOADER_PREFETCH_FACTOR": ("prefetch_factor",),
    "AMI_ANTENNA_API_DATALOADER_PIN_MEMORY": ("pin_memory",),
    "AMI_ANTENNA_API_DATALOADER_DOWNLOAD_THREADS": ("download_threads",),
}


def env_name_for(field_name: str) -> str:
    """The first setting in ``PINNING_SETTINGS`` that pins ``field_name`` (the name to write)."""
    return next(name for name, fields in PINNING_SETTINGS.items() if field_name in fields)


def settings_plan_fields(settings: Settings, *, cuda: bool) -> dict[str, object]:
    """The LoaderPlan fields the settings give (set or default)."""
    return {
        "tasks_per_reserve": settings.antenna_api_batch_size,
        "batch_size": settings.antenna_api_batch_size,
        "num_workers": settings.dataloader_num_workers,
        "prefetch_factor": settings.antenna_api_dataloader_prefetch_factor,
        # Pinned host memory only helps host->GPU copies; without CUDA it is pure cost.
        "pin_memory": settings.antenna_api_dataloader_pin_memory and cuda,
        "download_threads": settings.antenna_api_dataloader_download_threads,
    }


def plan_from_settings(settings: Settings, *, cuda: bool) -> LoaderPlan:
    """The plan the operator's settings describe (ADC's meanings), used when autotune is off."""
    return LoaderPlan(**settings_plan_fields(settings, cuda=cuda), source="settings")  # type: ignore[arg-type]


def pinned_fields(settings: Settings, *, cuda: bool, environ: Mapping[str, str] = {}) -> dict[str, object]:
    """LoaderPlan fields the operator set explicitly, with the values their settings give.

    ``environ`` is the process environment as the CLI read it: ``OMP_NUM_THREADS`` there (torch
    read it at import) means the operator chose the inference threads.
    """
    values = settings_plan_fields(settings, cuda=cuda)
    pinned: dict[str, object] = {}
    for name in sorted(settings.explicitly_set()):
        for field_name in PINNING_SETTINGS.get(name, ()):
            pinned[field_name] = values[field_name]
    if environ.get(THREADS_ENV):
        pinned["inference_threads"] = torch.get_num_threads()
    return pinned


def read_worker_limits(settings: Settings) -> Limits:
    return read_limits(
        configured_max_bytes=settings.max_memory_bytes,
        soft_cap_fraction=settings.watchdog_soft_cap_fraction,
        hard_cap_fraction=settings.watchdog_hard_cap_fraction,
    )


def constraints_for(worker: "Worker", probe: Probe) -> PlanConstraints:
    """The planner's constraints: the budget (effective limit - AMI_MEMORY_RESERVE_BYTES) x
    AMI_MEMORY_SAFETY_FACTOR, the reservation timeout, the device and the operator's pins."""
    settings = worker.settings
    limits = worker.limits if worker.limits is not None else read_worker_limits(settings)
    return PlanConstraints(
        budget_bytes=budget_bytes(limits.effective_limit_bytes, settings.memory_reserve_bytes,
                                  settings.memory_safety_factor),
        reservation_timeout_s=settings.antenna_reservation_timeout_s,
        cuda=worker.cuda, cpu_count=probe.cpu_count,
        pinned=pinned_fields(settings, cuda=worker.cuda, environ=worker.environ),
    )


# The head start's share of the reservation timeout: its tasks' images, at the pipeline's start-up
# time per image x HEAD_START_COST_MARGIN, take the main process at most this long.
HEAD_START_TIMEOUT_SHARE = 0.1
# The start-up figure is one synthetic 1024x768 image on a warm model; a job's images may be larger
# and carry more detections to classify.
HEAD_START_COST_MARGIN = 4.0
HEAD_START_MAX_BYTES = 64 * 2**20
HEAD_START_BUDGET_SHARE = 1 / 8  # of the planner's memory budget


def head_start_size(worker: "Worker", pipeline: Pipeline) -> tuple[int, int]:
    """(tasks, bytes held) of a job's head start: ``AMI_AUTOTUNE_HEAD_START_TASKS``, fewer where the
    pipeline's start-up time per image says the main process could not handle them within
    ``HEAD_START_TIMEOUT_SHARE`` of the reservation timeout, none where that time was not measured
    (a pipeline whose start-up measuring was cut short), at most ``AMI_ANTENNA_API_BATCH_SIZE``
    where the operator set it (ADC's tasks per reserve, which the lanes' reserves keep to); bytes:
    ``HEAD_START_BUDGET_SHARE`` of the memory budget, at most ``HEAD_START_MAX_BYTES``."""
    settings = worker.settings
    wanted = settings.autotune_head_start_tasks
    if "AMI_ANTENNA_API_BATCH_SIZE" in settings.explicitly_set():
        wanted = min(wanted, settings.antenna_api_batch_size)
    per_image_s = one_image_s(pipeline)
    if wanted <= 0 or per_image_s is None:
        return 0, 0
    allowed_s = settings.antenna_reservation_timeout_s * HEAD_START_TIMEOUT_SHARE
    tasks = min(wanted, int(allowed_s / max(per_image_s * HEAD_START_COST_MARGIN, 1e-3)))
    limits = worker.limits if worker.limits is not None else read_worker_limits(settings)
    budget = budget_bytes(limits.effective_limit_bytes, settings.memory_reserve_bytes, settings.memory_safety_factor)
    return max(0, tasks), int(min(HEAD_START_MAX_BYTES, max(0, budget) * HEAD_START_BUDGET_SHARE))


class Planner:
    """Chooses each job's plan. The loop calls, in order, on the loop thread:

    - ``start(worker)`` once per ``Worker.run``, after the middlewares' ``on_start``;
    - per job, after every ``on_job_start``: ``sample(worker, ctx)``, whose batch (if any) the loop
      handles through ``Worker.handle_batch`` (its results posted, ``after_batch`` called), then
      ``plan(worker, ctx)``, whose value the loop writes to ``ctx.plan``, then ``head_start(worker,
      ctx)``, whose tasks (if any) the loop handles once the loader's lanes are started (or
      releases, if planning failed).

    A planner may set ``ctx.tuning`` and ``ctx.nothing_deliverable`` (its reserve answered []: the
    loop then builds no loader for the job this poll); it never writes ``ctx.plan`` itself.
    """

    def start(self, worker: "Worker") -> None:
        """Once per run, before any job."""

    def sample(self, worker: "Worker", ctx: JobContext) -> Optional[Batch]:
        """Tasks reserved to measure the job, as a batch for the loop to process; None by default."""
        return None

    def head_start(self, worker: "Worker", ctx: JobContext) -> Optional[HeadStart]:
        """Tasks reserved while the probe downloads, for the loop to handle once the loader is
        started (``worker/head_start.py``); asked once, after ``plan``. None by default."""
        return None

    def plan(self, worker: "Worker", ctx: JobContext) -> LoaderPlan:
        raise NotImplementedError


class SettingsPlanner(Planner):
    """The operator's settings, as ADC reads them (``AMI_AUTOTUNE=false``)."""

    def plan(self, worker: "Worker", ctx: JobContext) -> LoaderPlan:
        return plan_from_settings(worker.settings, cuda=worker.cuda)


class ForcedPlanner(Planner):
    """One plan for every job (benchmarks only: see ``benchmark_plan``)."""

    def __init__(self, plan: LoaderPlan) -> None:
        self.forced = plan

    def plan(self, worker: "Worker", ctx: JobContext) -> LoaderPlan:
        log.info("job %d: benchmark plan forced by AMI_BENCHMARK_PLAN_JSON: %s", ctx.job.id, self.forced.describe())
        return self.forced


class AutotunePlanner(Planner):
    """Probe the job's first tasks, then plan its loader from the numbers (``AMI_AUTOTUNE``)."""

    def __init__(self, settings: Settings, calibration: Optional[MemoryCalibration] = None) -> None:
        self.calibration = calibration or load_calibration()
        self.corrections = CorrectionStore(default_correction_path(settings.user_data_path))
        self._samples: dict[int, ProbeSample] = {}
        self._last_plans: dict[str, LoaderPlan] = {}  # per pipeline slug: the last plan a probe measured
        self._head_starts: dict[int, HeadStart] = {}

    def start(self, worker: "Worker") -> None:
        """Each offered pipeline's per-batch cost, before any job (off every job's clock), until
        ``START_MEASURING_BUDGET_S`` is spent: the rest are measured at their first probe (once per
        process). Ten heavy models on a CPU would otherwise hold the start for minutes."""
        begun_s = time.perf_counter()
        for slug in worker.pipeline_slugs:
            if time.perf_counter() - begun_s >= START_MEASURING_BUDGET_S:
                log.info("pipeline %s: per-batch cost left for its first probe (%.0f s of start-up spent measuring)",
                         slug, START_MEASURING_BUDGET_S)
                continue
            started_s = time.perf_counter()
            overhead_s = overhead_floor(worker.pipelines(slug))
            if overhead_s is not None:
                log.info("pipeline %s: %.4f s per inference batch besides its images, measured in %.2f s "
                         "(a floor under each probe's fit)", slug, overhead_s, time.perf_counter() - started_s)
            if worker.cuda:  # the same calls measured its device memory: plan its model batches
                plan_device_batches(worker.pipelines(slug), worker.settings.gpu_memory_fraction)

    def sample(self, worker: "Worker", ctx: JobContext) -> Optional[Batch]:
        if worker.stopping:  # a stop came during the listing: reserve nothing more
            return None
        tasks, bytes_ = head_start_size(worker, ctx.pipeline)
        try:
            sample = sample_job(worker.client, ctx.job, ctx.pipeline, worker.settings,
                                tasks_wanted=worker.settings.autotune_probe_tasks, client_info=worker.client_info,
                                cuda=worker.cuda, threads_sleep=openmp_threads_sleep(worker.environ),
                                head_start_tasks=tasks, head_start_bytes=bytes_,
                                stopping=lambda: worker.stopping)
        except AntennaError as error:  # the reserve failed: nothing is held; plan without a probe
            log.warning("job %d: the probe's reserve failed (%s); planning without a probe", ctx.job.id, error)
            return None
        self._samples[ctx.job.id] = sample
        # [] : every task out with other workers, a job not running yet, or none left: a loader's
        # reserves would get the same, so the loop builds none and the next poll probes again.
        ctx.nothing_deliverable = sample.batch is None
        if sample.head_start is not None:
            self._head_starts[ctx.job.id] = sample.head_start
        return sample.batch

    def head_start(self, worker: "Worker", ctx: JobContext) -> Optional[HeadStart]:
        return self._head_starts.pop(ctx.job.id, None)

    def plan(self, worker: "Worker", ctx: JobContext) -> LoaderPlan:
        sample = self._samples.pop(ctx.job.id, None)
        run = None if sample is None else fit_probe(
            sample, ctx.stats, worker.settings, calibration=self.calibration, cuda=worker.cuda,
            forward_batch_size=ctx.pipeline.localization_batch_size)
        if run is not None and run.probe is not None:
            plan = self._choose(worker, ctx, run)
            self._last_plans[ctx.job.pipeline_slug] = plan
            return plan
        return self._unmeasured(worker, ctx, run)

    def _unmeasured(self, worker: "Worker", ctx: JobContext, run: Optional[ProbeRun]) -> LoaderPlan:
        """The plan for a job the probe could not sample (nothing deliverable now, or no image
        loaded): the pipeline's last measured plan, else the minimal plan with the operator's pins.
        Never the settings' plan, whose ADC defaults are what large images must not meet; the next
        poll of the job probes again."""
        last = self._last_plans.get(ctx.job.pipeline_slug)
        plan = last if last is not None else MINIMAL_PLAN.with_changes(
            **pinned_fields(worker.settings, cuda=worker.cuda, environ=worker.environ), source="minimal")
        tasks = run.tasks if run is not None else 0
        # Nothing to reserve is routine (a job whose tasks are all out with other workers is still
        # listed): not worth an INFO line per poll.
        log.log(logging.INFO if tasks else logging.DEBUG,
                "job %d: autotune probe got %d tasks, %d usable images: %s %s", ctx.job.id, tasks,
                run.images_ok if run is not None else 0,
                "the pipeline's last measured plan" if last is not None else "the minimal plan", plan.describe())
        return plan

    def _choose(self, worker: "Worker", ctx: JobContext, run: ProbeRun) -> LoaderPlan:
        probe = run.probe
        assert probe is not None
        correction = self.corrections.get(ctx.job.pipeline_slug)
        constraints = constraints_for(worker, probe)
        planning_started_s = time.perf_counter()
        decision = choose_plan(probe, constraints, self.calibration, correction)
        log.debug("job %d: probe phases %s s; planning %.3f s", ctx.job.id,
                  ", ".join(f"{name} {seconds:.3f}" for name, seconds in run.phases_s.items()),
                  time.perf_counter() - planning_started_s)
        ctx.tuning = JobTuning(probe, decision, constraints, correction, run.wall_s, run.overhead_s)
        log.info("job %d: %s | probe %d images in %.2f s (%.2f s besides their own processing): %.2f MiB jpeg, %dx%d, download %.3f s + %.1f MiB/s, "
                 "decode %.4f s (loading %.4f core-s, of which receiving %.4f and elsewhere on this host %.4f; %.4f core-s per "
                 "API exchange), inference %.4f s/batch + "
                 "%.4f s/image at %d threads, %.2f of them busy (one thread %.4f s), baseline %.0f MiB%s",
                 ctx.job.id, decision.log_line(), probe.sample_count, run.wall_s, run.overhead_s,
                 probe.median_jpeg_bytes / MiB, probe.max_width, probe.max_height,
                 probe.download_latency_s, probe.download_bytes_per_s / MiB,
                 probe.decode_s_per_image, probe.loader_cpu_s_per_image(), probe.download_cpu_s_per_image,
                 probe.external_cpu_s_per_image, probe.api_exchange_cpu_s,
                 probe.inference_overhead_s,
                 probe.inference_per_image_s, probe.inference_threads, probe.inference_busy_threads,
                 probe.single_thread_inference_s, probe.baseline_bytes / MiB, _pinned_text(constraints.pinned))
        return decision.plan


def _pinned_text(pinned: Mapping[str, object]) -> str:
    if not pinned:
        return " | no knob pinned by the operator"
    return " | pinned by the operator: " + ", ".join(f"{k}={v}" for k, v in sorted(pinned.items()))


def benchmark_plan(settings: Settings) -> Optional[LoaderPlan]:
    """The plan in ``AMI_BENCHMARK_PLAN_JSON`` (a JSON object of LoaderPlan fields), if set.

    Not an operator knob: it exists so ``benchmarks/run.py`` can reproduce configurations settings
    cannot express (float32 tensors).
    """
    text = settings.benchmark_plan_json
    if not text:
        return None
    try:
        fields_ = json.loads(text)
        return LoaderPlan(**{**fields_, "source": "benchmark"})
    except (ValueError, TypeError) as error:
        raise SettingsError(f"AMI_BENCHMARK_PLAN_JSON is invalid: {error}; it takes a JSON object of LoaderPlan "
                            "fields (benchmarks only)") from None


def build_planner(settings: Settings) -> Planner:
    """A forced benchmark plan, else autotune (``AMI_AUTOTUNE``, the default), else the settings."""
    forced = benchmark_plan(settings)
    if forced is not None:
        return ForcedPlanner(forced)
    return AutotunePlanner(settings) if settings.autotune else SettingsPlanner()
