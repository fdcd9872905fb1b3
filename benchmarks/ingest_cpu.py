"""Where ingest and inference CPU goes, in three measurements (docs/benchmarks.md, "Loader and
main-process CPU").

    python benchmarks/ingest_cpu.py buffers      # decode one small JPEG into four kinds of buffer
    python benchmarks/ingest_cpu.py batches      # reference pipeline: seconds per image by batch size
    python benchmarks/ingest_cpu.py jobs small '{}' '{"num_workers": 2, "batch_size": 4, ...}'
                                                 # whole jobs, CPU of every process of the worker

``buffers``: user and system milliseconds per 2048x1536 image to decode into a private tensor, a
private tensor then moved to shared memory (``share_memory_``), a fresh shared-memory segment,
and a buffer of the loader's own pool (``SharedImageBuffers``), held while four images are
queued and released after.

``batches``: the reference pipeline alone on this host, at torch's default threads, with the
``worker`` command's process defaults (``OMP_WAIT_POLICY``, ``THP_MEM_ALLOC_ENABLE``) set before
torch loads: wall and CPU seconds per image at batch 1 to 16.

``jobs``: each argument is a JSON plan for ``benchmarks.run``'s forced-plan configurations (``{}``
is autotune; ``"_env"`` adds environment variables for the worker, to compare a setting on and
off). The job runs like a benchmark run; the CPU of the worker's processes (main, fork server,
loader workers) is sampled from outside and printed with the images/s.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.cli import apply_process_defaults  # noqa: E402  (before torch loads)

apply_process_defaults()

import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import psutil  # noqa: E402
import simplejpeg  # noqa: E402
import torch  # noqa: E402

from benchmarks.meter import process_role  # noqa: E402
from worker.ingest import SharedImageBuffers, release_image  # noqa: E402
from worker.testing.synthetic import default_cache_dir, generate_preset  # noqa: E402


def _usage_ms() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime * 1000, usage.ru_stime * 1000


def buffers(count: int = 40) -> None:
    datas = [image.path.read_bytes() for image in generate_preset(default_cache_dir(), "small", count, seed=0)]

    def private(height: int, width: int) -> torch.Tensor:
        return torch.empty((height, width, 3), dtype=torch.uint8)

    def moved(height: int, width: int) -> torch.Tensor:
        return private(height, width).share_memory_()

    def fresh(height: int, width: int) -> torch.Tensor:
        storage = torch.UntypedStorage._new_shared(height * width * 3)
        return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (height, width, 3))

    # The loader's own pool: a buffer is held while "in the queue" and released after it.
    pool = SharedImageBuffers(lambda: 6)

    for name, allocate in (("private", private), ("share_memory_", moved), ("fresh shared", fresh),
                           ("reused shared", pool.allocate)):
        for attempt in (1, 2):  # the first pass warms allocators and page tables
            held: list[torch.Tensor] = []
            user0, sys0 = _usage_ms()
            for data in datas:
                height, width, _, _ = simplejpeg.decode_jpeg_header(data)
                tensor = allocate(height, width)
                simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, buffer=tensor.numpy())
                pool.hold(tensor)  # a no-op for tensors that are not the pool's
                held.append(tensor)
                for done in held[:-4]:  # a few held, as in a loader's queue
                    release_image(done)
                del held[:-4]
            user1, sys1 = _usage_ms()
            if attempt == 2:
                print(f"{name:14s} user {(user1 - user0) / len(datas):5.1f} ms  system {(sys1 - sys0) / len(datas):5.1f} ms"
                      " per image", flush=True)


def batches() -> None:
    from worker.imaging import decode
    from worker.pipelines import ReferencePipeline

    images = generate_preset(default_cache_dir(), "small", 16, seed=0)
    tensors = [decode(bytearray(image.path.read_bytes()), max_pixels=80_000_000).tensor for image in images]
    pipeline = ReferencePipeline(torch.device("cpu"))
    pipeline.infer(tensors[:1])
    print(f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")
    for batch in (1, 3, 4, 8, 16):
        done = 0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        while done < 32:
            pipeline.infer(tensors[:batch])
            done += batch
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        print(f"batch {batch:2d}: {wall / done:.4f} s wall, {cpu / done:.4f} core-s per image "
              f"({cpu / wall:.2f} threads busy)", flush=True)


def jobs(workload_name: str, specs: list[str]) -> None:
    import benchmarks.run as bench

    seen: dict[int, tuple[str, float, float]] = {}
    original = subprocess.Popen

    class Watched(original):  # type: ignore[misc, valid-type]
        """The benchmark's worker subprocess, with every process of its tree sampled for CPU."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            threading.Thread(target=_watch, args=(self.pid, seen), daemon=True).start()

    bench.subprocess.Popen = Watched
    workload = next(w for w in bench.WORKLOADS if w.name == workload_name)
    images = generate_preset(default_cache_dir(), workload.preset, workload.count, seed=0)
    for index, spec in enumerate(specs):
        fields = json.loads(spec)
        extra = fields.pop("_env", {})
        # BENCH_PIPELINE applies to autotune's runs only, forced plans run the reference pipeline
        pipeline = "synthetic-moths" if fields else os.environ.get("BENCH_PIPELINE", "synthetic-moths")
        config = bench.spec_config(f"cpu{index}", fields, extra, pipeline)
        seen.clear()
        mine0 = psutil.Process().cpu_times()
        result = bench.run_one(workload, images, config, 8 * bench.GiB, tag=f"cpu{index}-")
        mine1 = psutil.Process().cpu_times()
        print(f"{result.plan or config.label} {extra or ''}: {result.images_per_s:.2f} images/s "
              f"(steady {result.steady_images_per_s:.2f}), wall {result.job_wall_s:.1f} s, "
              f"peak {result.peak_bytes / bench.MiB:.0f} MiB, predicted {result.predicted_peak_bytes / bench.MiB:.0f} MiB")
        print(f"   this process (server, meter): user {mine1.user - mine0.user:.1f} system {mine1.system - mine0.system:.1f} core-s")
        for pid, (role, user, system) in sorted(seen.items()):
            if user + system >= 0.05:
                print(f"   {pid} {role:14s} user {user:.1f} system {system:.1f} core-s")


def _watch(pid: int, seen: dict) -> None:
    root = psutil.Process(pid)
    while True:
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                times = process.cpu_times()
                seen[process.pid] = (process_role(process.pid, root.pid), times.user, times.system)
            except psutil.Error:
                pass
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("buffers", "batches", "jobs"):
        print(__doc__)
        return 2
    if argv[0] == "buffers":
        buffers()
    elif argv[0] == "batches":
        batches()
    else:
        if len(argv) < 3:
            print(__doc__)
            return 2
        jobs(argv[1], argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
