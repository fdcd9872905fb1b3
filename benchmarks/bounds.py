"""The two physical bounds a workload is measured against: the CPUs' decode rate and the link.

    python -m benchmarks.bounds download URLS_FILE --threads 64   # one plain-downloader run, JSON out

decode bound: cores x the single-core decode rate of the job's images (each distinct image decoded
once in this process, the way the loader decodes them). No loader can decode faster.

link bound: a plain many-connection downloader, nothing but ``requests`` sessions on ``threads``
threads pulling every image of the job once from the same server, under the same shaping, in a
process of its own (so the benchmark's server thread does not share its interpreter lock). It
reads each body whole and keeps none. What it reaches is what the link (latency, per-connection
bandwidth, the server) allows at that many connections; the worker also spends its CPU on
decoding, this downloader does not.

together: threads that download each image with the worker's own call (``worker.imaging.download``,
an image session each) and decode it as it arrives (``decode``, the decode bound's call), in one
process per core with the threads split between them, all started at one instant: what the link
and the CPUs give at once to the worker's per-image work with nothing around it, no loader, no
queues, no results. (The plain downloader's ``response.content`` costs this host about three times
the CPU per image of the worker's reads, ``benchmarks/server_cost.py`` against
``benchmarks/download_cost.py``, so it would understate this.) On a host where the image server shares the cores (the benchmarks' local server) the
decode bound and the link bound cannot both be had: each is measured with the other idle.

    python -m benchmarks.bounds download URLS_FILE --threads 32 --decode --start-at EPOCH_S
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
LINK_THREADS = 64
LINK_TIMEOUT_S = 600
TOGETHER_IMPORT_S = 8.0  # a child's interpreter start and imports (torch, through worker.imaging), with margin


def decode_bound(paths: Sequence[Path], cores: int) -> tuple[float, float]:
    """(cores x single-core images/s, single-core images/s): every distinct image of the job
    decoded once, after one untimed warm-up decode; the single-core rate is images over their
    summed seconds, the rate a core decoding this job's images back to back reaches. (A median of
    the first five moved the bound from 59 to 89 images/s between workloads of the same images:
    decode time varies image to image, and the first decodes of a process run cold.)"""
    from worker.imaging import decode

    distinct = list(dict.fromkeys(Path(path) for path in paths))
    decode(bytearray(distinct[0].read_bytes()), max_pixels=80_000_000)
    total_s = 0.0
    for path in distinct:
        data = bytearray(path.read_bytes())
        started_s = time.perf_counter()
        decode(data, max_pixels=80_000_000)
        total_s += time.perf_counter() - started_s
    single = len(distinct) / total_s
    return cores * single, single


def link_bound(urls: Sequence[str], threads: int = LINK_THREADS) -> dict[str, float]:
    """Run the plain downloader in a subprocess over ``urls``; its JSON figures (images_per_s...)."""
    with tempfile.NamedTemporaryFile("w", suffix=".urls", delete=False) as handle:
        handle.write("\n".join(urls))
        listing = handle.name
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks.bounds", "download", listing, "--threads", str(threads)],
            cwd=ROOT, capture_output=True, text=True, timeout=LINK_TIMEOUT_S, check=True,
        )
    finally:
        os.unlink(listing)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def together_bound(urls: Sequence[str], threads: int = LINK_THREADS,
                   processes: Optional[int] = None) -> dict[str, float]:
    """Download and decode every URL once: ``processes`` downloaders (default: one per core) with
    ``--decode``, each on its share of the URLs and of the threads, started at one instant; the
    figures summed, images/s over the start to the last one's end."""
    processes = processes or os.cpu_count() or 1
    listings = []
    for index in range(processes):
        with tempfile.NamedTemporaryFile("w", suffix=".urls", delete=False) as handle:
            handle.write("\n".join(urls[index::processes]))
            listings.append(handle.name)
    start_at_s = time.time() + TOGETHER_IMPORT_S  # every child has imported and waits for it
    try:
        children = [subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bounds", "download", listing, "--threads",
             str(max(1, threads // processes)), "--decode", "--start-at", f"{start_at_s:.3f}"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True) for listing in listings]
        outputs = [child.communicate(timeout=LINK_TIMEOUT_S)[0] for child in children]
    finally:
        for listing in listings:
            os.unlink(listing)
    if any(child.returncode for child in children):
        raise RuntimeError(f"a together downloader failed: exit codes {[c.returncode for c in children]}")
    parts = [json.loads(output.strip().splitlines()[-1]) for output in outputs]
    late_s = max(part["started_at_s"] for part in parts) - start_at_s
    wall_s = max(part["ended_at_s"] for part in parts) - start_at_s
    images = sum(part["images"] for part in parts)
    return {"threads": threads, "processes": processes, "images": images,
            "failures": sum(part["failures"] for part in parts), "wall_s": wall_s, "late_start_s": late_s,
            "images_per_s": images / wall_s if wall_s > 0 else 0.0}


def download_all(urls: Sequence[str], threads: int, *, decode: bool = False,
                 start_at_s: Optional[float] = None) -> dict[str, float]:
    """Download every URL once on ``threads`` threads (a session each); images/s over the whole run.
    ``decode``: each image is fetched with the worker's download call and decoded as it arrives.
    ``start_at_s``: wait until that wall-clock time."""
    import requests

    if decode:  # before the start: the import of torch is no part of the run
        from worker.imaging import decode as decoder
        from worker.imaging import download, image_session

    todo: "queue.Queue[str]" = queue.Queue()
    for url in urls:
        todo.put(url)
    sizes: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        with (image_session(1) if decode else requests.Session()) as session:
            while True:
                try:
                    url = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    if decode:
                        body = download(session, url, max_bytes=1 << 30, timeout_s=120)
                        size = len(body)
                        decoder(body, max_pixels=80_000_000)
                        del body
                    else:
                        response = session.get(url, timeout=120)
                        response.raise_for_status()
                        size = len(response.content)
                except Exception as error:  # counted, reported: a bound with failures is no bound
                    with lock:
                        failures.append(f"{url}: {error}")
                    continue
                with lock:
                    sizes.append(size)

    if start_at_s is not None:
        time.sleep(max(0.0, start_at_s - time.time()))
    started_at_s, started_s = time.time(), time.monotonic()
    workers = [threading.Thread(target=run, daemon=True) for _ in range(min(threads, len(urls)))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall_s = time.monotonic() - started_s
    return {"threads": threads, "images": len(sizes), "failures": len(failures), "wall_s": wall_s,
            "images_per_s": len(sizes) / wall_s if wall_s > 0 else 0.0,
            "bytes_per_s": sum(sizes) / wall_s if wall_s > 0 else 0.0,
            "started_at_s": started_at_s, "ended_at_s": started_at_s + wall_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="download every URL in a file (one per line) once")
    download.add_argument("urls", type=Path)
    download.add_argument("--threads", type=int, default=LINK_THREADS)
    download.add_argument("--decode", action="store_true", help="decode each body as it arrives")
    download.add_argument("--start-at", type=float, default=None, metavar="EPOCH_S",
                          help="start the downloads at this wall-clock time (after the imports)")
    args = parser.parse_args()
    urls = [line.strip() for line in args.urls.read_text().splitlines() if line.strip()]
    print(json.dumps(download_all(urls, args.threads, decode=args.decode, start_at_s=args.start_at)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
