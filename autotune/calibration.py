"""The memory model's machine-measured constants: ``MemoryCalibration`` and its file,
``autotune/calibration.json`` (written by ``benchmarks/calibrate_memory.py``)."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from autotune.files import write_json_atomically

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION_PATH = Path(__file__).with_name("calibration.json")


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
