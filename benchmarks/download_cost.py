"""What downloading an image body costs the client: CPU per image and memory per download in
flight (docs/benchmarks.md, "Receiving a body").

    python benchmarks/download_cost.py                      # the worker's reads against the copied ones
    python benchmarks/download_cost.py --reads worker,copied,growing,worker-1m --links far,far-large

Images of the synthetic presets are served by the local server in a process of its own: the small
preset (2048x1536, about 1 MB) on a far link (300 ms before each response, 5 MB/s per connection,
32 threads) and on plain loopback (2 threads); the large one (4096x3072, about 23 MB) on a
100 ms, 10 MB/s link (8 threads). Every image is downloaded once by ``threads`` threads of this
process, each with its own image session. Figures, per read mode:

- client CPU: this process's user+system CPU per image (the server's is its own process's);
- memory per download in flight: the peak of this process's PSS over its PSS before the threads
  started, divided by the threads (sampled every 0.1 s on a run of its own: sampling costs CPU).
  Far links only.

Read modes: ``worker`` is ``worker.imaging.download`` as it is (a declared body read straight into
its buffer); ``copied`` the same with each read copied in through urllib3's ``read1`` (what it did
before); ``worker-1m`` copied reads of 1 MiB; ``growing`` the loop before that: 1 MiB reads
appended to a bytearray that grows as they arrive.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import worker.imaging as imaging  # noqa: E402
from benchmarks.meter import read_process_memory  # noqa: E402

# latency s, bytes/s per connection, threads, preset, distinct images, downloads
LINKS = {"far": (0.3, 5e6, 32, "small", 200, 400), "loopback": (0.0, None, 2, "small", 200, 400),
         "far-large": (0.1, 10e6, 8, "large", 60, 60)}


def _serve(conn, latency_s: float, bandwidth: float | None, preset: str, distinct: int, count: int) -> None:
    from worker.testing.antenna_server import LocalAntenna
    from worker.testing.synthetic import default_cache_dir, generate_preset

    images = generate_preset(default_cache_dir(), preset, distinct, seed=0)
    with LocalAntenna(token="download-cost") as server:
        server.set_network(latency_s=latency_s, bandwidth_bytes_per_s=bandwidth)
        job = server.add_job([images[i % len(images)] for i in range(count)], "null")
        conn.send(server.image_urls(job))
        conn.recv()


READ_SIZED = imaging._read_sized


def _growing(session, url: str) -> bytearray:
    """The loop ``worker.imaging.download`` used before, for comparison."""
    with session.get(url, stream=True, timeout=(30, 30)) as response:
        response.raise_for_status()
        body = bytearray()
        while chunk := response.raw.read1(1 << 20, decode_content=True):
            body += chunk
            del chunk
        return body


def _worker(session, url: str) -> bytearray:
    return imaging.download(session, url, max_bytes=1 << 26, timeout_s=30.0)


def _copied(response, url: str, length: int, started_s: float, deadline_s: float) -> bytearray:
    """``imaging._read_sized`` with every read copied in (``_read_copied``), as before."""
    body = bytearray(length)
    filled = imaging._read_copied(body, response, url, started_s, deadline_s)
    assert filled == length
    return body


def run(mode: str, link: str, sample_memory: bool) -> dict:
    latency_s, bandwidth, threads, preset, distinct, count = LINKS[link]
    fetch: Callable = _growing if mode == "growing" else _worker
    imaging.CHUNK_BYTES = (1 << 20) if mode == "worker-1m" else imaging.DOWNLOAD_READ_BYTES
    imaging._read_sized = _copied if mode in ("copied", "worker-1m") else READ_SIZED
    here, there = multiprocessing.Pipe()
    server = multiprocessing.get_context("fork").Process(
        target=_serve, args=(there, latency_s, bandwidth, preset, distinct, count))
    server.start()
    urls = here.recv()
    todo: "queue.Queue[str]" = queue.Queue()
    for url in urls:
        todo.put(url)

    def download_all() -> None:
        with imaging.image_session(1) as session:
            while True:
                try:
                    url = todo.get_nowait()
                except queue.Empty:
                    return
                body = fetch(session, url)
                assert len(body) > 0
                del body

    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], read_process_memory(os.getpid()).non_shm_pss_bytes)
            stop.wait(0.1)

    base = read_process_memory(os.getpid()).non_shm_pss_bytes
    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    workers = [threading.Thread(target=download_all) for _ in range(threads)]
    before, started_s = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    wall_s, after = time.monotonic() - started_s, resource.getrusage(resource.RUSAGE_SELF)
    stop.set()
    here.send("stop")
    server.join()
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"mode": mode, "link": link, "threads": threads, "images_per_s": len(urls) / wall_s,
            "cpu_ms_per_image": 1000 * cpu_s / len(urls),
            "mib_per_download": (peak[0] - base) / threads / 2**20 if sample_memory else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", default="worker,copied")
    parser.add_argument("--links", default="far,far-large,loopback")
    args = parser.parse_args()
    imaging.fix_mmap_threshold()  # as the worker's processes run
    print("| read | link | threads | images/s | client CPU ms/image | MiB per download in flight |")
    print("|---|---|---:|---:|---:|---:|")
    for link in args.links.split(","):
        for mode in args.reads.split(","):
            timed = run(mode, link, sample_memory=False)
            sampled = run(mode, link, sample_memory=True) if link.startswith("far") else {"mib_per_download": None}
            memory = "" if sampled["mib_per_download"] is None else f"{sampled['mib_per_download']:.2f}"
            print(f"| {mode} | {link} | {timed['threads']} | {timed['images_per_s']:.1f} | "
                  f"{timed['cpu_ms_per_image']:.2f} | {memory} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
