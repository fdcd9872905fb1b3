"""Which JPEG decoder the worker uses, measured: Pillow vs simplejpeg (libjpeg-turbo).

    python -m benchmarks.decoders [--repeat 5]

Decodes generated small (2048x1536, ~1.5 MB) and large (4096x3072, ~24 MB) JPEGs to RGB uint8,
single-threaded, and prints seconds per image (median of --repeat runs) and images/s per core.
"""
from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import simplejpeg
from PIL import Image

from worker.testing.synthetic import default_cache_dir, generate_preset


def pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def simplejpeg_decode(data: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def median_s(decode, blobs: list[bytes], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        for blob in blobs:
            started = time.perf_counter()
            decode(blob)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decoders")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print("| preset | decoder | s/image (median) | images/s per core |")
    print("|---|---|---|---|")
    for preset, count in (("small", 4), ("large", 3)):
        blobs = [image.path.read_bytes() for image in generate_preset(default_cache_dir(), preset, count, seed=0)]
        for name, decode in (("Pillow", pillow_decode), ("simplejpeg", simplejpeg_decode)):
            decode(blobs[0])
            seconds = median_s(decode, blobs, args.repeat)
            print(f"| {preset} | {name} | {seconds:.4f} | {1 / seconds:.1f} |")


if __name__ == "__main__":
    main()
