"""``worker demo``: the whole product in one command, over loopback.

Generates a mixed dataset (small ~1.5 MB and large ~24 MB 4096x3072 JPEGs), starts the local
Antenna server in this process (strict: it saves only results of registered pipelines, as Antenna),
runs ``worker register`` and then ``worker run --burst`` as child processes against it, samples the
worker's process-tree memory (PSS) from outside, and prints a summary. Exits 0 only if every task
got a saved result and none was lost.
"""
from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from watchdog.sampler import Sampler
from worker.testing.antenna_server import LocalAntenna
from worker.pipelines import ReferencePipeline
from worker.testing.synthetic import SyntheticImage, default_cache_dir, generate_preset, with_integer_ids
from worker.settings import SettingsError

log = logging.getLogger(__name__)
MIB = 1024 * 1024


@dataclass(frozen=True)
class DemoSummary:
    images: int
    small: int
    large: int
    worker_wall_s: float
    peak_tree_pss_bytes: int
    results_ok: int
    results_error: int
    redeliveries: int
    lost: int
    unsaved: int
    specimens: int
    specimens_found: int
    worker_exit_code: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.worker_wall_s if self.worker_wall_s > 0 else 0.0

    @property
    def passed(self) -> bool:
        return (self.worker_exit_code == 0 and self.lost == 0 and self.unsaved == 0
                and self.results_ok + self.results_error == self.images)

    def text(self) -> str:
        recall = self.specimens_found / self.specimens if self.specimens else 0.0
        rows = [
            ("images", f"{self.images} ({self.small} small ~1.5 MB, {self.large} large ~24 MB 4096x3072)"),
            ("worker wall time", f"{self.worker_wall_s:.1f} s (process start, model load and spawn included)"),
            ("images/s", f"{self.images_per_s:.2f}"),
            ("peak process-tree memory", f"{self.peak_tree_pss_bytes / MIB:.0f} MiB (PSS, worker + loader workers)"),
            ("results saved", f"{self.results_ok + self.results_error} ({self.results_ok} ok, {self.results_error} error)"),
            ("results not saved", str(self.unsaved)),
            ("redeliveries", str(self.redeliveries)),
            ("lost", str(self.lost)),
            ("specimens found", f"{self.specimens_found}/{self.specimens} at IoU >= 0.5 ({recall:.0%})"),
            ("verdict", "PASS" if self.passed else "FAIL"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(["", "worker demo summary", "-" * 19] + [f"{n:<{width}}  {v}" for n, v in rows])


def interleave(small: list[SyntheticImage], large: list[SyntheticImage]) -> list[SyntheticImage]:
    """Spread the large images evenly through the small ones, as a mixed night of captures."""
    if not large:
        return list(small)
    mixed: list[SyntheticImage] = []
    step = max(1, len(small) // len(large))
    pending = list(large)
    for index, image in enumerate(small):
        if index % step == 0 and pending:
            mixed.append(pending.pop(0))
        mixed.append(image)
    return mixed + pending


def run_demo(*, small: int = 24, large: int = 8, data_dir: Optional[str] = None,
             extra_env: Optional[dict[str, str]] = None) -> int:
    if small < 0 or large < 0 or small + large == 0:
        raise SettingsError(f"--small {small} --large {large}: the demo needs at least one image, and no "
                            "negative count")
    cache = Path(data_dir) if data_dir else default_cache_dir()
    log.info("generating %d small and %d large images in %s (cached across runs)", small, large, cache)
    # Integer ids, as Antenna's source images have: its save refuses any other.
    images = with_integer_ids(interleave(generate_preset(cache, "small", small, seed=0),
                                         generate_preset(cache, "large", large, seed=0)))
    token = secrets.token_hex(16)
    with LocalAntenna(token=token, require_registration=True) as server, \
            tempfile.TemporaryDirectory(prefix="worker-demo-") as scratch:
        job_id = server.add_job(images, ReferencePipeline.slug)
        env = demo_env(server.base_url, token, Path(scratch), extra_env or {})
        exit_code = run_register_process(env)
        wall_s, peak_bytes = 0.0, 0
        if exit_code == 0:
            exit_code, wall_s, peak_bytes = run_worker_process(env)
        report = server.report(job_id)
        found, total = score_detections(images, server.result_posts)
    summary = DemoSummary(
        images=len(images), small=small, large=large, worker_wall_s=wall_s, peak_tree_pss_bytes=peak_bytes,
        results_ok=report.results_ok, results_error=report.results_error, redeliveries=report.redeliveries,
        lost=report.lost, unsaved=report.results_unsaved, specimens=total, specimens_found=found, worker_exit_code=exit_code,
    )
    print(summary.text(), flush=True)
    if summary.passed:
        return 0
    return 2 if exit_code == 2 else 1  # 2: a bad setting (an --env value), which the worker said in one line


def demo_env(base_url: str, token: str, scratch: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("AMI_")}
    env.update({
        "AMI_ANTENNA_API_BASE_URL": base_url,
        "AMI_ANTENNA_API_AUTH_TOKEN": token,
        "AMI_USER_DATA_PATH": str(scratch / "user-data"),
        "AMI_ANTENNA_PIPELINES": ReferencePipeline.slug,
        "AMI_METRICS_ADDR": "",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def run_register_process(env: dict[str, str]) -> int:
    """Run ``worker register``, as an operator does before the first job; returns its exit code."""
    command = [sys.executable, "-m", "worker.cli", "--env-file", os.devnull, "register"]
    return subprocess.run(command, env=env).returncode


def run_worker_process(env: dict[str, str]) -> tuple[int, float, int]:
    """Run ``worker run --burst``; returns (exit code, wall seconds, peak tree PSS bytes)."""
    command = [sys.executable, "-m", "worker.cli", "--env-file", os.devnull, "run", "--burst"]
    started_s = time.monotonic()
    process = subprocess.Popen(command, env=env)
    # Every read deep (exact PSS): this sampler runs outside the worker, so its cost is ours.
    sampler = Sampler(process.pid, interval_s=0.1, deep_budget_fraction=None)
    sampler.start()
    try:
        exit_code = process.wait()
    finally:
        sampler.stop()
    return exit_code, time.monotonic() - started_s, sampler.peak_used_bytes


def score_detections(images: list[SyntheticImage], posts: list[dict]) -> tuple[int, int]:
    """Ground-truth specimens matched by a posted detection at IoU >= 0.5: (found, total)."""
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    for post in posts:
        for item in post.get("results", []):
            result = item.get("result", {})
            for detection in result.get("detections") or []:
                b = detection["bbox"]
                boxes.setdefault(detection["source_image_id"], []).append((b["x1"], b["y1"], b["x2"], b["y2"]))
    found = total = 0
    for image in images:
        for truth in image.boxes:
            total += 1
            found += any(iou(truth, box) >= 0.5 for box in boxes.get(image.image_id, []))
    return found, total


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
