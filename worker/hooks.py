"""The hooks the daemon loop calls, and the per-job context they share (dramatiq-style middleware).

Policy plugs in here (autotune, watchdog, metrics, systemd notify) so the loop grows no special
cases. Every hook has a no-op default; a hook that raises is logged and does not stop the loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from autotune.plan import LoaderPlan

if TYPE_CHECKING:
    from worker.results import ImageResult
    from worker.antenna import JobRef
    from worker.daemon import Worker
    from worker.ingest import Batch, Loader


@dataclass
class JobStats:
    images_ok: int = 0
    images_failed: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    tasks_stranded: int = 0
    download_bytes: int = 0
    last_inference_s: float = 0.0
    last_inference_cpu_s: float = 0.0  # the process's CPU seconds over that batch (all threads)
    started_s: float = field(default_factory=time.monotonic)
    # Sums over the images that loaded (``timed_images``) and over batches: what the job saw, to
    # set beside what the probe measured (downloads slow down when the host is busy, say).
    timed_images: int = 0
    download_s: float = 0.0
    decode_s: float = 0.0
    inference_s: float = 0.0

    def observed(self) -> str:
        """Mean seconds per loaded image: download, decode, inference (per batch over its images)."""
        if not self.timed_images:
            return "no image loaded"
        n = self.timed_images
        return (f"per image: download {self.download_s / n:.3f} s, decode {self.decode_s / n:.4f} s, "
                f"inference {self.inference_s / max(1, self.images):.4f} s over {self.batches} batches")

    @property
    def images(self) -> int:
        return self.images_ok + self.images_failed

    def images_per_s(self) -> float:
        elapsed_s = time.monotonic() - self.started_s
        return self.images / elapsed_s if elapsed_s > 0 else 0.0


@dataclass
class JobContext:
    job: "JobRef"
    plan: LoaderPlan
    stats: JobStats = field(default_factory=JobStats)
    loader: Optional["Loader"] = None
    rebuild_requested: bool = False
    notes: dict[str, Any] = field(default_factory=dict)


class Middleware:
    """Override what you need. ``worker`` gives access to settings, client, pipeline and poster."""

    def on_start(self, worker: "Worker") -> None: ...

    def on_idle(self, worker: "Worker") -> None: ...

    def on_job_start(self, worker: "Worker", ctx: JobContext) -> None: ...

    def on_loader_start(self, worker: "Worker", ctx: JobContext) -> None: ...

    def after_batch(self, worker: "Worker", ctx: JobContext, batch: "Batch", results: "list[ImageResult]") -> None: ...

    def on_job_end(self, worker: "Worker", ctx: JobContext) -> None: ...

    def on_stop(self, worker: "Worker") -> None: ...
