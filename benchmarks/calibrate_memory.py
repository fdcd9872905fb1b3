"""Measure the memory model's constants on this machine and write ``autotune/calibration.json``.

    python benchmarks/calibrate_memory.py            # measure and write
    python benchmarks/calibrate_memory.py --dry-run  # measure and print only

Every measurement runs real code in a fresh child process and reads the child's process tree
PSS from this process (``watchdog.sampler``, see below), so the
local Antenna server serving the images (here, in the parent) is never counted:

Memory is ``benchmarks.meter``'s: PSS of everything but /dev/shm segments, plus each segment's
size once (PSS alone misses decoded images queued in shared memory).

1. ``worker_process_bytes`` and the per-image constants: a real ``Loader`` with one loader
   worker (a fork of the fork server, which runs before the baseline is read, as in the worker)
   streams generated small and large JPEGs; the child takes the first batch and then holds it
   without consuming, so the worker fills its credit (``prefetch_factor x batch_size`` decoded
   images) and parks with ``download_threads`` downloaded JPEGs. The plateau
   above the child's pre-loader baseline is, by ``autotune.memory_model``'s structure,
   ``W + scratch x D + queued x D x q + threads x J x f`` (D decoded bytes, J JPEG bytes).
   Several (batch, prefetch, threads, image size) configurations give a least-squares fit of
   W (worker process), scratch (decode scratch factor) and f (download buffer factor), the last
   three per loader worker (one and two workers); queued images count at their size (q = 1,
   checked by a free fit).
2. ``inference_bytes_per_input_pixel``: the reference pipeline on CPU in a child; peak RSS above
   the steady state while a batch is inferred (``/proc/self/clear_refs`` 5 resets VmHWM), per
   image, divided by the detector's input pixels (``worker.pipelines.reference.DETECT_SIZE``).
3. ``pinned_copy_factor`` cannot be measured without CUDA; it keeps the structural value 1.0
   (one pinned copy per handed-over batch) and the notes say so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024
TOKEN = "calibration-token"

# (preset, batch_size, prefetch_factor, download_threads, loader workers): queued decoded images,
# held JPEGs and worker processes vary independently; small vs large images separate the
# per-process constant from decode scratch. Two-worker points price a worker as it is in a real
# plan: PSS splits the pages workers share (torch's libraries) among them.
QUEUE_CONFIGS = (
    ("large", 2, 1, 1, 1),
    ("large", 2, 2, 1, 1),
    ("large", 1, 1, 4, 1),
    ("large", 3, 2, 2, 1),
    ("large", 2, 1, 1, 2),
    ("small", 2, 1, 1, 1),
    ("small", 4, 2, 4, 1),
    ("small", 8, 2, 1, 1),
    ("small", 4, 1, 2, 2),
)
INFERENCE_CONFIGS = (("small", 1), ("small", 4), ("large", 1), ("large", 4))
HOLD_S = 6.0


# ---------------------------------------------------------------- child side


def _say(line: str) -> None:
    print(line, flush=True)


def _child_queue(base_url: str, job_id: int, batch: int, prefetch: int, threads: int, workers: int) -> None:
    from autotune.plan import LoaderPlan
    from worker.imaging import fix_mmap_threshold
    from worker.ingest import IngestSource, Loader, start_fork_server

    fix_mmap_threshold()
    start_fork_server(wait=True)  # as in the worker: started with it, so part of the baseline
    # Each worker reserves just enough to fill its credit and park with its downloads held, so
    # with two workers both get images (one reserving everything would leave the other idle).
    reserve = batch * (1 + prefetch) + threads + 2
    plan = LoaderPlan(tasks_per_reserve=reserve, batch_size=batch, num_workers=workers, prefetch_factor=prefetch,
                      pin_memory=False, download_threads=threads, source="benchmark")
    source = IngestSource(base_url=base_url, token=TOKEN, job_id=job_id)
    _say("BASE")
    sys.stdin.readline()
    with Loader(source, plan) as loader:
        iterator = iter(loader)
        first = next(iterator)
        _say(f"FIRST {len(first.items)}")
        time.sleep(HOLD_S * workers)  # hold the batch; the workers fill their credit and park
        _say("HELD")
        sys.stdin.readline()
        del first, iterator


def _child_inference(preset: str, batch: int, data_dir: str) -> None:
    import gc

    import torch

    from worker.imaging import decode, fix_mmap_threshold
    from worker.pipelines import ReferencePipeline
    from worker.testing.synthetic import generate_preset

    fix_mmap_threshold()
    images = generate_preset(Path(data_dir), preset, batch, seed=0)
    tensors = [decode(bytearray(image.path.read_bytes()), max_pixels=80_000_000).tensor for image in images]
    pipeline = ReferencePipeline(torch.device("cpu"))
    pipeline.infer(tensors[:1])
    pipeline.infer(tensors)  # steady state: the allocator has seen this batch once
    gc.collect()
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    pipeline.infer(tensors)
    peak = _status_bytes("VmHWM")
    _say(json.dumps({"preset": preset, "batch": batch, "bytes": peak - before}))


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


# ---------------------------------------------------------------- parent side


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--child", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)


def _expect(process: subprocess.Popen, prefix: str) -> str:
    line = process.stdout.readline().strip()
    if not line.startswith(prefix):
        raise RuntimeError(f"child said {line!r}, expected {prefix}")
    return line


def measure_queue(server, images: dict, preset: str, batch: int, prefetch: int, threads: int, workers: int) -> dict:
    from benchmarks.meter import TreeMeterThread, read_tree_memory

    job_id = server.add_job(images[preset], "null")
    child = _spawn("queue", server.base_url, str(job_id), str(batch), str(prefetch), str(threads), str(workers))
    _expect(child, "BASE")
    base = read_tree_memory(child.pid).total_bytes
    sampler = TreeMeterThread(child.pid, interval_s=0.1).start()
    child.stdin.write("go\n")
    child.stdin.flush()
    _expect(child, "FIRST")
    _expect(child, "HELD")
    plateau = read_tree_memory(child.pid).total_bytes
    sampler.stop()
    child.stdin.write("done\n")
    child.stdin.flush()
    child.wait(timeout=60)
    image = images[preset][0]
    return {
        "preset": preset, "batch": batch, "prefetch": prefetch, "threads": threads, "workers": workers,
        "decoded_bytes": image.width * image.height * 3, "jpeg_bytes": max(i.jpeg_bytes for i in images[preset]),
        # the held batch, plus each worker's credit of prefetch x batch images
        "queued_images": batch * (1 + workers * prefetch), "base_bytes": base, "plateau_bytes": plateau,
        "peak_bytes": sampler.peak_total_bytes, "delta_bytes": plateau - base,
    }


def fit_queue(rows: list[dict]) -> dict:
    """Least squares ``delta - queued x D = n x (W + s x D + f x threads x J)`` (all >= 0), n workers.

    A queued decoded image is a /dev/shm segment of exactly its uint8 bytes (every page written
    by the decoder), so its factor is fixed at 1; the free fit's factor is reported as a check.
    """
    import numpy as np

    a = np.array([[1.0, r["decoded_bytes"], r["threads"] * r["jpeg_bytes"]] for r in rows])
    a = a * np.array([[float(r["workers"])] for r in rows])
    queued = np.array([float(r["queued_images"] * r["decoded_bytes"]) for r in rows])
    y = np.array([float(r["delta_bytes"]) for r in rows])
    solution = np.maximum(np.linalg.lstsq(a, y - queued, rcond=None)[0], 0.0)
    free = np.linalg.lstsq(np.column_stack([a, queued]), y, rcond=None)[0]
    predicted = a @ solution + queued
    return {
        "worker_process_bytes": int(solution[0]), "decode_scratch_factor": float(solution[1]),
        "download_buffer_factor": float(solution[2]), "queued_image_factor_free_fit": float(free[3]),
        "residuals_mib": [round(float(v) / MiB, 1) for v in (y - predicted)],
    }


def measure_inference(data_dir: Path) -> list[dict]:
    rows = []
    for preset, batch in INFERENCE_CONFIGS:
        child = _spawn("inference", preset, str(batch), str(data_dir))
        out, _ = child.communicate(timeout=300)
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def calibrate(data_dir: Path) -> tuple[dict, dict]:
    from worker.testing.antenna_server import LocalAntenna
    from worker.pipelines.reference import DETECT_SIZE
    from worker.testing.synthetic import generate_preset

    images = {"small": generate_preset(data_dir, "small", 40, seed=0),
              "large": generate_preset(data_dir, "large", 16, seed=0)}
    queue_rows = []
    with LocalAntenna(token=TOKEN, data_dir=data_dir) as server:
        for config in QUEUE_CONFIGS:
            row = measure_queue(server, images, *config)
            print(f"queue {config}: +{row['delta_bytes'] / MiB:.0f} MiB over the child's baseline", flush=True)
            queue_rows.append(row)
    fit = fit_queue(queue_rows)
    inference_rows = measure_inference(data_dir)
    input_pixels = DETECT_SIZE[0] * DETECT_SIZE[1]
    per_image = [row["bytes"] / row["batch"] for row in inference_rows]
    bytes_per_pixel = max(per_image) / input_pixels  # the worst measured: peaks are what we size for
    values = {
        "worker_process_bytes": fit["worker_process_bytes"],
        "download_buffer_factor": round(fit["download_buffer_factor"], 3),
        "decode_scratch_factor": round(fit["decode_scratch_factor"], 3),
        "collate_copy_factor": 0.0,
        "pinned_copy_factor": 1.0,
        "model_input_pixels": input_pixels,
        "inference_bytes_per_input_pixel": round(bytes_per_pixel, 1),
    }
    evidence = {"queue": queue_rows, "queue_fit": fit, "inference": inference_rows}
    return values, evidence


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print, do not write autotune/calibration.json")
    parser.add_argument("--data-dir", type=Path, default=None, help="generated image cache")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "queue":
            _child_queue(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]), int(rest[5]))
        else:
            _child_inference(rest[0], int(rest[1]), rest[2])
        return 0
    from autotune.calibration import MemoryCalibration, save_calibration
    from worker.testing.synthetic import default_cache_dir

    values, evidence = calibrate(args.data_dir or default_cache_dir())
    fit = evidence["queue_fit"]
    calibration = MemoryCalibration(
        **values, provisional=False,
        measured_by="python benchmarks/calibrate_memory.py",
        measured_on=f"{date.today().isoformat()} on {socket.gethostname()} ({platform.machine()}, "
                    f"{os.cpu_count()} CPUs, {platform.python_version()})",
        notes=(f"Loader fit over {len(QUEUE_CONFIGS)} configurations (residuals MiB {fit['residuals_mib']}): "
               f"queued decoded images count 1.0 x their uint8 bytes (a free fit says {fit['queued_image_factor_free_fit']:.3f}); the credit "
               f"bounds a worker to prefetch_factor x batch_size images, the batch being assembled included, "
               f"so collate_copy_factor is 0. Inference: peak RSS above steady state per image of the "
               f"reference pipeline on CPU, worst of {[(r['preset'], r['batch']) for r in evidence['inference']]}. "
               f"pinned_copy_factor not measurable without CUDA: structural 1.0."),
    )
    print(json.dumps(evidence, indent=1, default=str))
    print(json.dumps(calibration.as_dict(), indent=1))
    if not args.dry_run:
        print(f"wrote {save_calibration(calibration)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
