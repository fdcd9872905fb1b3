"""ADC's pipelines: FasterRCNN detector, optional moth/non-moth filter, terminal classifier.

Per ``infer`` call (one ingest batch of uint8 images):

1. Images go to the inference device as uint8, ``localization_batch_size`` at a time (the
   detector chunk); only one chunk's images are on the device at once.
2. The detector sees them as float [0,1] (converted on the device) at full resolution; it resizes
   and normalises internally and returns boxes in original pixels. Boxes scoring strictly above
   0.80 are kept, truncated to int; a box with x1 >= x2 or y1 >= y2 is dropped (ADC drops them too).
3. Crops are slices of the device's uint8 image, converted to float there, resized (bilinear,
   antialias) to the model's square input and normalised; ``classification_batch_size`` crops per
   forward pass, built chunk by chunk so only one chunk of crops exists at a time.
4. With a filter, every detection gets the binary classification (``terminal: false``); those
   labelled ``moth`` then get the terminal classification (``terminal: true``), ``nonmoth`` ones
   keep only the binary one. Without a filter every detection gets the terminal one.
5. A CUDA out-of-memory error in a forward pass splits that chunk in two and retries each half,
   down to one item; only then does the error reach ``run_batch`` (which splits the images).
   The size that fitted caps that model's later passes until the pipeline is unloaded.

Detections are returned in detector order (ADC lists nonmoth detections first; Antenna stores
them by box, so the order carries nothing). Scores are the full softmax in label-index order,
rounded to 6 decimals; logits (4 decimals) are included unless ``include_logits`` is off; the
classification is the label at the unrounded argmax. ``classification_threshold`` is not applied:
ADC does not apply it on this path either.

Models are built on first use and shared between pipelines of one process (the ten pipelines use
one detector and nine use one filter); after ``idle_evict_s`` without a call a pipeline drops its
models and reloads them on the next call.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from worker.pipelines.architectures import CheckpointError, check_checkpoint_file, detector_input_size, load_model
from worker.pipelines.base import (
    Classification,
    Detection,
    ModelInput,
    Pipeline,
    PipelineUnavailable,
    call_peak_bytes,
    unit_float,
)
from worker.pipelines.catalog import (
    DETECTOR_SCORE_THRESHOLD,
    MOTH_LABEL,
    NONMOTH_LABEL,
    TRANSFORM_NORMALISATION,
    ModelSpec,
    PipelineSpec,
)
from worker.pipelines.weights import ModelFileError, ModelStore, read_labels
from worker.schema import AlgorithmReference

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Box = tuple[int, int, int, int]


class ModelSource(Protocol):
    """Where an ADC pipeline's labels and models come from (``StoreSource`` in production)."""

    def labels(self, spec: ModelSpec) -> tuple[str, ...]: ...

    def prepare(self, spec: ModelSpec) -> None: ...

    def model(self, spec: ModelSpec, device: torch.device, num_classes: int) -> nn.Module: ...


_SHARED: "weakref.WeakValueDictionary[tuple, nn.Module]" = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


class StoreSource:
    """Files from a ``ModelStore``; models built by ``architectures`` and shared process-wide
    while any pipeline holds them (keyed by weights file, class count and device)."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store

    def labels(self, spec: ModelSpec) -> tuple[str, ...]:
        return read_labels(self.store.fetch(spec.labels_url)) if spec.labels_url else ()

    def prepare(self, spec: ModelSpec) -> None:
        check_checkpoint_file(self.store.fetch(spec.weights_url))

    def model(self, spec: ModelSpec, device: torch.device, num_classes: int) -> nn.Module:
        path = self.store.fetch(spec.weights_url)
        key = (spec.architecture, str(path), num_classes, str(device))
        with _SHARED_LOCK:
            model = _SHARED.get(key)
            if model is None:
                started_s = time.perf_counter()
                try:
                    model = load_model(spec.architecture, path, device, num_classes)
                except CheckpointError as error:
                    self._set_aside(error)
                    raise
                _SHARED[key] = model
                log.info("built %s (%s, %d classes) on %s in %.2f s", spec.name, spec.architecture,
                         num_classes, device, time.perf_counter() - started_s)
            return model

    def _set_aside(self, error: CheckpointError) -> None:
        """A file of our cache that torch cannot read (cut short, overwritten) is renamed
        ``*.unreadable``, so the next load fetches it again; ADC's hub cache is never touched."""
        if error.problem != "unreadable" or error.path.parent != self.store.models_dir:
            return
        aside = error.path.with_name(error.path.name + ".unreadable")
        try:
            error.path.replace(aside)
        except OSError as move_error:
            log.warning("%s is unreadable and could not be set aside (%s)", error.path, move_error)
            return
        log.warning("%s is unreadable: set aside as %s, to be fetched again at the next load", error.path, aside.name)


@dataclass(frozen=True)
class LoadedClassifier:
    spec: ModelSpec
    algorithm: AlgorithmReference
    labels: tuple[str, ...]
    model: nn.Module
    mean: torch.Tensor  # (1,3,1,1) on the device
    std: torch.Tensor
    terminal: bool


@dataclass(frozen=True)
class LoadedModels:
    detector: nn.Module
    binary: Optional[LoadedClassifier]
    classifier: LoadedClassifier


class ChunkLimit:
    """The largest forward pass known to fit on the device, learnt from out-of-memory splits.

    ``None`` until a pass runs out of memory; then the size of the largest half that ran, so
    later passes start there instead of failing and splitting again every batch. Unloading the
    pipeline forgets it."""

    def __init__(self) -> None:
        self.items: Optional[int] = None

    def size(self, configured: int) -> int:
        return max(1, min(configured, self.items or configured))

    def learn(self, fitting: int) -> None:
        if self.items is None or fitting < self.items:
            self.items = fitting


def run_chunked(forward: Callable[[list[Item]], list], items: Sequence[Item], chunk_size: int,
                what: str = "forward", limit: Optional[ChunkLimit] = None) -> list:
    """``forward`` over ``items`` in chunks of ``chunk_size`` (or ``limit``'s smaller size), results
    concatenated in order.

    A ``torch.cuda.OutOfMemoryError`` splits the chunk in halves, each retried the same way, and
    ``limit`` learns the half's size; an item that fails alone re-raises."""
    limit = limit or ChunkLimit()
    out: list = []
    start = 0
    while start < len(items):
        size = limit.size(chunk_size)
        out.extend(_forward_splitting(forward, list(items[start:start + size]), what, limit))
        start += size
    return out


def _forward_splitting(forward: Callable[[list[Item]], list], items: list[Item], what: str,
                       limit: ChunkLimit) -> list:
    try:
        return forward(items)
    except torch.cuda.OutOfMemoryError:
        if len(items) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(items) // 2
        limit.learn(len(items) - half)
        log.warning("%s of %d ran out of device memory; retrying as %d + %d, and at most %d from now on",
                    what, len(items), half, len(items) - half, limit.items)
        return (_forward_splitting(forward, items[:half], what, limit)
                + _forward_splitting(forward, items[half:], what, limit))


class ADCPipeline(Pipeline):
    """One of ADC's ten pipelines (see ``catalog.PIPELINES``) on ``device``."""

    def __init__(self, device: torch.device, spec: PipelineSpec, source: ModelSource, *,
                 include_logits: bool = True, idle_evict_s: float = 0.0, **batching: object) -> None:
        super().__init__(device, **batching)  # type: ignore[arg-type]
        self.spec = spec
        self.source = source
        self.slug = spec.slug
        self.name = spec.name
        self.description = spec.description
        self.detector = AlgorithmReference(name=spec.detector.name, key=spec.detector.key)
        self.include_logits = include_logits
        self.idle_evict_s = idle_evict_s
        self.labels = {m.weights_url: source.labels(m) for m in spec.models() if m.labels_url}
        if spec.binary is not None:
            _check_binary_labels(spec.binary, self.labels[spec.binary.weights_url])
        self._models: Optional[LoadedModels] = None
        self._limits: dict[str, ChunkLimit] = {}  # per model key
        self._lock = threading.Lock()
        self._in_use = 0
        self._last_used_s = time.monotonic()
        if idle_evict_s > 0:
            IDLE_EVICTOR.watch(self)

    # --- registration -----------------------------------------------------------------------
    def config(self) -> dict:
        """ADC's PipelineConfigResponse for this pipeline, from the labels files alone."""
        return {"name": self.spec.name, "slug": self.spec.slug, "version": 1, "description": self.spec.description,
                "algorithms": [self._algorithm_config(m) for m in self.spec.models()], "stages": []}

    def _algorithm_config(self, model: ModelSpec) -> dict:
        labels = self.labels.get(model.weights_url, ())
        return {
            "name": model.name, "key": model.key, "description": model.description, "task_type": model.task_type,
            "version": 1, "version_name": None, "uri": model.weights_url,
            "category_map": {
                "data": [{"index": i, "label": label, "taxon_rank": model.taxon_rank} for i, label in enumerate(labels)],
                "labels": list(labels), "version": None, "description": None, "uri": model.labels_url,
            },
        }

    def model_input(self, width: int, height: int) -> ModelInput:
        """The detector's own resize (short side 800 px, long side at most 1333, padded to 32):
        activations scale with that; the float copy of the whole chunk is at full size."""
        input_width, input_height = detector_input_size(width, height)
        return ModelInput(input_width * input_height, 1)

    @torch.no_grad()
    def crop_peaks(self, counts: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """The terminal classifier over ``n`` crops of a synthetic image on the device, one forward
        pass each (``n`` above ``classification_batch_size`` is run in one pass all the same)."""
        classifier = self.loaded_models().classifier
        image = torch.full((3, 768, 1024), 128, dtype=torch.uint8, device=self.device)
        box: Box = (100, 100, 612, 612)
        peaks = []
        for count in counts:
            items = [(0, box)] * max(1, count)
            peak = call_peak_bytes(self.device, lambda: self._classify_chunk(classifier, [image], items))
            if peak >= 0:
                peaks.append((len(items), peak))
        return tuple(peaks)

    # --- model lifecycle ----------------------------------------------------------------------
    def prepare(self) -> None:
        """Fetch every weights file and check it is whole; raises a one-line error otherwise."""
        for model in self.spec.models():
            self.source.prepare(model)

    def loaded_models(self) -> LoadedModels:
        """The models, loaded now if they are not; raises ``PipelineUnavailable`` when they cannot be."""
        with self._lock:
            if self._models is None:
                try:
                    self._models = self._load()
                except Exception as error:  # a file gone bad or missing, its source down, a card out of memory
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    detail = (str(error).splitlines() or [""])[0][:300]
                    raise PipelineUnavailable(f"pipeline {self.slug}: its models could not be loaded "
                                              f"({type(error).__name__}: {detail})") from error
            return self._models

    def ensure_loaded(self) -> None:
        with self._lock:
            self._last_used_s = time.monotonic()  # loaded for a job: not idle
        self.loaded_models()

    def is_loaded(self) -> bool:
        return self._models is not None

    def evict_if_idle(self, now_s: Optional[float] = None) -> bool:
        """Drop the models if unused for ``idle_evict_s``; True if dropped now."""
        now_s = time.monotonic() if now_s is None else now_s
        with self._lock:
            if self.idle_evict_s <= 0 or now_s - self._last_used_s < self.idle_evict_s:
                return False
        if self.unload():
            log.info("pipeline %s idle for %.0f s: models unloaded", self.slug, now_s - self._last_used_s)
            return True
        return False

    def unload(self) -> bool:
        """Drop this pipeline's models unless a call is using them; the next call reloads them.
        Models another loaded pipeline shares stay in memory. True if models were dropped."""
        with self._lock:
            if self._models is None or self._in_use:
                return False
            self._models = None
            self._limits.clear()
        gc.collect()  # the shared-model cache holds weak references: this frees what no pipeline uses
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    def _load(self) -> LoadedModels:
        detector = self.source.model(self.spec.detector, self.device, 0)
        binary = self._classifier(self.spec.binary, terminal=False) if self.spec.binary else None
        return LoadedModels(detector=detector, binary=binary, classifier=self._classifier(self.spec.classifier, terminal=True))

    def _classifier(self, spec: ModelSpec, *, terminal: bool) -> LoadedClassifier:
        labels = self.labels[spec.weights_url]
        mean, std = TRANSFORM_NORMALISATION[spec.transform or "resnet"]
        return LoadedClassifier(
            spec=spec, algorithm=AlgorithmReference(name=spec.name, key=spec.key), labels=labels,
            model=self.source.model(spec, self.device, len(labels)),
            mean=torch.tensor(mean, device=self.device).view(1, 3, 1, 1),
            std=torch.tensor(std, device=self.device).view(1, 3, 1, 1), terminal=terminal)

    # --- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, images: Sequence[torch.Tensor]) -> list[list[Detection]]:
        with self._lock:
            self._in_use += 1
        try:
            models = self.loaded_models()
            out: list[list[Detection]] = []
            for start in range(0, len(images), self.localization_batch_size):
                on_device = [image.to(self.device, non_blocking=True)
                             for image in images[start:start + self.localization_batch_size]]
                out.extend(self._infer_on_device(models, on_device))
            return out
        finally:
            with self._lock:
                self._in_use -= 1
                self._last_used_s = time.monotonic()

    def _infer_on_device(self, models: LoadedModels, images: list[torch.Tensor]) -> list[list[Detection]]:
        boxes = self._detect(models.detector, images)
        found = [(index, box, score) for index, per_image in enumerate(boxes) for box, score in per_image]
        classifications: list[list[Classification]] = [[] for _ in found]
        to_classify = list(range(len(found)))
        if models.binary is not None:
            binary = self._classify(models.binary, images, [found[i][:2] for i in to_classify])
            for i, result in zip(to_classify, binary):
                classifications[i].append(result)
            to_classify = [i for i in to_classify if classifications[i][0].label == MOTH_LABEL]
        for i, result in zip(to_classify, self._classify(models.classifier, images, [found[i][:2] for i in to_classify])):
            classifications[i].append(result)
        results: list[list[Detection]] = [[] for _ in images]
        for (index, box, score), classified in zip(found, classifications):
            results[index].append(Detection(*(float(v) for v in box), score=score, classifications=tuple(classified)))
        return results

    def _detect(self, detector: nn.Module, images: list[torch.Tensor]) -> list[list[tuple[Box, float]]]:
        def forward(chunk: list[torch.Tensor]) -> list[list[tuple[Box, float]]]:
            outputs = detector([unit_float(image) for image in chunk])
            return [_kept_boxes(output) for output in outputs]

        return run_chunked(forward, images, self.localization_batch_size, "detector batch",
                           self._limits.setdefault(self.spec.detector.key, ChunkLimit()))

    def _classify(self, classifier: LoadedClassifier, images: list[torch.Tensor],
                  items: list[tuple[int, Box]]) -> list[Classification]:
        def forward(chunk: list[tuple[int, Box]]) -> list[Classification]:
            return self._classify_chunk(classifier, images, chunk)

        return run_chunked(forward, items, self.classification_batch_size, f"{classifier.spec.key} batch",
                           self._limits.setdefault(classifier.spec.key, ChunkLimit()))

    def _classify_chunk(self, classifier: LoadedClassifier, images: list[torch.Tensor],
                        chunk: list[tuple[int, Box]]) -> list[Classification]:
        """One forward pass over ``chunk``'s crops (cut on the device, normalised there)."""
        size_px = classifier.spec.input_size_px
        crops = torch.cat([_crop(images[index], box, size_px) for index, box in chunk])
        logits = classifier.model((crops - classifier.mean) / classifier.std)
        return self._classifications(classifier, logits)

    def _classifications(self, classifier: LoadedClassifier, logits: torch.Tensor) -> list[Classification]:
        logits = logits.float()
        scores = torch.softmax(logits, dim=1)
        best = scores.argmax(dim=1).tolist()
        rounded_scores = scores.double().mul_(1e6).round_().div_(1e6).cpu().tolist()
        rounded_logits = logits.double().mul_(1e4).round_().div_(1e4).cpu().tolist() if self.include_logits else None
        return [Classification(classifier.algorithm, classifier.labels[top], scores=rounded_scores[row],
                               logits=rounded_logits[row] if rounded_logits is not None else None,
                               terminal=classifier.terminal)
                for row, top in enumerate(best)]


def _kept_boxes(output: dict) -> list[tuple[Box, float]]:
    """ADC's post-processing: score > 0.80, boxes truncated to int; degenerate boxes dropped."""
    keep = output["scores"] > DETECTOR_SCORE_THRESHOLD
    boxes = output["boxes"][keep].cpu().tolist()
    scores = output["scores"][keep].cpu().tolist()
    kept = []
    for box, score in zip(boxes, scores):
        x1, y1, x2, y2 = (int(v) for v in box)
        if x1 < x2 and y1 < y2:
            kept.append(((x1, y1, x2, y2), float(score)))
    return kept


def _crop(image: torch.Tensor, box: Box, size_px: int) -> torch.Tensor:
    """(1,3,size,size) float in [0,1]: the box's pixels of the uint8 image, stretched to a square."""
    x1, y1, x2, y2 = box
    region = unit_float(image[:, y1:y2, x1:x2])
    return F.interpolate(region[None], size=(size_px, size_px), mode="bilinear", align_corners=False, antialias=True)


def _check_binary_labels(spec: ModelSpec, labels: tuple[str, ...]) -> None:
    missing = {MOTH_LABEL, NONMOTH_LABEL} - set(labels)
    if missing:
        raise ModelFileError("bad_labels", f"{spec.labels_url}: the moth/non-moth labels file lacks "
                             f"{', '.join(sorted(missing))} (has {', '.join(labels[:4])})")


class IdleEvictor:
    """A daemon thread that asks each watched pipeline to drop its models once idle."""

    def __init__(self) -> None:
        self._pipelines: "weakref.WeakSet[ADCPipeline]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self.interval_s = 60.0

    def watch(self, pipeline: ADCPipeline) -> None:
        with self._lock:
            self._pipelines.add(pipeline)
            self.interval_s = min(self.interval_s, max(0.05, pipeline.idle_evict_s / 4))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pipeline-idle-evictor", daemon=True)
                self._thread.start()

    def sweep(self, now_s: Optional[float] = None) -> int:
        with self._lock:
            pipelines = list(self._pipelines)
        return sum(pipeline.evict_if_idle(now_s) for pipeline in pipelines)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            try:
                self.sweep()
            except Exception:  # an eviction must never kill the thread that does them
                log.exception("idle eviction failed")


IDLE_EVICTOR = IdleEvictor()
