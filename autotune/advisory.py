"""After each job: a memory advisory, in the style of a sweep's memory advisory.

Pre-run: the limit, the reserve, what is usable, the safety factor and the planning budget.
Post-run: end-of-batch memory (mean, median, P95, max), the peak, and how the prediction fared.
Recommendations size plans from the OBSERVED peak: each alternative's predicted peak is scaled by
this job's observed/predicted ratio and by a safety factor (aggressive 1.1, conservative 1.5);
the fastest alternative whose scaled peak fits the usable memory is recommended. The memory the
job's own plan would need at that safety is given too (``recommended_limit_bytes``).
"""
from __future__ import annotations

import json
import logging
import re
import statistics
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from autotune.files import write_text_atomically
from autotune.plan import MINIMAL_PLAN, LoaderPlan
from autotune.planner import PlanOption

log = logging.getLogger(__name__)

MiB = 1024 * 1024
AGGRESSIVE_SAFETY = 1.1
CONSERVATIVE_SAFETY = 1.5


@dataclass(frozen=True)
class MemoryStats:
    """End-of-batch memory samples, bytes. P95 interpolates linearly between ranks (numpy's default)."""

    count: int
    mean_bytes: float
    median_bytes: float
    p95_bytes: float
    max_bytes: int

    @classmethod
    def of(cls, samples_bytes: Sequence[int]) -> Optional["MemoryStats"]:
        """None for no samples."""
        if not samples_bytes:
            return None
        values = [int(v) for v in samples_bytes]
        p95 = float(values[0]) if len(values) == 1 else statistics.quantiles(values, n=20, method="inclusive")[18]
        return cls(len(values), statistics.fmean(values), float(statistics.median(values)), p95, max(values))


@dataclass(frozen=True)
class Recommendation:
    """A plan sized from the observed peak with ``safety_factor``.

    ``required_bytes`` = the plan's predicted peak x observed/predicted x safety; ``fits`` says
    whether that is within the usable memory (when nothing fits, ``plan`` is the minimal plan).
    ``recommended_limit_bytes`` = the job's observed peak x safety + reserve: the limit under
    which the job's OWN plan would have had this margin.
    """

    label: str
    safety_factor: float
    plan: LoaderPlan
    required_bytes: int
    predicted_images_per_s: float
    fits: bool
    recommended_limit_bytes: int


@dataclass(frozen=True)
class Advisory:
    """One job's memory advisory; ``text()`` for people, ``as_dict()`` / ``to_json()`` for tools."""

    pipeline_slug: str
    job_id: int
    created_at: str
    limit_bytes: int
    reserve_bytes: int
    usable_bytes: int
    safety_factor: float
    budget_bytes: int
    plan: LoaderPlan
    predicted_bytes: int
    peak_bytes: int
    observed_over_predicted: float
    end_of_batch: Optional[MemoryStats]
    aggressive: Recommendation
    conservative: Recommendation

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n"

    def text(self) -> str:
        lines = [
            f"Memory advisory: pipeline {self.pipeline_slug}, job {self.job_id} ({self.created_at})",
            "",
            "Pre-run",
            f"  limit            {_mib(self.limit_bytes)}",
            f"  reserve          {_mib(self.reserve_bytes)}",
            f"  usable           {_mib(self.usable_bytes)} (limit - reserve)",
            f"  safety factor    {self.safety_factor:.2f}",
            f"  planning budget  {_mib(self.budget_bytes)} (usable x safety)",
            f"  plan             {self.plan.describe()}",
            f"  predicted peak   {_mib(self.predicted_bytes)}",
            "",
            "Post-run",
        ]
        lines.extend(_stats_lines(self.end_of_batch))
        lines.extend([
            f"  peak             {_mib(self.peak_bytes)} ({self.peak_bytes / max(1, self.usable_bytes):.0%} of usable)",
            f"  obs/predicted    {self.observed_over_predicted:.2f} (peak / predicted peak)",
            "",
            "Recommended plan",
        ])
        for recommendation in (self.aggressive, self.conservative):
            lines.extend(_recommendation_lines(recommendation))
        return "\n".join(lines) + "\n"


def build_advisory(
    pipeline_slug: str,
    job_id: int,
    *,
    limit_bytes: int,
    reserve_bytes: int,
    safety_factor: float,
    memory_samples_bytes: Sequence[int],
    peak_bytes: int,
    predicted_bytes: int,
    plan: LoaderPlan,
    alternatives: Sequence[PlanOption],
    created_at: Optional[datetime] = None,
) -> Advisory:
    """Build the advisory. ``memory_samples_bytes``: process-tree bytes at the end of each batch.

    ``peak_bytes`` is the sampled peak (raised to the largest end-of-batch sample if lower).
    ``predicted_bytes`` and the alternatives' peaks must use the same correction (both corrected
    or both raw): only their ratio to the observed peak matters. ``usable = limit - reserve``.
    """
    usable_bytes = max(0, limit_bytes - reserve_bytes)
    peak_bytes = max([int(peak_bytes), *[int(v) for v in memory_samples_bytes]])
    ratio = peak_bytes / predicted_bytes if predicted_bytes > 0 else 1.0
    created = (created_at or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    recommend = [
        _recommend(label, safety, alternatives, ratio, usable_bytes, peak_bytes, reserve_bytes)
        for label, safety in (("aggressive", AGGRESSIVE_SAFETY), ("conservative", CONSERVATIVE_SAFETY))
    ]
    advisory = Advisory(
        pipeline_slug, job_id, created, int(limit_bytes), int(reserve_bytes), usable_bytes, float(safety_factor),
        max(0, int(usable_bytes * safety_factor)), plan, int(predicted_bytes), peak_bytes, ratio,
        MemoryStats.of(memory_samples_bytes), recommend[0], recommend[1],
    )
    log.info("job %d (%s): peak %.0f MiB, predicted %.0f MiB (x%.2f); conservative plan: %s",
             job_id, pipeline_slug, peak_bytes / MiB, predicted_bytes / MiB, ratio, recommend[1].plan.describe())
    return advisory


def write_advisory(advisory: Advisory, directory: Path) -> Path:
    """Write ``<stem>.json`` and ``<stem>.txt`` into ``directory`` atomically; return the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = re.sub(r"[^0-9T]", "", advisory.created_at[:19])  # YYYYMMDDTHHMMSS, offset dropped
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", advisory.pipeline_slug)
    stem = f"memory-advisory_{slug}_job-{advisory.job_id}_{stamp}"
    json_path = directory / f"{stem}.json"
    write_text_atomically(json_path, advisory.to_json())
    write_text_atomically(directory / f"{stem}.txt", advisory.text())
    return json_path


def _recommend(
    label: str, safety: float, alternatives: Sequence[PlanOption], ratio: float,
    usable_bytes: int, peak_bytes: int, reserve_bytes: int,
) -> Recommendation:
    """Fastest alternative whose scaled peak fits usable memory; ties to the smaller requirement."""
    limit_bytes = int(peak_bytes * safety) + reserve_bytes
    sized = [(option, int(option.predicted_peak_bytes * ratio * safety)) for option in alternatives]
    fitting = [(option, need) for option, need in sized if need <= usable_bytes]
    if not fitting:
        smallest = min((need for _, need in sized), default=0)
        return Recommendation(label, safety, MINIMAL_PLAN, smallest, 0.0, False, limit_bytes)
    option, need = max(fitting, key=lambda item: (item[0].predicted_images_per_s, -item[1]))
    return Recommendation(label, safety, option.plan, need, option.predicted_images_per_s, True, limit_bytes)


def _stats_lines(stats: Optional[MemoryStats]) -> list[str]:
    if stats is None:
        return ["  end-of-batch     no samples"]
    return [
        f"  end-of-batch     {stats.count} samples",
        f"    mean           {_mib(stats.mean_bytes)}",
        f"    median         {_mib(stats.median_bytes)}",
        f"    P95            {_mib(stats.p95_bytes)}",
        f"    max            {_mib(stats.max_bytes)}",
    ]


def _recommendation_lines(recommendation: Recommendation) -> list[str]:
    head = f"  {recommendation.label} (x{recommendation.safety_factor:.1f} on the observed peak)"
    if not recommendation.fits:
        return [
            head,
            f"    nothing fits the usable memory: smallest alternative needs {_mib(recommendation.required_bytes)};"
            f" use {recommendation.plan.describe()} and raise the limit",
            f"    this job's plan would want a limit of {_mib(recommendation.recommended_limit_bytes)}",
        ]
    return [
        head,
        f"    plan           {recommendation.plan.describe()}",
        f"    needs          {_mib(recommendation.required_bytes)}, predicted {recommendation.predicted_images_per_s:.2f} images/s",
        f"    this job's plan would want a limit of {_mib(recommendation.recommended_limit_bytes)}",
    ]


def _mib(value: float) -> str:
    return f"{value / MiB:,.0f} MiB"
