"""Predicted peak memory of a job's process tree for one LoaderPlan, component by component.

The model follows the worker's ingest (``worker/ingest.py``): each loader worker (or the main
process when ``num_workers == 0``) keeps up to ``min(download_threads, tasks_per_reserve)``
downloads in flight, decodes one image at a time into shared memory, assembles a batch, and may
run ``prefetch_factor`` batches ahead of the main process; with pin_memory the main process holds a
pinned copy of every batch handed over; the main process holds the batch being inferred (and, on
CPU, its float copy and the model's activations). Sizes use the LARGEST probed image.

Per-image and per-worker constants live in ``MemoryCalibration`` (``autotune/calibration.json``,
written by a one-off measurement script). A per-pipeline ``CorrectionStore`` learns how far the
prediction was off after each job; ``predict_peak(..., correction=)`` applies it to the total.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:  # probe.py imports this module; the type is only needed for annotations
    from autotune.plan import LoaderPlan
    from autotune.probe import Probe

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_CALIBRATION_PATH = Path(__file__).with_name("calibration.json")
CORRECTION_MIN = 0.5
CORRECTION_MAX = 3.0
BYTES_PER_FLOAT32 = 4
CHANNELS = 3


@dataclass(frozen=True)
class MemoryCalibration:
    """Machine-measured constants of the memory model. JSON keys == these field names.

    - ``worker_process_bytes``: one loader worker (a fork of the fork server, which imported
      torch and belongs to the baseline), before any image.
    - ``download_buffer_factor``: bytes held per in-flight download per compressed byte
      (the streamed bytearray plus its final ``bytes`` copy: about 2).
    - ``decode_scratch_factor``: decoder scratch per decoding thread, in decoded-image units.
    - ``collate_copy_factor``: batches being assembled per loader worker, besides its queued ones.
    - ``pinned_copy_factor``: pinned host copies per handed-over batch when pin_memory is on.
    - ``model_input_pixels``: pixels of one image at the model's input resolution.
    - ``inference_bytes_per_input_pixel``: host bytes per model input pixel per image while a batch
      is inferred ON CPU (float32 copy, 12 B/px, plus activations); 0 host cost on CUDA.
    - ``provisional``: True until a measurement script wrote the numbers.
    """

    worker_process_bytes: int
    download_buffer_factor: float
    decode_scratch_factor: float
    collate_copy_factor: float
    pinned_copy_factor: float
    model_input_pixels: int
    inference_bytes_per_input_pixel: float
    provisional: bool
    measured_by: str
    measured_on: str
    notes: str = ""

    def __post_init__(self) -> None:
        for field_ in fields(self):
            value = getattr(self, field_.name)
            if field_.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"MemoryCalibration.{field_.name} must be a number >= 0, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryCalibration":
        """Strict: every field must be present and no other key (so the script and model agree)."""
        names = {field.name for field in fields(cls)}
        required = {field.name for field in fields(cls) if field.name != "notes"}
        missing = sorted(required - data.keys())
        unknown = sorted(data.keys() - names)
        if missing or unknown:
            raise ValueError(f"calibration keys do not match MemoryCalibration: missing {missing}, unknown {unknown}")
        return cls(**data)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_calibration(path: Optional[Path] = None) -> MemoryCalibration:
    """Read ``autotune/calibration.json`` (or ``path``); warns once per call when provisional."""
    path = DEFAULT_CALIBRATION_PATH if path is None else Path(path)
    calibration = MemoryCalibration.from_dict(json.loads(path.read_text(encoding="utf-8")))
    if calibration.provisional:
        log.debug("memory calibration %s is provisional (%s)", path, calibration.measured_by)
    return calibration


def save_calibration(calibration: MemoryCalibration, path: Optional[Path] = None) -> Path:
    """Write the calibration as JSON atomically (for the measurement script)."""
    path = DEFAULT_CALIBRATION_PATH if path is None else Path(path)
    write_json_atomically(path, calibration.as_dict())
    return path


COMPONENTS = (
    ("baseline_bytes", "baseline (model loaded)"),
    ("loader_workers_bytes", "loader worker processes"),
    ("inflight_downloads_bytes", "in-flight downloads"),
    ("decode_scratch_bytes", "decode scratch"),
    ("prefetch_queue_bytes", "batches assembling/queued"),
    ("pinned_bytes", "pinned copies"),
    ("inference_batch_bytes", "batch being inferred"),
)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes by component; ``total_bytes`` = sum of components x ``correction``."""

    baseline_bytes: int
    loader_workers_bytes: int
    inflight_downloads_bytes: int
    decode_scratch_bytes: int
    prefetch_queue_bytes: int
    pinned_bytes: int
    inference_batch_bytes: int
    total_bytes: int
    correction: float = 1.0

    @property
    def raw_total_bytes(self) -> int:
        """The sum of components before the correction (what ``CorrectionStore.update`` wants)."""
        return sum(bytes_ for _, bytes_ in self.components())

    def components(self) -> tuple[tuple[str, int], ...]:
        """(label, bytes) in table order."""
        return tuple((label, int(getattr(self, name))) for name, label in COMPONENTS)

    def table(self) -> str:
        """Fixed-width text: component, MiB, share of the uncorrected sum; then the total."""
        raw = max(1, self.raw_total_bytes)
        lines = [f"{'component':<28}{'MiB':>10}{'share':>8}"]
        for label, bytes_ in self.components():
            lines.append(f"{label:<28}{bytes_ / MiB:>10.1f}{bytes_ / raw:>8.1%}")
        lines.append(f"{f'total (x{self.correction:.2f} correction)':<28}{self.total_bytes / MiB:>10.1f}{'':>8}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def compare_table(a: MemoryEstimate, b: MemoryEstimate, names: Sequence[str] = ("a", "b")) -> str:
    """Two estimates side by side: component, then MiB and share under each name."""
    name_a, name_b = names
    raw_a, raw_b = max(1, a.raw_total_bytes), max(1, b.raw_total_bytes)
    header = f"{'component':<28}{name_a + ' MiB':>16}{'share':>8}{name_b + ' MiB':>16}{'share':>8}"
    lines = [header]
    for (label, bytes_a), (_, bytes_b) in zip(a.components(), b.components()):
        lines.append(
            f"{label:<28}{bytes_a / MiB:>16.1f}{bytes_a / raw_a:>8.1%}{bytes_b / MiB:>16.1f}{bytes_b / raw_b:>8.1%}"
        )
    lines.append(f"{'total (corrected)':<28}{a.total_bytes / MiB:>16.1f}{'':>8}{b.total_bytes / MiB:>16.1f}{'':>8}")
    return "\n".join(lines)


def predict_peak(
    plan: "LoaderPlan", probe: "Probe", calibration: MemoryCalibration, correction: float = 1.0
) -> MemoryEstimate:
    """Predicted peak of the process tree for ``plan`` on ``probe``'s images.

    ``num_workers == 0`` loads in the main process: no worker processes, no queue (the batch
    being assembled becomes the batch inferred). Queue and pinned terms count the DataLoader's
    ``prefetch_factor`` batches per worker plus ``collate_copy_factor`` batches being assembled;
    every batch-sized term is linear in ``batch_size``. float32 plans make tensors 4x larger and
    add the conversion's scratch per lane.
    pin_memory without CUDA costs nothing (torch skips pinning without an accelerator).
    """
    workers = plan.num_workers
    lanes = max(1, workers)
    tensor_bytes = probe.decoded_bytes_per_image * (BYTES_PER_FLOAT32 if plan.tensor_dtype == "float32" else 1)
    batch_bytes = tensor_bytes * plan.batch_size
    connections = min(plan.download_threads, plan.tasks_per_reserve)
    queued_batches = workers * plan.prefetch_factor
    components = (
        probe.baseline_bytes,
        workers * probe.worker_process_bytes,
        lanes * connections * probe.max_jpeg_bytes * calibration.download_buffer_factor,
        lanes * probe.decoded_bytes_per_image * (calibration.decode_scratch_factor + _conversion_scratch(plan)),
        workers * (plan.prefetch_factor + calibration.collate_copy_factor) * batch_bytes,
        (queued_batches + 1) * batch_bytes * calibration.pinned_copy_factor if plan.pin_memory and probe.cuda else 0,
        batch_bytes + _host_inference_bytes(plan, probe, calibration),
    )
    ints = tuple(int(round(value)) for value in components)
    return MemoryEstimate(*ints, total_bytes=int(round(sum(ints) * correction)), correction=correction)


def _conversion_scratch(plan: "LoaderPlan") -> float:
    """Decoded-image units a lane holds while converting to float32 (ADC's legacy ingest).

    ``worker/ingest.py`` keeps the uint8 decode (1) and the private float copy (4) alive while
    ``share_memory_()`` copies the float into shared memory; the shared copy is the queued tensor.
    """
    return 1.0 + BYTES_PER_FLOAT32 if plan.tensor_dtype == "float32" else 0.0


def _host_inference_bytes(plan: "LoaderPlan", probe: "Probe", calibration: MemoryCalibration) -> float:
    """On CPU the float copy and activations are host memory; on CUDA they live on the device.

    Pipelines split an ingest batch into forward batches of ``probe.forward_batch_size`` images
    (AMI_LOCALIZATION_BATCH_SIZE for the built-in ones): activations scale with that, not more.
    """
    if probe.cuda:
        return 0.0
    images = plan.batch_size if probe.forward_batch_size <= 0 else min(plan.batch_size, probe.forward_batch_size)
    return images * calibration.model_input_pixels * calibration.inference_bytes_per_input_pixel


class CorrectionStore:
    """Per-pipeline correction factor (observed / predicted peak), learned after each job.

    Persisted as JSON ``{"pipelines": {slug: {"correction": f, "jobs": n}}}``, written atomically
    (tmp + rename). The first job of a pipeline sets the factor; later ones move it by an
    exponential moving average with weight ``alpha``. Factors are clamped to [0.5, 3.0]. Two
    processes updating the same file concurrently: the last writer wins (one job's lesson lost).
    """

    def __init__(self, path: Path, alpha: float = 0.3) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"CorrectionStore alpha must be in (0, 1], got {alpha}")
        self.path = Path(path)
        self.alpha = alpha

    def get(self, pipeline_slug: str) -> float:
        """The learned factor, 1.0 for a pipeline never seen (or an unreadable file)."""
        entry = self._read().get(pipeline_slug)
        return float(entry["correction"]) if entry else 1.0

    def jobs(self, pipeline_slug: str) -> int:
        entry = self._read().get(pipeline_slug)
        return int(entry["jobs"]) if entry else 0

    def update(self, pipeline_slug: str, predicted_bytes: int, observed_bytes: int) -> float:
        """Fold one job in and return the new factor.

        ``predicted_bytes`` must be the UNcorrected prediction (``MemoryEstimate.raw_total_bytes``):
        the ratio observed/predicted then estimates the factor itself. Non-positive inputs are
        ignored (the current factor is returned).
        """
        pipelines = self._read()
        entry = pipelines.get(pipeline_slug)
        if predicted_bytes <= 0 or observed_bytes <= 0:
            log.warning("correction for %s not updated: predicted %d, observed %d bytes",
                        pipeline_slug, predicted_bytes, observed_bytes)
            return float(entry["correction"]) if entry else 1.0
        ratio = observed_bytes / predicted_bytes
        old = float(entry["correction"]) if entry else None
        new = ratio if old is None else (1.0 - self.alpha) * old + self.alpha * ratio
        new = min(CORRECTION_MAX, max(CORRECTION_MIN, new))
        pipelines[pipeline_slug] = {"correction": new, "jobs": (int(entry["jobs"]) if entry else 0) + 1}
        write_json_atomically(self.path, {"pipelines": pipelines})
        log.info("memory correction for %s: observed/predicted %.3f (%d / %d bytes), factor %s -> %.3f",
                 pipeline_slug, ratio, observed_bytes, predicted_bytes,
                 "none" if old is None else f"{old:.3f}", new)
        return new

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            pipelines = data["pipelines"]
            if not isinstance(pipelines, dict):
                raise TypeError("pipelines is not an object")
            return pipelines
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as error:
            log.warning("correction store %s unreadable (%s): starting from 1.0", self.path, error)
            return {}


def default_correction_path(user_data_path: Path) -> Path:
    """Where the worker keeps the store: ``$AMI_USER_DATA_PATH/autotune/memory_corrections.json``."""
    return Path(user_data_path) / "autotune" / "memory_corrections.json"


def write_json_atomically(path: Path, data: object) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomically(path: Path, text: str) -> None:
    path = Path(path)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
