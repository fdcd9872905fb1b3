"""The pipeline contract, and ``run_batch``, which turns one ingest batch into one typed result
per image.

A pipeline takes uint8 (3,H,W) images (or float ones in [0,1]: ``unit_float``) and returns, per
image, its ``Detection``s with their ``Classification``s (boxes in original-image pixels, no EXIF
rotation). ``run_batch`` wraps any pipeline: images that failed to load pass through as error
results; an exception on a batch (CUDA out-of-memory included) splits the batch and retries the
halves, so only the image that really fails is reported failed.
"""
from __future__ import annotations

import logging
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from pydantic import ValidationError

from worker.results import Failure, ImageResult
from worker.schema import (
    AlgorithmReference,
    BoundingBox,
    ClassificationResponse,
    DetectionResponse,
    PipelineResultsResponse,
    SourceImageResponse,
    utc_now_iso,
)

log = logging.getLogger(__name__)


def unit_float(image: torch.Tensor) -> torch.Tensor:
    """``image`` as float in [0,1]: uint8 pixels divided by 255 into a new tensor; a floating-point
    image is taken as already in [0,1] (as ADC's loader makes them, and the benchmark-only float32
    ingest hands them on) and returned as it is: callers never write into the result."""
    if image.is_floating_point():
        return image.float()
    return image.float().div_(255.0)


@dataclass(frozen=True)
class Classification:
    """One algorithm's classification of one detection.

    ``scores`` are full length in the registered category map's order (the server stores the map
    entry at argmax); ``logits`` likewise, or None where the operator leaves them out.
    """

    algorithm: AlgorithmReference
    label: str
    scores: Sequence[float]
    logits: Optional[Sequence[float]] = None
    terminal: bool = True


@dataclass(frozen=True)
class Detection:
    """A box in original-image pixels, its detector score, and its classifications in order."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    classifications: tuple[Classification, ...] = ()


@dataclass(frozen=True)
class ModelInput:
    """What one image of ``width x height`` becomes inside ``infer``: ``pixels`` at the model's
    input (after the pipeline's or the model's own resize) and ``float_copies``, the float32
    copies of the whole image at its own size held while a forward batch runs (ADC's pipelines
    and TorchScript: 1, converted on the device; the reference pipeline resizes first: 0)."""

    pixels: int
    float_copies: int = 1

    def float_copy_bytes(self, width: int, height: int) -> int:
        return self.float_copies * width * height * 3 * 4


class PipelineUnavailable(RuntimeError):
    """The pipeline's models could not be loaded (a weights file gone bad, a card out of memory):
    no image was tried. ``run_batch`` passes it on rather than failing each image, and the loop
    reserves nothing of the pipeline's jobs until a load succeeds. ``str()`` is one line."""


class Pipeline:
    """Base class. ``infer`` takes uint8 (3,H,W) tensors and returns detections per image."""

    slug = "base"
    name = "Base"
    description = ""
    detector = AlgorithmReference(name="Base detector", key="detector")

    def __init__(self, device: torch.device, *, localization_batch_size: int = 8,
                 classification_batch_size: int = 20, classification_threshold: float = 0.0) -> None:
        self.device = device
        self.localization_batch_size = localization_batch_size
        self.classification_batch_size = classification_batch_size
        self.classification_threshold = classification_threshold

    def infer(self, images: Sequence[torch.Tensor]) -> list[list[Detection]]:
        raise NotImplementedError

    def model_input(self, width: int, height: int) -> ModelInput:
        """The model's view of a ``width x height`` image (memory is priced per model input
        pixel). Default: the image at its own size, converted to float once."""
        return ModelInput(width * height, 1)

    def crop_peaks(self, counts: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """``(crops, peak bytes above steady state)`` of the terminal classifier's forward pass
        over each of ``counts`` synthetic crops (``call_peak_bytes``), for pipelines with a crop
        classifier whose batch is ``classification_batch_size``; empty (the default) otherwise."""
        return ()

    def prepare(self) -> None:
        """Make sure everything ``infer`` needs is at hand (files fetched and whole); called at
        start-up so a missing file fails the start, not a job. Raises with a one-line message."""

    def ensure_loaded(self) -> None:
        """Load the models now if they are not (a pipeline drops them after an idle spell), before
        any task of a job is reserved; raises ``PipelineUnavailable``. Default: nothing to load."""

    def config(self) -> dict:
        """A PipelineConfigResponse body for ``POST /projects/{id}/pipelines/``: the detector only."""
        return {"name": self.name, "slug": self.slug, "version": 1, "description": self.description,
                "algorithms": [{"name": self.detector.name, "key": self.detector.key, "task_type": "localization"}],
                "stages": []}


def detection_response(pipeline: Pipeline, image_id: str, detection: Detection, inference_s: float,
                       timestamp: str) -> DetectionResponse:
    return DetectionResponse(
        source_image_id=image_id,
        bbox=BoundingBox(x1=detection.x1, y1=detection.y1, x2=detection.x2, y2=detection.y2),
        inference_time=inference_s, algorithm=pipeline.detector, timestamp=timestamp,
        classifications=[ClassificationResponse(
            classification=c.label, scores=list(c.scores), logits=None if c.logits is None else list(c.logits),
            inference_time=inference_s, algorithm=c.algorithm, terminal=c.terminal, timestamp=timestamp,
        ) for c in detection.classifications],
    )


def run_batch(pipeline: Pipeline, items: Sequence, pipeline_slug: Optional[str] = None) -> list[ImageResult]:
    """Infer one ingest batch; one ``ImageResult`` per item, errors included, order kept.

    ``items`` are ``LoadedImage``-like (``task``, ``image``, ``error``: a ``Failure``). Download and
    decode failures become error results; inference failures split the batch until the failing
    image is alone. Models that cannot be loaded raise ``PipelineUnavailable``: an error result
    would mark each image failed for good, for a fault of this worker's.
    """
    slug = pipeline_slug or pipeline.slug
    results: list[ImageResult] = []
    good = [item for item in items if item.image is not None]
    inferred = dict(zip((id(i) for i in good), _infer_splitting(pipeline, good)))
    for item in items:
        if item.image is None:
            results.append(ImageResult.error(item.task, item.error or Failure("other", "image unavailable")))
            continue
        outcome = inferred[id(item)]
        if isinstance(outcome, Failure):
            results.append(ImageResult.error(item.task, outcome))
        else:
            detections, seconds = outcome
            try:
                results.append(ImageResult(item.task, _success(pipeline, slug, item.task, detections, seconds)))
            except ValidationError as error:  # NaN or Inf: one such item would make the server refuse the post
                failure = Failure("inference", f"inference output not valid for the server: {_first_problem(error)}")
                log.warning("image %s: %s", item.task.image_id, failure.message)
                results.append(ImageResult.error(item.task, failure))
    return results


def _first_problem(error: ValidationError) -> str:
    """``scores.3: Input should be a finite number (nan)``: where and what, from pydantic's first error."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"{where}: {first.get('msg', 'invalid')} ({first.get('input')!r})"


def _infer_splitting(pipeline: Pipeline, items: list) -> list:
    """Per item: ``(detections, seconds_per_image)`` or the ``Failure``."""
    if not items:
        return []
    started_s = time.perf_counter()
    try:
        detections = pipeline.infer([item.image for item in items])
        if len(detections) != len(items):
            raise ValueError(f"{type(pipeline).__name__}.infer returned {len(detections)} results for {len(items)} images")
    except PipelineUnavailable:  # no image was tried: the loop gives the tasks back
        raise
    except Exception as error:  # CUDA OOM included: torch.cuda.OutOfMemoryError is a RuntimeError
        if len(items) == 1:
            log.warning("image %s failed inference: %s", items[0].task.image_id, error)
            return [Failure("inference", f"inference failed: {type(error).__name__}: {str(error)[:300]}")]
        if isinstance(error, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        half = len(items) // 2
        log.warning("batch of %d failed (%s: %.120s); retrying as %d + %d",
                    len(items), type(error).__name__, error, half, len(items) - half)
        return _infer_splitting(pipeline, items[:half]) + _infer_splitting(pipeline, items[half:])
    seconds = (time.perf_counter() - started_s) / len(items)
    return [(found, seconds) for found in detections]


def _success(pipeline: Pipeline, slug: str, task, detections: list[Detection], seconds: float) -> PipelineResultsResponse:
    timestamp = utc_now_iso()
    return PipelineResultsResponse(
        pipeline=slug, total_time=seconds, source_images=[SourceImageResponse(id=task.image_id, url=task.image_url)],
        detections=[detection_response(pipeline, task.image_id, d, seconds, timestamp) for d in detections],
    )


_WARMED: "weakref.WeakSet[Pipeline]" = weakref.WeakSet()


def warm_up(pipeline: Pipeline, image: Optional[torch.Tensor] = None) -> bool:
    """Run one image through ``pipeline`` once per process, results discarded; True if it ran now.

    The first call of a model pays lazy initialisation (kernel selection, thread pools, the
    allocator's growth): the worker pays it at start, after loading the model, so the first job's
    probe times a warm model and the job's clock does not carry it. ``image`` defaults to a
    synthetic light sheet with two dark specimens, so detection and classification both run.
    """
    if pipeline in _WARMED:
        return False
    pipeline.infer([_warm_up_image() if image is None else image])
    _WARMED.add(pipeline)
    return True


_BATCH_OVERHEAD_S: "weakref.WeakKeyDictionary[Pipeline, float]" = weakref.WeakKeyDictionary()
_INFERENCE_PEAKS: "weakref.WeakKeyDictionary[Pipeline, tuple[tuple[int, int], ...]]" = weakref.WeakKeyDictionary()
_ONE_IMAGE_S: "weakref.WeakKeyDictionary[Pipeline, float]" = weakref.WeakKeyDictionary()
OVERHEAD_REPEATS = 5
OVERHEAD_BUDGET_S = 10.0
MEASURE_IMAGE_SIZE = (1024, 768)  # (width, height) of the synthetic image the start-up measures


def batch_overhead_s(pipeline: Pipeline, repeats: int = OVERHEAD_REPEATS, budget_s: float = OVERHEAD_BUDGET_S) -> float:
    """The pipeline's per-batch inference cost in seconds, measured once per process (cached).

    On the synthetic warm-up image, ``repeats`` pairs of one image alone (t1) and ``b`` copies as
    one batch (tb; b = 4, or the forward batch when smaller, so both are one forward call). Each
    pair estimates ``(b x t1 - tb) / (b - 1)``; the median of the pairs is kept, clamped to >= 0.
    A pair is timed back to back, so a disturbance (another process taking a core) spoils one
    estimate, which the median drops. About 2 s at start for the reference pipeline on 2 cores. The
    worker measures it off any job's clock (``AutotunePlanner.start``);
    the probe uses it as a floor under its own fit (``Probe.from_samples``). It is the fixed cost of
    a call (Python, operator dispatch, thread start-up), which the image's size changes little.
    No pair starts once ``budget_s`` has passed (at least one is timed): a detector of seconds per
    image on a CPU would otherwise spend minutes here. The same calls measure the pipeline's
    memory (``inference_peaks``).
    """
    cached = _BATCH_OVERHEAD_S.get(pipeline)
    if cached is not None:
        return cached
    forward = int(getattr(pipeline, "localization_batch_size", 4) or 4)
    warm_up(pipeline)
    image = _warm_up_image()
    if forward < 2:  # every image is its own forward call: per-image and per-call cost are one
        started_s = time.perf_counter()
        _INFERENCE_PEAKS[pipeline] = ((1, peak_increase_bytes(pipeline, [image])),)
        _ONE_IMAGE_S[pipeline] = time.perf_counter() - started_s
        _BATCH_OVERHEAD_S[pipeline] = 0.0
        return 0.0
    batch = min(4, forward)
    estimates: list[float] = []
    ones: list[float] = []
    peaks: list[tuple[int, int]] = []
    begun_s = time.perf_counter()
    for _ in range(max(1, repeats)):
        if estimates and time.perf_counter() - begun_s >= budget_s:
            break
        started_s = time.perf_counter()
        peaks.append((1, peak_increase_bytes(pipeline, [image])))
        one_s = time.perf_counter() - started_s
        ones.append(one_s)
        started_s = time.perf_counter()
        peaks.append((batch, peak_increase_bytes(pipeline, [image] * batch)))
        many_s = time.perf_counter() - started_s
        estimates.append((batch * one_s - many_s) / (batch - 1))
    overhead_s = max(0.0, statistics.median(estimates))
    _BATCH_OVERHEAD_S[pipeline] = overhead_s
    _ONE_IMAGE_S[pipeline] = statistics.median(ones)
    _INFERENCE_PEAKS[pipeline] = tuple((items, bytes_) for items, bytes_ in peaks if bytes_ >= 0)
    return overhead_s


def one_image_s(pipeline: Pipeline) -> Optional[float]:
    """Seconds one synthetic ``MEASURE_IMAGE_SIZE`` image took alone in ``batch_overhead_s``'s
    calls (the median); None where they have not run in this process (nothing is measured here)."""
    return _ONE_IMAGE_S.get(pipeline)


def inference_peaks(pipeline: Pipeline) -> tuple[tuple[int, int], ...]:
    """``(images, peak bytes above steady state)`` of each call ``batch_overhead_s`` made (measured
    then, once per process), on the synthetic ``MEASURE_IMAGE_SIZE`` image: the process's peak RSS
    on CPU, the caching allocator's peak on CUDA. Empty where the peak cannot be read."""
    batch_overhead_s(pipeline)
    return _INFERENCE_PEAKS.get(pipeline, ())


def peak_increase_bytes(pipeline: Pipeline, images: Sequence[torch.Tensor]) -> int:
    """Run ``pipeline.infer(images)`` (results discarded) and return its peak memory above the
    state before the call (``call_peak_bytes``); -1 where it cannot be read."""
    return call_peak_bytes(pipeline.device, lambda: pipeline.infer(list(images)))


def call_peak_bytes(device: torch.device, call: Callable[[], object]) -> int:
    """Run ``call`` and return its peak memory above the state before it; -1 where unreadable.

    CPU: ``/proc/self/clear_refs`` 5 resets the process's peak RSS (VmHWM) to its current RSS, so
    VmHWM after the call less VmRSS before is the call's peak, threads and allocator included.
    CUDA: the caching allocator's peak of allocated bytes above those allocated before.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    before = _status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        before = -1
    call()
    peak = _status_bytes("VmHWM") if before >= 0 else -1
    return max(0, peak - before) if peak >= 0 else -1


def _status_bytes(key: str) -> int:
    """A ``kB`` line of ``/proc/self/status`` in bytes; -1 where it cannot be read (not Linux)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def _warm_up_image() -> torch.Tensor:
    width, height = MEASURE_IMAGE_SIZE
    image = torch.full((3, height, width), 215, dtype=torch.uint8)
    image[:, 200:300, 300:420] = 60
    image[:, 450:530, 600:690] = 45
    return image
