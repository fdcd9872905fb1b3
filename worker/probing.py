"""Measuring a job for autotune: a probe reserves a few tasks, loads and times them, and, once the
loop has processed them as its first batch, fits a ``Probe`` from the numbers.

The probe is two steps around the loop's own batch path (``Worker.handle_batch``):

1. ``sample_job`` reserves ``AMI_AUTOTUNE_PROBE_TASKS`` tasks (default 3; the reserve's CPU prices an
   API exchange), downloads and decodes them here (timing time to first byte, whole download and
   decode), times what the fit needs besides the batch itself, reads the tree's baseline memory (the
   loader's fork server included) and returns the tasks as a ``Batch``. Every reserved task is in
   that batch, an error item where it failed: the probe never strands a task.
2. The loop handles the batch like any other (inference and posting, timed in ``JobStats``).
3. ``fit_probe`` builds the ``Probe`` from the sample and the batch's timing.

Policy (the models, the planner) lives in ``autotune``; this module only measures.
"""
from __future__ import annotations

import gc
import ipaddress
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence
from urllib.parse import urlsplit

import torch

from autotune import ImageSample, InferenceSample, MemoryCalibration, Probe
from autotune.inference_memory import (
    InferenceMemory,
    MemoryReading,
    ModelBatchPlan,
    fit_inference_memory,
    plan_model_batch,
    usable_device_bytes,
)
from watchdog.sampler import sample_tree
from worker.hooks import JobStats
from worker.head_start import HeadStart
from worker.imaging import DecodedImage, ImageError, jpeg_size
from worker.ingest import Batch, wait_for_fork_server
from worker.loading import Fetched, ImageLoader, LoadedImage, failed, loaded
from worker.pipelines import Pipeline, batch_overhead_s, inference_peaks, run_batch, warm_up
from worker.pipelines.base import MEASURE_IMAGE_SIZE
from worker.results import Failure
from worker.schema import Task
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.antenna import AntennaClient, JobRef

log = logging.getLogger(__name__)


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
        ``handle_batch``: inference and posting, which the job needs anyway)."""
        return self.phases_s.get("processing", 0.0)

    @property
    def overhead_s(self) -> float:
        """What probing cost the job: ``wall_s`` less ``processing_s``."""
        return max(0.0, self.wall_s - self.processing_s)





def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def load_sample(tasks: Sequence[Task], settings: Settings, head_start: Optional[HeadStart] = None
                ) -> tuple[list[LoadedImage], list[ImageSample], Optional[float]]:
    """Download ``tasks`` in parallel (one connection each) and decode them here, timing each step.

    Also returns the CPU seconds the rest of the host spent while the downloads ran (the host's
    busy time less this process's) when an image came from this host (a loopback or local
    address): an image server on the same host costs the loader that much per image too. None
    otherwise, or where ``/proc/stat`` cannot be read: on a shared host the rest of its CPU
    time is other tenants' work, not the images'.

    Each image goes through the loader lane's own steps and limits (``worker.loading.ImageLoader``).
    Parallel downloads keep the probe short on a slow network while each still times one
    connection. Failures become error items, never exceptions. Order follows ``tasks``.

    ``head_start`` begins (reserves, then downloads beside the sample) as the sample's first
    response declares its length; the rest of the host's CPU is then shared out by bytes
    received, the sample's share being its own bytes over all received by its end.
    """
    images = ImageLoader.from_settings(settings)
    # The loader's fork server imports torch at the worker's start (seconds of CPU): measured beside
    # it, the host's CPU per image and the decodes' came out up to 2.5x their cost (a null-pipeline
    # job priced at 27 images/s on one draw, 61 on the next). The loader needs the server ready
    # before its first batch anyway; waiting here costs the first job at most the probe's length.
    wait_for_fork_server()
    host_before_s, own_before_s = host_busy_cpu_s(), time.process_time()
    admit = head_start.begin if head_start is not None else None
    with ThreadPoolExecutor(max(1, len(tasks)), thread_name_prefix="probe-download") as pool:
        fetched = list(pool.map(lambda task: images.fetch_alone(task.image_url, admit=admit), tasks))
    host_s, own_s = host_busy_cpu_s() - host_before_s, time.process_time() - own_before_s
    served_here = any(is_this_host(task.image_url) for task in tasks)
    external_cpu_s = max(0.0, host_s - own_s) if host_before_s >= 0 and served_here else None
    if external_cpu_s is not None and head_start is not None:
        own_bytes = sum(len(item.data) for item in fetched if isinstance(item, Fetched))
        external_cpu_s *= own_bytes / max(1, own_bytes + head_start.received_bytes)
    # Decoded side by side, one thread per core (the decoder releases the GIL): three large images
    # took 1.0 s one after another, the longest part of the probe. Each decode is timed by its
    # thread's CPU time, which another decode on a shared core does not inflate.
    with ThreadPoolExecutor(max(1, min(len(tasks), cpu_count())), thread_name_prefix="probe-decode") as pool:
        decoded = list(pool.map(lambda fetch: _decode(images, fetch), fetched))
        decoded = _retime_outliers(images, fetched, decoded, pool)
    loaded_items: list[LoadedImage] = []
    for task, fetch, outcome in zip(tasks, fetched, decoded):
        if isinstance(fetch, Fetched) and isinstance(outcome, DecodedImage):
            loaded_items.append(loaded(task, fetch, outcome))
        else:  # a failed fetch is its decode's outcome too
            loaded_items.append(failed(task, outcome))
    del fetched, decoded
    return loaded_items, image_samples(loaded_items), external_cpu_s


def image_samples(items: Sequence[LoadedImage]) -> list[ImageSample]:
    """What the fit needs of each loaded image: sizes, wall seconds of the download, and CPU
    seconds of the decode (another decode on a shared core does not inflate them)."""
    return [ImageSample(item.jpeg_bytes, item.width, item.height, item.download_s, item.decode_cpu_s,
                        item.first_byte_s, item.download_cpu_s) for item in items if item.image is not None]


# A decode whose CPU per pixel is over this multiple of the sample's fastest is timed again.
DECODE_RETIME_RATIO = 1.3


def _retime_outliers(images: ImageLoader, fetched: Sequence[Fetched | ImageError],
                     decoded: list[DecodedImage | ImageError], pool: ThreadPoolExecutor) -> list[DecodedImage | ImageError]:
    """Decode again each image whose CPU per pixel is over ``DECODE_RETIME_RATIO`` x the fastest,
    keeping the lower CPU time. A shared host's noise only ever adds CPU time: here the same
    2048x1536 images took 22-26 ms each, and now and then 53-65 ms; the probe's median of three
    then priced every image of the job at twice its cost (the plan's predicted rate moved from 53 to
    30 images/s between runs of one job)."""
    per_pixel = {i: d.decode_cpu_s / max(1, d.width * d.height) for i, d in enumerate(decoded)
                 if isinstance(d, DecodedImage)}
    if len(per_pixel) < 2 or min(per_pixel.values()) <= 0:
        return decoded
    fastest = min(per_pixel.values())
    slow = [i for i, cpu_s in per_pixel.items() if cpu_s > DECODE_RETIME_RATIO * fastest]
    again = list(pool.map(lambda i: _decode(images, fetched[i]), slow))
    out = list(decoded)
    for index, second in zip(slow, again):
        first = out[index]
        if isinstance(second, DecodedImage) and isinstance(first, DecodedImage) and second.decode_cpu_s < first.decode_cpu_s:
            out[index] = replace(first, decode_s=second.decode_s, decode_cpu_s=second.decode_cpu_s)
    return out


def _decode(images: ImageLoader, fetched: Fetched | ImageError) -> DecodedImage | ImageError:
    """Decode as a loader lane does in its steady state: into a buffer whose pages are already
    there (a lane reuses its buffers), so the timed CPU is the decode's. Into fresh memory the
    page faults added 5-25 ms to a 2048x1536 image's 26 ms, and the plan priced every image so."""
    if isinstance(fetched, ImageError):
        return fetched
    size = jpeg_size(fetched.data)
    allocate = None
    if size is not None and size[0] * size[1] <= images.max_pixels:
        # decode() allocates only for this JPEG (its header read here) within the pixel cap
        buffer = torch.zeros((*size, 3), dtype=torch.uint8)  # zeroed: every page faulted in now

        def allocate(height: int, width: int) -> torch.Tensor:
            return buffer

    try:
        return images.decode(fetched, allocate=allocate)
    except ImageError as error:
        return error


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


def time_inference(pipeline: Pipeline, items: Sequence[LoadedImage], slug: str, *,
                   cuda: bool = False, threads_sleep: bool = True) -> list[InferenceSample]:
    """Seconds per batch: each image alone, all of ``items`` as one batch (nothing posted), and
    the batch at one thread (see ``time_one_thread``).

    The pipeline is warmed up first unless it already was (``warm_up``; ``build_worker`` warms
    every offered pipeline): lazy kernel selection would otherwise read as per-batch cost.
    """
    good = [item for item in items if item.image is not None]
    if not good:
        return []
    warm_up(pipeline, good[0].image)
    samples = time_sample(pipeline, good, slug, cuda=cuda, threads_sleep=threads_sleep)
    if len(good) > 1:
        started_s, started_cpu_s = time.perf_counter(), time.process_time()
        run_batch(pipeline, good, slug)
        samples.append(InferenceSample(len(good), time.perf_counter() - started_s,
                                       cpu_s=time.process_time() - started_cpu_s))
    return samples


def time_sample(pipeline: Pipeline, items: Sequence[LoadedImage], slug: str, *,
                cuda: bool, threads_sleep: bool) -> list[InferenceSample]:
    """What the probe times besides the sample batch at the default: images alone, and the
    sample as one batch at one thread (see ``time_each_image`` and ``time_one_thread``).

    Where the one-thread batch is timed too (on CPU, torch running more threads), only the first
    image is timed alone, and the fit takes it as a typical image. There the planner keeps the
    batch within what the probe timed and the per-batch cost decides little, while the probe's
    time is the job's: on the small benchmark job each image alone cost 0.1 s, 5% of the job for
    all three. On CUDA every image is timed alone, so the fit compares equal work: batching is
    the main lever there.
    """
    one_thread = time_one_thread(pipeline, items, slug, cuda=cuda, threads_sleep=threads_sleep)
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


def openmp_threads_sleep(environ: Mapping[str, str]) -> bool:
    """True when OpenMP's waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE`` in the process
    environment, the worker command's default): an idle intra-op thread then costs no CPU, and one
    thread saves nothing over the default (the probe measures the busy share the default costs)."""
    return environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def time_one_thread(pipeline: Pipeline, items: Sequence[LoadedImage], slug: str, *,
                    cuda: bool, threads_sleep: bool) -> Optional[InferenceSample]:
    """``items`` as one batch with one intra-op thread (nothing posted); None on CUDA, when the
    default is one thread already, or when waiting OpenMP threads sleep (``openmp_threads_sleep``:
    one thread then only saves what the busy share says; in the benchmark two threads beat one
    in all 8 grid pairs on small images and matched it on large ones, 0.996x on average, one
    thread ahead in 5 of 8). Timed on the same batch the default is timed on, since
    what a second thread gains grows with the batch. The default thread count is restored."""
    threads = torch.get_num_threads()
    if cuda or threads <= 1 or not items or threads_sleep:
        return None
    torch.set_num_threads(1)
    try:
        started_s = time.perf_counter()
        run_batch(pipeline, list(items), slug)
        return InferenceSample(len(items), time.perf_counter() - started_s, threads=1)
    finally:
        torch.set_num_threads(threads)


def overhead_floor(pipeline: Pipeline) -> Optional[float]:
    """``batch_overhead_s`` (measured once, at start), or None where the pipeline fails on the
    synthetic image: the probe then times every sampled image alone instead. A measured 0 (a
    detector whose batch of four costs four single images) is a measurement: timing each sampled
    image alone again would cost the job seconds per image and tell nothing new."""
    try:
        return batch_overhead_s(pipeline)
    except Exception as error:
        log.warning("per-batch cost not measured: %s: %.200s", type(error).__name__, error)
        return None


def baseline_bytes(items: Sequence[LoadedImage] = (), other_held_bytes: int = 0) -> int:
    """This process tree's PSS now (model loaded, no loader) less the sample images it still holds
    and ``other_held_bytes`` (the head start's compressed images).

    The decoded sample tensors are private, fully resident allocations (large ones are mmapped,
    see ``imaging.fix_mmap_threshold``), so subtracting their size leaves the baseline.
    """
    wait_for_fork_server()  # the loader's fork server belongs to the baseline: wait for its imports
    gc.collect()
    held = sum(item.image.numel() * item.image.element_size() for item in items if item.image is not None)
    return max(0, sample_tree(os.getpid()).tree_pss_bytes - held - other_held_bytes)


def inference_memory(pipeline: Pipeline) -> Optional[InferenceMemory]:
    """The pipeline's memory per forward call, fitted from the calls ``batch_overhead_s`` measured
    at start (``inference_peaks``: host RSS on CPU, device bytes on CUDA) on its synthetic image,
    priced per pixel at the model's input (``Pipeline.model_input``); None where not measured."""
    width, height = MEASURE_IMAGE_SIZE
    geometry = pipeline.model_input(width, height)
    readings = [MemoryReading(items, bytes_) for items, bytes_ in inference_peaks(pipeline)]
    return fit_inference_memory(readings, input_pixels_per_item=geometry.pixels,
                                float_copy_bytes_per_item=geometry.float_copy_bytes(width, height))


CROP_COUNTS = (1, 4)  # crops per classifier pass measured on CUDA (two points: fixed + per crop)


@dataclass(frozen=True)
class DeviceBatches:
    """The model batch sizes planned for one pipeline on a CUDA device."""

    localization: ModelBatchPlan
    classification: Optional[ModelBatchPlan]


def plan_device_batches(pipeline: Pipeline, fraction: float) -> Optional[DeviceBatches]:
    """On CUDA: measure the pipeline's device memory per image and per crop, then set its
    ``localization_batch_size`` and ``classification_batch_size`` to the largest (at most the
    settings') whose predicted peak fits this worker's share of the device
    (``usable_device_bytes``: ``fraction`` x the card less what this process holds, at most what
    is free). None on CPU or when nothing could be measured. Detector images are priced at the
    synthetic measuring image's size; a larger image that does not fit is split by the
    out-of-memory retry.
    """
    device = pipeline.device
    if device.type != "cuda":
        return None
    detector = inference_memory(pipeline)
    crops = fit_inference_memory([MemoryReading(n, b) for n, b in pipeline.crop_peaks(CROP_COUNTS)],
                                 input_pixels_per_item=1)
    if detector is None:
        return None
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    reusable = torch.cuda.memory_reserved(device) - allocated  # our allocator's cache is ours to reuse
    usable = usable_device_bytes(free_bytes + max(0, reusable), total_bytes, fraction, allocated)
    planned = DeviceBatches(
        plan_model_batch(detector, usable, pipeline.localization_batch_size),
        None if crops is None else plan_model_batch(crops, usable, pipeline.classification_batch_size))
    pipeline.localization_batch_size = planned.localization.items
    if planned.classification is not None:
        pipeline.classification_batch_size = planned.classification.items
    log.info("pipeline %s on %s: detector batch %d (%s); classifier batch %s", pipeline.slug, device,
             planned.localization.items, planned.localization.reason,
             "unmeasured" if planned.classification is None else
             f"{planned.classification.items} ({planned.classification.reason})")
    return planned


@dataclass(frozen=True)
class ImageGeometry:
    """The largest sampled image as the model sees it (``Pipeline.model_input``)."""

    model_input_pixels: int = 0
    float_copy_bytes: int = 0

    @classmethod
    def largest(cls, pipeline: Pipeline, images: Sequence[ImageSample]) -> "ImageGeometry":
        inputs = [(pipeline.model_input(image.width, image.height), image) for image in images]
        if not inputs:
            return cls()
        return cls(max(model.pixels for model, _ in inputs),
                   max(model.float_copy_bytes(image.width, image.height) for model, image in inputs))


@dataclass
class ProbeSample:
    """What ``sample_job`` measured before the loop handles ``batch`` (None: nothing reserved)."""

    batch: Optional[Batch]
    images: list[ImageSample]
    inference: list[InferenceSample]
    baseline_bytes: int
    round_trip_s: float
    exchange_cpu_s: float
    external_cpu_s: Optional[float]
    overhead_floor_s: Optional[float]  # None: not measured
    started_s: float
    phases_s: dict[str, float] = field(default_factory=dict)
    inference_memory: Optional[InferenceMemory] = None
    geometry: ImageGeometry = ImageGeometry()
    head_start: Optional[HeadStart] = None

    @property
    def tasks(self) -> int:
        return len(self.batch.items) if self.batch is not None else 0

    @property
    def images_ok(self) -> int:
        return len(self.images)

    def phase(self, name: str) -> None:
        """Close the phase ``name`` at now (the phases add up to the probe's wall)."""
        now_s = time.perf_counter()
        self.phases_s[name] = now_s - self.started_s - sum(self.phases_s.values())


def sample_job(client: "AntennaClient", job: "JobRef", pipeline: Pipeline, settings: Settings, *,
               tasks_wanted: int, client_info: dict, cuda: bool, threads_sleep: bool,
               head_start_tasks: int = 0, head_start_bytes: int = 0,
               stopping: Callable[[], bool] = lambda: False) -> ProbeSample:
    """Reserve ``tasks_wanted`` tasks of ``job`` and measure them; the loop then handles the batch.

    Once the sample's first image declares its size, up to ``head_start_tasks`` more are reserved
    (as many as ``head_start_bytes`` hold): their images download beside the sample's, are not
    measured, and the loop handles them once the loader is started (``sample.head_start``); none
    once ``stopping()`` is true (the worker is draining: it reserves nothing new).

    Inference is timed on the sample as one batch at the default thread count: the loop's own
    batch path, which posts every probed task's result (errors included), so that timing costs the
    job nothing. With it, the pipeline's per-batch cost, measured at the worker's start on two
    batch sizes (``worker.pipelines.batch_overhead_s``), separates the per-image cost. On CUDA, or
    where that start-up figure is missing, the probe also times each sampled image alone
    (``time_sample``, results discarded). On CPU, with torch running more threads and OpenMP's
    waiting threads spinning (not the worker command's default), it also times the sample at one
    thread (``time_one_thread``). A pipeline not warmed up yet is warmed here on the first sampled
    image. A measurement that fails (a warm-up error, say) is logged and left out: the tasks still
    go to the loop, whose batch path turns each failure into that image's error result.
    """
    started_s, cpu_started_s = time.perf_counter(), time.thread_time()
    tasks = client.reserve_tasks(job.id, tasks_wanted, client_info)
    round_trip_s = time.perf_counter() - started_s
    sample = ProbeSample(None, [], [], 0, round_trip_s, api_exchange_cpu_s(
        round_trip_s, time.thread_time() - cpu_started_s,
        local_server=is_this_host(settings.antenna_api_base_url)), None, 0.0, started_s)
    sample.phase("reserve")
    if not tasks:
        return sample
    if head_start_tasks > 0 and len(tasks) == tasks_wanted:  # fewer: the job has no more for now
        sample.head_start = HeadStart(ImageLoader.from_settings(settings), head_start_bytes, wanted=head_start_tasks,
                                      reserve=lambda count: [] if stopping() else client.reserve_tasks(
                                          job.id, count, client_info))
    items: list[LoadedImage] = [LoadedImage(task, None, Failure("other", "probe: not loaded")) for task in tasks]
    try:
        items, sample.images, sample.external_cpu_s = load_sample(tasks, settings, sample.head_start)
        if sample.head_start is not None:
            sample.head_start.wait_reserved()  # its tasks are held from here on, whatever fails below
        sample.phase("load")
        good = [item for item in items if item.image is not None]
        if good:
            sample.overhead_floor_s = overhead_floor(pipeline)
            sample.inference = _time_for_fit(pipeline, good, job.pipeline_slug, cuda=cuda,
                                             overhead_floor_s=sample.overhead_floor_s, threads_sleep=threads_sleep)
            sample.inference_memory = None if cuda else inference_memory(pipeline)
            sample.geometry = ImageGeometry.largest(pipeline, sample.images)
        sample.phase("time_inference")
        sample.baseline_bytes = baseline_bytes(items, sample.head_start.held_bytes if sample.head_start else 0)
        sample.phase("baseline")
    except Exception as error:  # the tasks are reserved: they go to the loop whatever failed here
        log.warning("job %d: probe measurement failed: %s: %.200s", job.id, type(error).__name__, error)
        sample.images, sample.inference = [], []
    sample.batch = Batch(items)
    return sample


def _time_for_fit(pipeline: Pipeline, good: Sequence[LoadedImage], slug: str, *, cuda: bool,
                  overhead_floor_s: Optional[float], threads_sleep: bool) -> list[InferenceSample]:
    warm_up(pipeline, good[0].image)  # a no-op after the worker's start-up warm-up
    if cuda or overhead_floor_s is None:
        return time_sample(pipeline, good, slug, cuda=cuda, threads_sleep=threads_sleep)
    one_thread = time_one_thread(pipeline, good, slug, cuda=False, threads_sleep=threads_sleep)
    return time_repeats(pipeline, good, slug) + ([one_thread] if one_thread is not None else [])


# The sample batch is timed again before the loop times it, so the fit takes a median of three
# timings, not one: on the 2-core benchmark host one timing of the same three images at two
# threads ranged 0.035-0.095 s per image within a minute, and the one the loop took alone moved
# the reference job's prediction from -20% to +54% of its measured rate across draws. Each
# repeat costs the sample's inference once (0.15-0.2 s for three images on that host, small or
# large); none is made once the repeats would pass the budget.
SAMPLE_REPEATS = 2
SAMPLE_REPEAT_BUDGET_S = 0.5


def time_repeats(pipeline: Pipeline, items: Sequence[LoadedImage], slug: str, *, repeats: int = SAMPLE_REPEATS,
                 budget_s: float = SAMPLE_REPEAT_BUDGET_S) -> list[InferenceSample]:
    """``items`` as one batch at the default thread count (nothing posted), timed up to
    ``repeats`` times while the time spent, with one more timing like the longest so far, stays
    within ``budget_s``."""
    samples: list[InferenceSample] = []
    spent_s = 0.0
    for _ in range(repeats):
        if samples and spent_s + max(sample.seconds for sample in samples) > budget_s:
            break
        started_s, started_cpu_s = time.perf_counter(), time.process_time()
        run_batch(pipeline, list(items), slug)
        seconds = time.perf_counter() - started_s
        samples.append(InferenceSample(len(items), seconds, threads=torch.get_num_threads(),
                                       cpu_s=time.process_time() - started_cpu_s))
        spent_s += seconds
    return samples


def median_of_repeats(samples: Sequence[InferenceSample], batch_size: int, threads: int) -> list[InferenceSample]:
    """``samples`` with the timings of the whole sample at the default threads (``time_repeats``
    and the loop's) replaced by their median one: the same images each time, so one stalled
    timing should not move the fit. (Images timed alone are different images, kept as they are.)"""
    repeats = [sample for sample in samples if sample.batch_size == batch_size and sample.threads in (0, threads)]
    if len(repeats) < 2:
        return list(samples)
    middle = sorted(repeats, key=lambda sample: sample.seconds)[(len(repeats) - 1) // 2]
    return [sample for sample in samples if sample not in repeats] + [middle]


def fit_probe(sample: ProbeSample, stats: JobStats, settings: Settings, *, calibration: MemoryCalibration,
              cuda: bool, forward_batch_size: int) -> ProbeRun:
    """The ``Probe`` from ``sample`` and the loop's timing of its batch (``stats.last_inference_s``)."""
    sample.phase("processing")
    inference = list(sample.inference)
    if sample.images:  # the loaded images: the batch's items have been released by now
        inference.append(InferenceSample(sample.images_ok, stats.last_inference_s, threads=torch.get_num_threads(),
                                         cpu_s=stats.last_inference_cpu_s))
        inference = median_of_repeats(inference, sample.images_ok, torch.get_num_threads())
    if not sample.images:
        return ProbeRun(None, sample.tasks, 0, time.perf_counter() - sample.started_s, sample.tasks, sample.phases_s)
    probe = Probe.from_samples(
        sample.images, inference, baseline_bytes=sample.baseline_bytes, cpu_count=cpu_count(), cuda=cuda,
        reservation_timeout_s=settings.antenna_reservation_timeout_s, api_round_trip_s=sample.round_trip_s,
        max_pending_posts=settings.antenna_max_pending_posts,
        calibration=calibration, forward_batch_size=forward_batch_size,
        inference_threads=torch.get_num_threads(), external_cpu_s=sample.external_cpu_s,
        api_exchange_cpu_s=sample.exchange_cpu_s, inference_overhead_floor_s=sample.overhead_floor_s or 0.0,
        inference_memory=sample.inference_memory, model_input_pixels=sample.geometry.model_input_pixels,
        float_copy_bytes_per_image=sample.geometry.float_copy_bytes,
    )
    if sample.head_start is not None and sample.head_start.tasks:
        held = min(sample.head_start.budget.limit_bytes, len(sample.head_start.tasks) * probe.max_jpeg_bytes)
        probe = replace(probe, head_start_bytes=max(held, sample.head_start.held_bytes),
                        head_start_images=len(sample.head_start.tasks))
    sample.phase("fit")
    return ProbeRun(probe, sample.tasks, sample.images_ok, time.perf_counter() - sample.started_s, sample.tasks,
                    sample.phases_s)
