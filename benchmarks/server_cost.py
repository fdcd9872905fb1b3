"""What serving an image costs the benchmarks' local server, and what receiving it costs a client.

    python benchmarks/server_cost.py                      # small images, loopback, 2 connections
    python benchmarks/server_cost.py --threads 64 --latency-s 0.3 --bandwidth 5e6
    python benchmarks/server_cost.py --preset large --images 60 --threads 8

The local server (``worker.testing.antenna_server.LocalAntenna``) runs in this process, under the
given shaping; the plain downloader of ``benchmarks/bounds.py`` (``link_bound``) pulls every image once (each
distinct image served twice) in a process of its own. Printed: the downloader's images/s, this
process's CPU per image (the server: on loopback the kernel's receive path runs in the sender's
context, so it is counted here too) and the downloader's (its interpreter's start included). In
the benchmarks both run on the worker's cores: ``benchmarks/run.py`` records the server's and the
meter's share of each job.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bounds import link_bound  # noqa: E402
from worker.testing.antenna_server import LocalAntenna  # noqa: E402
from worker.testing.synthetic import default_cache_dir, generate_preset  # noqa: E402


def cpu_s(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def measure(preset: str, images: int, threads: int, latency_s: float, bandwidth: float | None) -> dict[str, float]:
    files = generate_preset(default_cache_dir(), preset, images, seed=0)
    with LocalAntenna(token="server-cost") as server:
        server.set_network(latency_s=latency_s, bandwidth_bytes_per_s=bandwidth)
        job_id = server.add_job(files * 2, "null")
        server_before, client_before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        figures = link_bound(server.image_urls(job_id), threads)
        server_after, client_after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    count = max(1, int(figures["images"]))
    return {"images": count, "failures": figures["failures"], "images_per_s": figures["images_per_s"],
            "server_ms_per_image": 1000 * (cpu_s(server_after) - cpu_s(server_before)) / count,
            "client_ms_per_image": 1000 * (cpu_s(client_after) - cpu_s(client_before)) / count}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--images", type=int, default=200, help="distinct images (each served twice)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes/s per connection (default unshaped)")
    args = parser.parse_args(argv)
    figures = measure(args.preset, args.images, args.threads, args.latency_s, args.bandwidth)
    print(f"{args.preset}, {args.threads} connections, latency {args.latency_s:g} s, "
          f"{'unshaped' if args.bandwidth is None else f'{args.bandwidth:g} B/s per connection'}: "
          f"{figures['images_per_s']:.1f} images/s, server {figures['server_ms_per_image']:.2f} ms CPU per image, "
          f"client {figures['client_ms_per_image']:.2f} ms ({figures['images']} images, {figures['failures']} failures)")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
