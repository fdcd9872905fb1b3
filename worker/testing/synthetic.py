"""Generated moth-trap JPEGs with known ground truth, cached on disk.

A light, slightly uneven sheet with sensor-like noise and a few dark "specimens"
(a body ellipse plus two wing ellipses, each its own dark colour) at seeded,
non-overlapping positions. Each image's ground-truth boxes are pixel coordinates
(x1, y1, x2, y2) of the full image, measured from the drawn shapes themselves.

File sizes are driven by the noise level and the JPEG quality: noise is what
makes real trap photos big, so the presets tune those two to hit the sizes the
product meets in the field (see ``PRESETS``).
"""
from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# Noise comes from one tile per image, tiled over the frame: JPEG codes each 8x8
# block on its own, so repetition costs nothing in size and saves most of the RNG time.
# Odd sides keep the tile seams off the 8x8 block grid.
_NOISE_TILE_PX = (509, 521)
_SHEET_LEVEL = 232.0
_ROW_BAND_PX = 512
_PLACEMENT_TRIES = 200

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class SyntheticImage:
    path: Path
    image_id: str
    width: int
    height: int
    jpeg_bytes: int
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class Preset:
    """A named image shape. ``noise`` is the noise standard deviation in 8-bit levels."""

    name: str
    width: int
    height: int
    quality: int
    noise: float


# Tuned against the field sizes the product meets (~1.5 MB at 2048x1536 and ~24 MB at
# 4096x3072; measured with Pillow 13 / libjpeg-turbo, seeds 0-3, within 3% of each
# other): small ~1.47 MB, large ~24 MB. Quality >= 97 also switches off chroma
# subsampling, as high-end cameras do, which is most of what makes large files large.
PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", 640, 480, quality=85, noise=4.0),
    "small": Preset("small", 2048, 1536, quality=95, noise=9.0),
    "large": Preset("large", 4096, 3072, quality=98, noise=18.0),
}
_NO_SUBSAMPLING_QUALITY = 97


def with_integer_ids(images: list[SyntheticImage], first: int = 1) -> list[SyntheticImage]:
    """The same images under integer-string ids, as Antenna's source images have (its database keys)."""
    return [replace(image, image_id=str(first + index)) for index, image in enumerate(images)]


def default_cache_dir() -> Path:
    """Where generated datasets live unless the caller passes a directory."""
    return Path.home() / ".cache" / "antenna-worker" / "synthetic"


def generate_preset(out_dir: Path, preset_name: str, count: int, seed: int = 0) -> list[SyntheticImage]:
    """Generate (or reuse) ``count`` images of a preset under ``out_dir/<preset>``."""
    try:
        preset = PRESETS[preset_name]
    except KeyError:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}") from None
    return generate_images(
        Path(out_dir) / preset.name, count, preset.width, preset.height,
        quality=preset.quality, seed=seed, noise=preset.noise, prefix=f"{preset.name}-s{seed}-",
    )


def generate_images(
    out_dir: Path,
    count: int,
    width: int,
    height: int,
    *,
    quality: int,
    seed: int,
    noise: float,
    specimens: tuple[int, int] = (2, 6),
    prefix: str,
) -> list[SyntheticImage]:
    """Write ``count`` JPEGs named ``<prefix><index>.jpg`` into ``out_dir``.

    Image ``i`` depends only on (seed, i) and the other arguments, so asking for more
    images later extends a dataset without changing the first ones. A file is reused
    when it exists with the size its manifest entry records and the entry's parameters
    match; the manifest is updated under a file lock so processes can share a cache.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"width": width, "height": height, "quality": quality, "seed": seed,
              "noise": noise, "specimens": list(specimens)}
    images: list[SyntheticImage] = []
    with _manifest_lock(out_dir):
        manifest = _read_manifest(out_dir)
        started_s = time.monotonic()
        made = 0
        try:
            for index in range(count):
                name = f"{prefix}{index:05d}.jpg"
                image = _cached(out_dir, name, params, manifest.get(name))
                if image is None:
                    image = _generate_one(out_dir / name, index, params)
                    manifest[name] = _entry(image, params)
                    made += 1
                images.append(image)
        finally:
            # Written even on failure so an interrupted run keeps what it made.
            if made:
                _write_manifest(out_dir, manifest)
        if made:
            logger.info("generated %d of %d images (%dx%d q%d) in %.1f s into %s",
                        made, count, width, height, quality, time.monotonic() - started_s, out_dir)
    return images


def _generate_one(path: Path, index: int, params: dict) -> SyntheticImage:
    rng = np.random.default_rng([params["seed"], index])
    width, height = params["width"], params["height"]
    pixels = _sheet(rng, width, height, params["noise"])
    lo, hi = params["specimens"]
    boxes = _draw_specimens(rng, pixels, int(rng.integers(lo, hi + 1)))
    buffer = io.BytesIO()
    subsampling = 0 if params["quality"] >= _NO_SUBSAMPLING_QUALITY else 2  # 4:4:4 else 4:2:0
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=params["quality"],
                                 subsampling=subsampling)
    data = buffer.getvalue()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    image_id = path.stem
    return SyntheticImage(path=path, image_id=image_id, width=width, height=height,
                          jpeg_bytes=len(data), boxes=tuple(boxes))


def _sheet(rng: np.random.Generator, width: int, height: int, noise: float) -> np.ndarray:
    """A light sheet: a gentle 2-D brightness gradient, a warm tint, tiled noise."""
    tint = np.array([1.0, 0.985, 0.95], dtype=np.float32) * rng.uniform(0.96, 1.0)
    gx = np.linspace(-1.0, 1.0, width, dtype=np.float32) * rng.uniform(-10, 10)
    gy = np.linspace(-1.0, 1.0, height, dtype=np.float32) * rng.uniform(-10, 10)
    tile = rng.standard_normal((*_NOISE_TILE_PX, 3), dtype=np.float32) * np.float32(noise)
    reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
    shift = (int(rng.integers(tile.shape[0])), int(rng.integers(tile.shape[1])))
    tile = np.roll(tile, shift, axis=(0, 1))
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    # Bands keep the float temporaries to a few tens of MB even for 4096x3072.
    for top in range(0, height, _ROW_BAND_PX):
        bottom = min(height, top + _ROW_BAND_PX)
        base = _SHEET_LEVEL + gy[top:bottom, None] + gx[None, :]
        band = base[:, :, None] * tint
        band += _tiled_rows(tile, top, bottom, width, reps)
        np.clip(band, 0, 255, out=band)
        pixels[top:bottom] = band.astype(np.uint8)
    return pixels


def _tiled_rows(tile: np.ndarray, top: int, bottom: int, width: int, reps: tuple) -> np.ndarray:
    rows = np.arange(top, bottom) % tile.shape[0]
    return np.tile(tile[rows], (1, reps[1], 1))[:, :width]


def _draw_specimens(rng: np.random.Generator, pixels: np.ndarray, count: int) -> list[Box]:
    height, width = pixels.shape[:2]
    placed: list[tuple[float, float, float]] = []
    boxes: list[Box] = []
    for _ in range(count):
        spot = _free_spot(rng, width, height, placed)
        if spot is None:
            break
        placed.append(spot)
        boxes.append(_draw_moth(rng, pixels, *spot))
    return boxes


def _free_spot(rng: np.random.Generator, width: int, height: int,
               placed: list[tuple[float, float, float]]) -> tuple[float, float, float] | None:
    """A centre and a radius whose circle clears the edges and every placed circle."""
    short_px = min(width, height)
    for _ in range(_PLACEMENT_TRIES):
        radius = float(rng.uniform(0.05, 0.11) * short_px)
        cx = float(rng.uniform(radius + 2, width - radius - 2))
        cy = float(rng.uniform(radius + 2, height - radius - 2))
        # A small gap between circles keeps the boxes from overlapping too.
        if all((cx - x) ** 2 + (cy - y) ** 2 > (radius + r + 4) ** 2 for x, y, r in placed):
            return cx, cy, radius
    return None


def _draw_moth(rng: np.random.Generator, pixels: np.ndarray, cx: float, cy: float,
               radius: float) -> Box:
    """Darken a body and two wings inside the circle; return the drawn shape's box."""
    x0, x1 = int(cx - radius), int(np.ceil(cx + radius)) + 1
    y0, y1 = int(cy - radius), int(np.ceil(cy + radius)) + 1
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    heading = rng.uniform(0, np.pi)
    body_len = radius * rng.uniform(0.55, 0.75)
    body_wid = body_len * rng.uniform(0.2, 0.3)
    alpha = _ellipse_alpha(dx, dy, heading, body_len, body_wid)
    for side in (-1.0, 1.0):
        sweep = heading + side * rng.uniform(0.6, 1.1)
        wing_len = radius * rng.uniform(0.55, 0.8)
        reach = wing_len * 0.9
        wx, wy = np.cos(sweep) * reach * 0.6, np.sin(sweep) * reach * 0.6
        wing = _ellipse_alpha(dx - wx, dy - wy, sweep, wing_len, wing_len * rng.uniform(0.35, 0.5))
        np.maximum(alpha, wing * 0.92, out=alpha)
    colour = rng.uniform(25, 95, size=3).astype(np.float32)
    # Multiplying keeps the sheet's noise texture inside the specimen, like a photo.
    factor = 1.0 - alpha[:, :, None] * (1.0 - colour / _SHEET_LEVEL)
    crop = pixels[y0:y1, x0:x1]
    crop[...] = np.clip(crop * factor, 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(alpha >= 0.5)
    return (float(x0 + xs.min()), float(y0 + ys.min()), float(x0 + xs.max() + 1), float(y0 + ys.max() + 1))


def _ellipse_alpha(dx: np.ndarray, dy: np.ndarray, angle: float, half_len: float,
                   half_wid: float) -> np.ndarray:
    """Coverage in [0, 1] of a rotated ellipse, anti-aliased over about one pixel."""
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (dx * cos + dy * sin) / half_len
    v = (-dx * sin + dy * cos) / half_wid
    dist = np.sqrt(u * u + v * v)
    return np.clip((1.0 - dist) * half_wid + 0.5, 0.0, 1.0)


def _cached(out_dir: Path, name: str, params: dict, entry: dict | None) -> SyntheticImage | None:
    if entry is None or entry.get("params") != params:
        return None
    path = out_dir / name
    try:
        if path.stat().st_size != entry["jpeg_bytes"]:
            return None
    except FileNotFoundError:
        return None
    boxes = tuple(tuple(float(v) for v in box) for box in entry["boxes"])
    return SyntheticImage(path=path, image_id=entry["image_id"], width=entry["width"],
                          height=entry["height"], jpeg_bytes=entry["jpeg_bytes"], boxes=boxes)


def _entry(image: SyntheticImage, params: dict) -> dict:
    return {"params": params, "image_id": image.image_id, "width": image.width,
            "height": image.height, "jpeg_bytes": image.jpeg_bytes,
            "boxes": [list(box) for box in image.boxes]}


@contextmanager
def _manifest_lock(out_dir: Path) -> Iterator[None]:
    with open(out_dir / ".manifest.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_manifest(out_dir: Path) -> dict[str, dict]:
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _write_manifest(out_dir: Path, manifest: dict[str, dict]) -> None:
    tmp = out_dir / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / MANIFEST_NAME)
