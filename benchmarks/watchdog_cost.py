"""What the watchdog costs, measured on a real worker tree.

    python -m benchmarks.watchdog_cost [--images 160] [--interval-s 0.25] [--loader-workers 2]

Runs one in-process ``Worker`` (the default middleware stack's ``WatchdogMiddleware``, its real
sampler thread) against the local Antenna server on a job of small (~1.5 MB, 2048x1536) images
with 2 loader workers, and reports the sampler thread's CPU time (reads plus every listener,
the governor included) as a fraction of one core over the job's wall time. The worker tree is
the daemon, its loader worker processes and multiprocessing's resource tracker.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from watchdog.limits import MIB
from watchdog.sampler import MemorySnapshot
from worker.testing.antenna_server import LocalAntenna
from worker.app import build_worker
from worker.middleware.watchdog import WatchdogMiddleware
from worker.hooks import Middleware
from worker.settings import load_settings
from worker.testing.synthetic import default_cache_dir, generate_preset

TOKEN = "watchdog-cost-benchmark"


class ListenerClock(Middleware):
    """Wraps every sample listener so its CPU time (on the sampler thread) is counted."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self.calls = 0
        self.process_counts: list[int] = []

    def on_start(self, worker) -> None:
        def timed(listener):
            def run(snapshot: MemorySnapshot) -> None:
                started_s = time.thread_time()
                try:
                    listener(snapshot)
                finally:
                    self.cpu_s += time.thread_time() - started_s
                    self.calls += 1
                    self.process_counts.append(snapshot.process_count)
            return run

        worker._sample_listeners[:] = [timed(listener) for listener in worker._sample_listeners]


def measure(images: int, interval_s: float, loader_workers: int) -> dict[str, float]:
    small = generate_preset(default_cache_dir(), "small", 16, seed=7)
    job_images = [dataclasses.replace(small[n % 16], image_id=f"{small[n % 16].image_id}-{n}") for n in range(images)]
    with LocalAntenna(token=TOKEN) as server, tempfile.TemporaryDirectory(prefix="watchdog-cost-") as scratch:
        server.add_job(job_images, "synthetic-moths")
        settings = load_settings(
            env_file=None, antenna_api_base_url=server.base_url, antenna_api_auth_token=TOKEN,
            user_data_path=Path(scratch), metrics_addr="", autotune=False, watchdog_enabled=True,
            watchdog_interval_s=interval_s, antenna_api_batch_size=4, antenna_api_dataloader_num_workers=loader_workers,
            antenna_pipelines="synthetic-moths", antenna_idle_sleep_seconds=0.05,
        )
        clock = ListenerClock()
        guard = WatchdogMiddleware(settings)
        worker = build_worker(settings, burst=True, middlewares=[guard, clock])
        started_s = time.monotonic()
        worker.run()
        wall_s = time.monotonic() - started_s
        report = server.report(1)
    sampler = worker.sampler
    total_cpu_s = sampler.cpu_seconds + clock.cpu_s
    return {
        "images": report.results_ok, "wall_s": wall_s, "interval_s": interval_s, "samples": sampler.samples_taken,
        "max_processes": max(clock.process_counts, default=0), "read_cpu_s": sampler.cpu_seconds,
        "deep_passes": sampler.meter.deep_passes, "deep_cpu_s": sampler.meter.deep_cpu_seconds,
        "listener_cpu_s": clock.cpu_s, "cpu_fraction": total_cpu_s / wall_s,
        "peak_used_mib": sampler.peak_used_bytes / MIB, "cgroup_owned": float(sampler.meter._cgroup is not None),
        "decisions": float(len(guard.decisions)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.watchdog_cost")
    parser.add_argument("--images", type=int, default=160, help="small images in the job (default 160)")
    parser.add_argument("--interval-s", type=float, default=0.25, help="AMI_WATCHDOG_INTERVAL_S (default 0.25)")
    parser.add_argument("--loader-workers", type=int, default=2)
    args = parser.parse_args()
    result = measure(args.images, args.interval_s, args.loader_workers)
    light_s = result["read_cpu_s"] - result["deep_cpu_s"]
    print(
        f"watchdog cost {result['cpu_fraction']:.3%} of one core at {args.interval_s * 1000:.0f} ms over "
        f"{result['wall_s']:.1f} s ({result['images']} images, up to {result['max_processes']} processes, "
        f"peak {result['peak_used_mib']:.0f} MiB, cgroup owned: {bool(result['cgroup_owned'])}): "
        f"{result['samples']} samples, reads {result['read_cpu_s'] * 1000:.0f} ms "
        f"({result['deep_passes']} deep passes {result['deep_cpu_s'] * 1000:.0f} ms, others "
        f"{light_s * 1000 / max(1, result['samples'] - result['deep_passes']):.2f} ms each), listeners "
        f"{result['listener_cpu_s'] * 1000:.0f} ms, {result['decisions']:.0f} governor decisions"
    )


if __name__ == "__main__":
    main()
