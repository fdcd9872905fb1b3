"""Per-pipeline memory corrections learned after each job (observed / predicted peak)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from autotune.files import write_json_atomically

log = logging.getLogger(__name__)

CORRECTION_MIN = 0.5
CORRECTION_MAX = 3.0


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

        ``predicted_bytes`` must be the UNcorrected prediction (``MemoryEstimate.raw_job_peak_bytes``):
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
