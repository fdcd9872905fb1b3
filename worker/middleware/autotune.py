"""Autotune mechanism: probe a job's first few tasks, then plan the job's loader from the numbers.

Policy (the models, the planner, the advisory) lives in ``autotune``; this module only measures
and wires. On entering a job ``TuningMiddleware`` reserves a small sample of tasks
(``AMI_AUTOTUNE_PROBE_TASKS``, default 3; the reserve's CPU prices an API exchange), downloads
and decodes them in the main process (timing time to first byte, whole download and decode), runs
the job's pipeline on them at two batch sizes, reads the tree's baseline memory (the loader's fork
server included), builds a ``Probe`` and lets ``choose_plan`` pick the
``LoaderPlan``. The probed images are inferred and posted like any others (never stranded); an
image that fails to download or decode becomes its error result.

After the job it compares the observed peak of the process tree with the raw predicted peak
(the per-pipeline correction learns from it) and writes a memory advisory under
``AMI_USER_DATA_PATH/advisories/``.

``AMI_BENCHMARK_PLAN_JSON`` (benchmarks only, see ``benchmark_plan_from_env``) forces one full
``LoaderPlan`` for every job, ``tensor_dtype`` included, so the benchmark can reproduce the ADC
worker's float32 ingest. It is not an operator setting.
"""
from __future__ import annotations

import gc
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence
from urllib.parse import urlsplit

import torch

from autotune import (
    CorrectionStore,
    ImageSample,
    InferenceSample,
    LoaderPlan,
    MemoryCalibration,
    PlanConstraints,
    PlanDecision,
    Probe,
    budget_bytes,
    build_advisory,
    choose_plan,
    load_calibration,
    plan_options,
    write_advisory,
)
from autotune.corrections import default_correction_path
from autotune.files import write_json_atomically
from worker import metrics
from worker.hooks import JobContext, Middleware
from worker.imaging import ImageError, decode, download, image_session
from worker.ingest import Batch, LoadedImage, wait_for_fork_server
from worker.pipelines import Pipeline, batch_overhead_s, run_batch, warm_up
from worker.schema import Task
from worker.settings import Settings
from watchdog.sampler import MemorySnapshot, sample_tree

if TYPE_CHECKING:
    from worker.results import ImageResult
    from worker.daemon import Worker

log = logging.getLogger(__name__)

MiB = 1024 * 1024
BENCHMARK_PLAN_ENV = "AMI_BENCHMARK_PLAN_JSON"
# OpenMP's (and so torch's) thread count: set, it pins the plan's inference_threads.
THREADS_ENV = "OMP_NUM_THREADS"

# Operator settings (env names) -> the LoaderPlan fields they pin. AMI_ANTENNA_API_BATCH_SIZE is
# ADC's one number for both the reserve size and the inference batch, so it pins both.
PINNING_SETTINGS: dict[str, tuple[str, ...]] = {
    "AMI_ANTENNA_API_BATCH_SIZE": ("tasks_per_reserve", "batch_size"),
    "AMI_ANTENNA_API_DATALOADER_NUM_WORKERS": ("num_workers",),
    "AMI_NUM_WORKERS": ("num_workers",),
    "AMI_ANTENNA_API_DATALOADER_PREFETCH_FACTOR": ("prefetch_factor",),
    "AMI_ANTENNA_API_DATALOADER_PIN_MEMORY": ("pin_memory",),
    "AMI_ANTENNA_API_DATALOADER_DOWNLOAD_THREADS": ("download_threads",),
}


@dataclass(frozen=True)
class ProbeRun:
    """What one probe measured and what it did with its tasks.

    ``probe`` is None when no sampled image could be used (nothing reserved, or all failed).
    ``results_posted``: results handed to the poster for the probed tasks (one per task).
    ``phases_s``: seconds of ``wall_s`` by step, in order (reserve, load, time_inference,
    baseline, processing, fit; those reached).
    """

    probe: Optional[Probe]
    tasks: int
    images_ok: int
    wall_s: float
    results_posted: int = 0
    phases_s: dict[str, float] = field(default_factory=dict)

    @property
    def processing_s(self) -> float:
        """Of ``wall_s``, the probed tasks' own processing (their batch through the loop's
        ``_handle_batch``: inference and posting, which the job needs anyway)."""
        return self.phases_s.get("processing", 0.0)

    @property
    def overhead_s(self) -> float:
        """What probing cost the job: ``wall_s`` less ``processing_s``."""
        return max(0.0, self.wall_s - self.processing_s)


# --- measuring ---


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def load_sample(tasks: Sequence[Task], settings: Settings) -> tuple[list[LoadedImage], list[ImageSample],
                                                                     Optional[float]]:
    """Download ``tasks`` in parallel (one connection each) and decode them here, timing each step.

    Also returns the CPU seconds the rest of the host spent while the downloads ran (the host's
    busy time less this process's) when an image came from this host (a loopback or local
    address): an image server on the same host costs the loader that much per image too. None
    otherwise, or where ``/proc/stat`` cannot be read: on a shared host the rest of its CPU
    time is other tenants' work, not the images'.

    Parallel downloads keep the probe short on a slow network while each still times one
    connection. Time to first byte is when the response headers arrived (a ``requests`` response
    hook runs then, before the streamed body is read). Failures become error items, never
    exceptions. Order follows ``tasks``.
    """
    host_before_s, own_before_s = host_busy_cpu_s(), time.process_time()
    with ThreadPoolExecutor(max(1, len(tasks)), thread_name_prefix="probe-download") as pool:
        fetched = list(pool.map(lambda task: _timed_download(task, settings), tasks))
    host_s, own_s = host_busy_cpu_s() - host_before_s, time.process_time() - own_before_s
    served_here = any(is_this_host(task.image_url) for task in tasks)
    external_cpu_s = max(0.0, host_s - own_s) if host_before_s >= 0 and served_here else None
    # Decoded side by side, one thread per core (the decoder releases the GIL): three large images
    # took 1.0 s one after another, the longest part of the probe. Each decode is timed by its
    # thread's CPU time, which another decode on a shared core does not inflate.
    with ThreadPoolExecutor(max(1, min(len(tasks), cpu_count())), thread_name_prefix="probe-decode") as pool:
        outcomes = list(pool.map(lambda fetch: _timed_decode(fetch[0], fetch[4], settings), fetched))
    loaded: list[LoadedImage] = []
    samples: list[ImageSample] = []
    for task, (data, download_s, first_byte_s, download_cpu_s, _), (decoded, decode_cpu_s, failure) in zip(
            tasks, fetched, outcomes):
        if decoded is None:
            loaded.append(LoadedImage(task, None, failure.failure()))
            continue
        samples.append(ImageSample(len(data), decoded.width, decoded.height, download_s, decode_cpu_s,
                                   first_byte_s, download_cpu_s))
        loaded.append(LoadedImage(task, decoded.tensor, None, len(data), decoded.width, decoded.height,
                                  download_s, decode_cpu_s))
    del fetched, outcomes
    return loaded, samples, external_cpu_s


def _timed_decode(data, error: Optional[Exception], settings: Settings):
    """(decoded, decode CPU seconds, None) or (None, 0, the ImageError)."""
    try:
        if error is not None:
            raise error
        started_cpu_s = time.thread_time()
        decoded = decode(data, max_pixels=settings.max_image_pixels)
        return decoded, time.thread_time() - started_cpu_s, None
    except ImageError as failure:
        return None, 0.0, failure


def api_exchange_cpu_s(round_trip_s: float, client_cpu_s: float, *, local_server: bool) -> float:
    """Core-seconds of one API exchange on this host, from the probe's reserve call.

    The client's thread CPU always counts. A server on this host spends CPU on the same cores;
    its process is unknown, so its share is bounded twice: by what is left of the round trip
    after the client's CPU (a shaped or slow link's wait is not CPU) and by the client's own
    CPU (the local server answered a reserve in 0.7 ms and a post in 0.5 ms of CPU where the
    client spent 1.8 and 1.7 ms). A remote server's time is not this host's CPU.
    """
    if not local_server:
        return client_cpu_s
    return client_cpu_s + min(client_cpu_s, max(0.0, round_trip_s - client_cpu_s))


def is_this_host(url: str) -> bool:
    """Whether ``url``'s host is this machine: a loopback address, or one this host's name
    resolves to. Name lookups that fail count as elsewhere."""
    host = urlsplit(url).hostname
    if not host:
        return False
    try:
        address = ipaddress.ip_address(socket.gethostbyname(host))
        if address.is_loopback or address.is_unspecified:
            return True
        return str(address) in socket.gethostbyname_ex(socket.gethostname())[2]
    except (OSError, ValueError):
        return False


def host_busy_cpu_s(proc_stat: Path = Path("/proc/stat")) -> float:
    """CPU seconds the whole host has been busy (user, nice, system, irq, softirq: all CPUs
    together) from ``/proc/stat``; -1.0 where that cannot be read (not Linux)."""
    try:
        with open(proc_stat) as handle:
            fields_ = handle.readline().split()
    except OSError:
        return -1.0
    if len(fields_) < 8 or fields_[0] != "cpu":
        return -1.0
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields_[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _timed_download(task: Task, settings: Settings):
    """(data, download_s, first_byte_s, download_cpu_s, error) for one task on its own connection."""
    session = image_session(1)
    headers_at: list[float] = []
    session.hooks["response"].append(lambda response, *args, **kwargs: headers_at.append(time.perf_counter()))
    started_s, started_cpu_s = time.perf_counter(), time.thread_time()
    try:
        data = download(session, task.image_url, max_bytes=settings.max_image_bytes,
                        timeout_s=settings.antenna_api_timeout_s * 2)
    except ImageError as error:
        return None, 0.0, None, None, error
    finally:
        session.close()
    first_byte_s = (headers_at[0] - started_s) if headers_at else None
    return data, time.perf_counter() - started_s, first_byte_s, time.thread_time() - started_cpu_s, None


def time_inference(pipeline: Pipeline, items: Sequence[LoadedImage], slug: str, *,
                   cuda: bool = False) -> list[InferenceSample]:
    """Seconds per batch: each image alone, all of ``items`` as one batch (nothing posted), and
    the batch at one thread (see ``time_one_thread``).

    The pipeline is warmed up first unless it already was (``warm_up``; ``build_worker`` warms
    every offered pipeline): lazy kernel selection would otherwise read as per-batch cost.
    """
    good = [item for item in items if item.image is not None]
    if not good:
        return []
    warm_up(pipeline, good[0].image)
    samples = time_sample(pipeline, good, slug, cuda=cuda)
    if len(good) > 1:
        started_s, started_cpu_s = time.perf_counter(), time.process_time()
        run_batch(pipeline, good, slug)
        samples.append(InferenceSample(len(good), time.perf_counter() - started_s,
                                       cpu_s=time.process_time() - started_cpu_s))
    return samples


def time_sample(pipeline: Pipeline, items: Sequence[LoadedImage], slug: str, *,
                cuda: bool) -> list[InferenceSample]:
    """What the probe times besides the sample batch at the default: images alone, and the
    sample as one batch at one thread (see ``time_each_image`` and ``time_one_thread``).

    Where the one-thread batch is timed too (on CPU, torch running more threads), only the first
    image is timed alone, and the fit takes it as a typical image. There the planner keeps the
    batch within what the probe timed and the per-batch cost decides little, while the probe's
    time is the job's: on the small benchmark job each image alone cost 0.1 s, 5% of the job for
    all three. On CUDA every image is timed alone, so the fit compares equal work: batching is
    the main lever there.
    """
    one_thread = time_one_thread(pipeline, items, slug, cuda=cuda)
    samples = time_each_image(pipeline, items[:1] if one_thread else items, slug)
    return samples + ([one_thread] if one_thread else [])


def time_each_image(pipeline: Pipeline, items: Sequence[LoadedImage], slug: str) -> list[InferenceSample]:
    """Each of ``items`` alone at batch size 1 at the default thread count (nothing posted).

    With the same images timed as one batch, the sum of these against that batch separates the
    per-batch cost from the per-image one on equal work: images differ (a photo with more
    specimens costs more), so one image alone against the batch would not.
    """
    samples = []
    for item in items:
        started_s, started_cpu_s = time.perf_counter(), time.process_time()
        run_batch(pipeline, [item], slug)
        samples.append(InferenceSample(1, time.perf_counter() - started_s, threads=torch.get_num_threads(),
                                       cpu_s=time.process_time() - started_cpu_s))
    return samples


def openmp_threads_sleep() -> bool:
    """True when OpenMP's waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE``, the worker command's
    default): an idle intra-op thread then costs no CPU, and one thread saves nothing over the
    default (the probe measures the busy share the default costs)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def time_one_thread(pipeline: Pipeline, items: Sequence[LoadedImage], slug: str, *,
                    cuda: bool) -> Optional[InferenceSample]:
    """``items`` as one batch with one intra-op thread (nothing posted); None on CUDA, when the
    default is one thread already, or when waiting OpenMP threads sleep (``openmp_threads_sleep``:
    one thread then only saves what the busy share says; in the benchmark two threads beat one
    in all 8 grid pairs on small images and matched it on large ones, 0.996x on average, one
    thread ahead in 5 of 8). Timed on the same batch the default is timed on, since
    what a second thread gains grows with the batch. The default thread count is restored."""
    threads = torch.get_num_threads()
    if cuda or threads <= 1 or not items or openmp_threads_sleep():
        return None
    torch.set_num_threads(1)
    try:
        started_s = time.perf_counter()
        run_batch(pipeline, list(items), slug)
        return InferenceSample(len(items), time.perf_counter() - started_s, threads=1)
    finally:
        torch.set_num_threads(threads)


def overhead_floor(pipeline: Pipeline) -> float:
    """``batch_overhead_s`` (measured once, at start), or 0 where the pipeline fails on the
    synthetic image: the probe then times every sampled image alone instead."""
    try:
        return batch_overhead_s(pipeline)
    except Exception as error:
        log.warning("per-batch cost not measured: %s: %.200s", type(error).__name__, error)
        return 0.0


def baseline_bytes(items: Sequence[LoadedImage] = ()) -> int:
    """This process tree's PSS now (model loaded, no loader) less the sample images it still holds.

    The decoded sample tensors are private, fully resident allocations (large ones are mmapped,
    see ``imaging.fix_mmap_threshold``), so subtracting their size leaves the baseline.
    """
    wait_for_fork_server()  # the loader's fork server belongs to the baseline: wait for its imports
    gc.collect()
    held = sum(item.image.numel() * item.image.element_size() for item in items if item.image is not None)
    return max(0, sample_tree(os.getpid()).tree_pss_bytes - held)


def probe_job(worker: "Worker", ctx: JobContext, pipeline: Pipeline, *, tasks_wanted: int,
              calibration: MemoryCalibration) -> ProbeRun:
    """Reserve ``tasks_wanted`` tasks of ``ctx.job``, measure them, post their results.

    Inference is timed on the sample as one batch at the default thread count: the loop's own
    ``_handle_batch``, which posts every probed task's result (errors included), so that timing
    costs the job nothing. With it, the pipeline's per-batch cost, measured at the worker's start
    on two batch sizes (``worker.pipelines.batch_overhead_s``), separates the per-image cost. On
    CUDA, or where that start-up figure is missing, the probe also times each sampled image alone
    (``time_sample``, results discarded). On CPU, with torch running more threads and OpenMP's
    waiting threads spinning (not the worker command's default), it also times the sample at one
    thread (``time_one_thread``). The worker warms each pipeline up at start
    (``worker.pipelines.warm_up``: the first call pays lazy initialisation); a pipeline not warmed
    yet is warmed here on the first sampled image.
    """
    settings = worker.settings
    phases: dict[str, float] = {}
    started_s, cpu_started_s = time.perf_counter(), time.thread_time()
    mark_s = started_s

    def phase(name: str) -> None:
        nonlocal mark_s
        now_s = time.perf_counter()
        phases[name] = now_s - mark_s
        mark_s = now_s

    tasks = worker.client.reserve_tasks(ctx.job.id, tasks_wanted, worker.client_info)
    round_trip_s = time.perf_counter() - started_s
    exchange_cpu_s = api_exchange_cpu_s(round_trip_s, time.thread_time() - cpu_started_s,
                                        local_server=is_this_host(settings.antenna_api_base_url))
    phase("reserve")
    if not tasks:
        return ProbeRun(None, 0, 0, time.perf_counter() - started_s, phases_s=phases)
    items, images, external_cpu_s = load_sample(tasks, settings)
    phase("load")
    good = [item for item in items if item.image is not None]
    inference: list[InferenceSample] = []
    overhead_floor_s = overhead_floor(pipeline)
    if good:
        warm_up(pipeline, good[0].image)  # a no-op after the worker's start-up warm-up
        if worker.cuda or overhead_floor_s <= 0:
            inference.extend(time_sample(pipeline, good, ctx.job.pipeline_slug, cuda=worker.cuda))
        elif (one_thread := time_one_thread(pipeline, good, ctx.job.pipeline_slug, cuda=False)) is not None:
            inference.append(one_thread)
    phase("time_inference")
    baseline = baseline_bytes(items)
    phase("baseline")
    # Posted through the loop's own batch path: stats, metrics and hooks see them as usual.
    worker._handle_batch(ctx, pipeline, Batch(items))
    phase("processing")
    if good:
        inference.append(InferenceSample(len(good), ctx.stats.last_inference_s, cpu_s=ctx.stats.last_inference_cpu_s))
    del items, good
    if not images:
        return ProbeRun(None, len(tasks), 0, time.perf_counter() - started_s, len(tasks), phases)
    probe = Probe.from_samples(
        images, inference, baseline_bytes=baseline, cpu_count=cpu_count(), cuda=worker.cuda,
        reservation_timeout_s=settings.antenna_reservation_timeout_s, api_round_trip_s=round_trip_s,
        calibration=calibration, forward_batch_size=pipeline.localization_batch_size,
        inference_threads=torch.get_num_threads(), external_cpu_s=external_cpu_s,
        api_exchange_cpu_s=exchange_cpu_s, inference_overhead_floor_s=overhead_floor_s,
    )
    phase("fit")
    return ProbeRun(probe, len(tasks), len(images), time.perf_counter() - started_s, len(tasks), phases)


# --- planning ---


def pinned_fields(settings: Settings, *, cuda: bool) -> dict[str, object]:
    """LoaderPlan fields the operator set explicitly, with the values their settings give."""
    values: dict[str, object] = {
        "tasks_per_reserve": settings.antenna_api_batch_size,
        "batch_size": settings.antenna_api_batch_size,
        "num_workers": settings.dataloader_num_workers,
        "prefetch_factor": settings.antenna_api_dataloader_prefetch_factor,
        # Pinned host memory needs an accelerator: a pinned "true" on CPU means "off".
        "pin_memory": settings.antenna_api_dataloader_pin_memory and cuda,
        "download_threads": settings.antenna_api_dataloader_download_threads,
    }
    pinned: dict[str, object] = {}
    for name in sorted(settings.explicitly_set()):
        for field_name in PINNING_SETTINGS.get(name, ()):
            pinned[field_name] = values[field_name]
    if os.environ.get(THREADS_ENV):
        # torch read it at import: the operator chose the inference threads.
        pinned["inference_threads"] = torch.get_num_threads()
    return pinned


def planning_budget_bytes(worker: "Worker") -> int:
    """(effective limit - AMI_MEMORY_RESERVE_BYTES) x AMI_MEMORY_SAFETY_FACTOR."""
    settings = worker.settings
    limits = worker.limits
    if limits is None:
        from worker.app import read_worker_limits

        limits = worker.limits = read_worker_limits(settings)
    return budget_bytes(limits.effective_limit_bytes, settings.memory_reserve_bytes, settings.memory_safety_factor)


def constraints_for(worker: "Worker", probe: Probe) -> PlanConstraints:
    return PlanConstraints(
        budget_bytes=planning_budget_bytes(worker),
        reservation_timeout_s=worker.settings.antenna_reservation_timeout_s,
        cuda=worker.cuda, cpu_count=probe.cpu_count,
        pinned=pinned_fields(worker.settings, cuda=worker.cuda),
    )


def record_plan_metrics(plan: LoaderPlan, decision: Optional[PlanDecision] = None) -> None:
    for knob in ("tasks_per_reserve", "batch_size", "num_workers", "prefetch_factor", "download_threads"):
        metrics.plan_value.labels(knob).set(getattr(plan, knob))
    metrics.plan_value.labels("inference_threads").set(plan.inference_threads or torch.get_num_threads())
    metrics.plan_value.labels("pin_memory").set(1 if plan.pin_memory else 0)
    metrics.plan_changes.labels(plan.source).inc()
    if decision is not None:
        metrics.plan_predicted_peak_bytes.set(decision.memory.total_bytes)
        metrics.plan_predicted_images_per_second.set(decision.rate.pipeline_images_per_s)


# --- the middleware ---


@dataclass
class _JobTuning:
    """Per-job state kept between on_job_start and on_job_end."""

    probe: Probe
    decision: PlanDecision
    constraints: PlanConstraints
    correction: float
    probe_wall_s: float
    probe_overhead_s: float


class TuningMiddleware(Middleware):
    """Probe, plan, and after the job learn the correction and write the advisory."""

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
        for slug in worker.pipeline_slugs:  # before any job: off every job's clock
            started_s = time.perf_counter()
            overhead_s = overhead_floor(worker.pipelines(slug))
            log.info("pipeline %s: %.4f s per inference batch besides its images, measured in %.2f s "
                     "(a floor under each probe's fit)", slug, overhead_s, time.perf_counter() - started_s)

    def _on_sample(self, snapshot: MemorySnapshot) -> None:
        with self._lock:
            self._latest = snapshot
            self._peak_bytes = max(self._peak_bytes, observed_bytes(snapshot))

    def on_job_start(self, worker: "Worker", ctx: JobContext) -> None:
        with self._lock:
            self._peak_bytes, self._end_of_batch_bytes = 0, []
        pipeline: Pipeline = ctx.notes["pipeline"]
        run = probe_job(worker, ctx, pipeline, tasks_wanted=worker.settings.autotune_probe_tasks,
                        calibration=self.calibration)
        if run.probe is None:
            # Nothing to reserve is routine (a job whose tasks are all out with other workers is
            # still listed): not worth an INFO line per poll.
            log.log(logging.INFO if run.tasks else logging.DEBUG,
                    "job %d: autotune probe got %d tasks, %d usable images in %.2f s: keeping the settings plan",
                    ctx.job.id, run.tasks, run.images_ok, run.wall_s)
            return
        correction = self.corrections.get(ctx.job.pipeline_slug)
        constraints = constraints_for(worker, run.probe)
        planning_started_s = time.perf_counter()
        decision = choose_plan(run.probe, constraints, self.calibration, correction)
        log.debug("job %d: probe phases %s s; planning %.3f s", ctx.job.id,
                  ", ".join(f"{name} {seconds:.3f}" for name, seconds in run.phases_s.items()),
                  time.perf_counter() - planning_started_s)
        ctx.plan = decision.plan
        ctx.notes["autotune"] = _JobTuning(run.probe, decision, constraints, correction, run.wall_s, run.overhead_s)
        log.info("job %d: %s | probe %d images in %.2f s (%.2f s besides their own processing): %.2f MiB jpeg, %dx%d, download %.3f s + %.1f MiB/s, "
                 "decode %.4f s (loading %.4f core-s with receiving and host; %.4f core-s per API exchange), inference %.4f s/batch + "
                 "%.4f s/image at %d threads, %.2f of them busy (one thread %.4f s), baseline %.0f MiB%s",
                 ctx.job.id, decision.log_line(), run.probe.sample_count, run.wall_s, run.overhead_s,
                 run.probe.median_jpeg_bytes / MiB, run.probe.max_width, run.probe.max_height,
                 run.probe.download_latency_s, run.probe.download_bytes_per_s / MiB,
                 run.probe.decode_s_per_image, run.probe.loader_cpu_s_per_image(), run.probe.api_exchange_cpu_s,
                 run.probe.inference_overhead_s,
                 run.probe.inference_per_image_s, run.probe.inference_threads, run.probe.inference_busy_threads,
                 run.probe.single_thread_inference_s, run.probe.baseline_bytes / MiB, _pinned_text(constraints.pinned))
        record_plan_metrics(decision.plan, decision)

    def after_batch(self, worker: "Worker", ctx: JobContext, batch: Batch, results: "list[ImageResult]") -> None:
        with self._lock:
            latest = self._latest
        if latest is not None:
            self._end_of_batch_bytes.append(observed_bytes(latest))

    def on_job_end(self, worker: "Worker", ctx: JobContext) -> None:
        tuning: Optional[_JobTuning] = ctx.notes.get("autotune")
        if tuning is None:
            return
        with self._lock:
            observed = self._peak_bytes
            end_of_batch = list(self._end_of_batch_bytes)
        if observed <= 0:  # no sampler running: one exact reading is better than none
            observed = observed_bytes(sample_tree(os.getpid()))
        slug = ctx.job.pipeline_slug
        self.corrections.update(slug, tuning.decision.memory.raw_total_bytes, observed)
        self._write_advisory(worker, ctx, tuning, observed, end_of_batch)

    def _write_advisory(self, worker: "Worker", ctx: JobContext, tuning: _JobTuning,
                        observed_peak_bytes: int, end_of_batch: list[int]) -> None:
        settings = worker.settings
        alternatives = plan_options(tuning.probe, tuning.constraints, self.calibration, tuning.correction)
        advisory = build_advisory(
            ctx.job.pipeline_slug, ctx.job.id,
            limit_bytes=worker.limits.effective_limit_bytes if worker.limits else 0,
            reserve_bytes=settings.memory_reserve_bytes, safety_factor=settings.memory_safety_factor,
            memory_samples_bytes=end_of_batch, peak_bytes=observed_peak_bytes,
            predicted_bytes=tuning.decision.memory.total_bytes, plan=tuning.decision.plan,
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
    but not yet read). Without an owned cgroup the sampler's ``used_bytes`` is exactly this
    measure. With one, ``used_bytes`` is the cgroup's usage, page cache included, so the tree's
    PSS plus the segments stands in (over-counting only shm pages also mapped and touched).
    """
    if snapshot.cgroup_usage_bytes is None:
        return snapshot.used_bytes
    return snapshot.tree_pss_bytes + snapshot.shm_bytes


def _pinned_text(pinned: Mapping[str, object]) -> str:
    if not pinned:
        return " | no knob pinned by the operator"
    return " | pinned by the operator: " + ", ".join(f"{k}={v}" for k, v in sorted(pinned.items()))


# --- benchmarks only ---


class BenchmarkPlanMiddleware(Middleware):
    """Forces one LoaderPlan on every job (benchmarks only: see ``benchmark_plan_from_env``)."""

    def __init__(self, plan: LoaderPlan) -> None:
        self.plan = plan

    def on_job_start(self, worker: "Worker", ctx: JobContext) -> None:
        ctx.plan = self.plan
        log.info("job %d: benchmark plan forced by %s: %s", ctx.job.id, BENCHMARK_PLAN_ENV, self.plan.describe())
        record_plan_metrics(self.plan)


def benchmark_plan_from_env(environ: Mapping[str, str] = os.environ) -> Optional[LoaderPlan]:
    """The plan in ``AMI_BENCHMARK_PLAN_JSON`` (a JSON object of LoaderPlan fields), if set.

    Read once when the middleware stack is built. Not an operator knob: it exists so
    ``benchmarks/run.py`` can reproduce configurations settings cannot express (float32 tensors).
    """
    text = environ.get(BENCHMARK_PLAN_ENV)
    if not text:
        return None
    try:
        fields_ = json.loads(text)
        return LoaderPlan(**{**fields_, "source": "benchmark"})
    except (ValueError, TypeError) as error:
        from worker.settings import SettingsError

        raise SettingsError(f"{BENCHMARK_PLAN_ENV} is invalid: {error}; it takes a JSON object of LoaderPlan "
                            "fields (benchmarks only)") from None


def tuning_middlewares(settings: Settings) -> list[Middleware]:
    """The autotune entries of the middleware stack: a forced benchmark plan, or the tuner, or none."""
    forced = benchmark_plan_from_env()
    if forced is not None:
        return [BenchmarkPlanMiddleware(forced)]
    return [TuningMiddleware(settings)] if settings.autotune else []
