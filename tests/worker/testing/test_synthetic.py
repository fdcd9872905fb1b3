"""Generated datasets: shapes, sizes, determinism, truth boxes, the on-disk cache."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.testing.synthetic import (
    MANIFEST_NAME,
    PRESETS,
    default_cache_dir,
    generate_images,
    generate_preset,
)

pytestmark = pytest.mark.timeout(60)


def _tiny(out_dir: Path, count: int = 3, seed: int = 0, **overrides):
    kwargs = dict(quality=85, seed=seed, noise=4.0, prefix="t-")
    kwargs.update(overrides)
    return generate_images(out_dir, count, 320, 240, **kwargs)


def test_tiny_preset_has_its_shape_and_a_plausible_size(tmp_path: Path) -> None:
    images = generate_preset(tmp_path, "tiny", 3, seed=1)
    preset = PRESETS["tiny"]
    assert len(images) == 3
    for image in images:
        assert image.path.stat().st_size == image.jpeg_bytes
        with Image.open(image.path) as decoded:
            assert decoded.size == (preset.width, preset.height)
            assert decoded.format == "JPEG"
        # Noise keeps even the tiny preset well above a flat-colour JPEG (~5 kB).
        assert 15_000 < image.jpeg_bytes < 80_000
    assert len({image.image_id for image in images}) == 3


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    first = _tiny(tmp_path / "a", seed=7)
    again = _tiny(tmp_path / "b", seed=7)
    other = _tiny(tmp_path / "c", seed=8)
    assert [i.path.read_bytes() for i in first] == [i.path.read_bytes() for i in again]
    assert [i.boxes for i in first] == [i.boxes for i in again]
    assert first[0].path.read_bytes() != other[0].path.read_bytes()


def test_extending_a_dataset_keeps_the_first_images(tmp_path: Path) -> None:
    two = _tiny(tmp_path / "a", count=2)
    five = _tiny(tmp_path / "b", count=5)
    assert [i.path.read_bytes() for i in two] == [i.path.read_bytes() for i in five[:2]]


def test_boxes_lie_inside_the_image_and_do_not_overlap(tmp_path: Path) -> None:
    images = _tiny(tmp_path, count=6, specimens=(3, 5))
    for image in images:
        assert 1 <= len(image.boxes) <= 5
        for x1, y1, x2, y2 in image.boxes:
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
        for i, a in enumerate(image.boxes):
            for b in image.boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_boxes_surround_dark_specimens_on_a_light_sheet(tmp_path: Path) -> None:
    image = _tiny(tmp_path, count=1, specimens=(2, 2))[0]
    with Image.open(image.path) as decoded:
        grey = np.asarray(decoded.convert("L"), dtype=np.float32)
    outside = np.ones_like(grey, dtype=bool)
    for x1, y1, x2, y2 in image.boxes:
        inside = grey[int(y1):int(y2), int(x1):int(x2)]
        assert inside.min() < 120, "no dark specimen inside its box"
        outside[int(y1):int(y2), int(x1):int(x2)] = False
    assert np.median(grey[outside]) > 190, "the sheet should be light"
    assert np.percentile(grey[outside], 1) > 150, "dark pixels outside every box"


def test_cache_reuses_files_and_regenerates_changed_or_missing_ones(tmp_path: Path) -> None:
    images = _tiny(tmp_path, count=3)
    mtimes = [i.path.stat().st_mtime_ns for i in images]
    time.sleep(0.01)
    again = _tiny(tmp_path, count=3)
    assert again == images
    assert [i.path.stat().st_mtime_ns for i in again] == mtimes

    images[1].path.unlink()
    images[2].path.write_bytes(b"short")
    rebuilt = _tiny(tmp_path, count=3)
    assert rebuilt == images
    assert rebuilt[0].path.stat().st_mtime_ns == mtimes[0]

    other_quality = _tiny(tmp_path, count=1, quality=60)
    assert other_quality[0].jpeg_bytes < images[0].jpeg_bytes
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["t-00000.jpg"]["params"]["quality"] == 60


def test_presets_and_cache_dir() -> None:
    assert (PRESETS["small"].width, PRESETS["small"].height) == (2048, 1536)
    assert (PRESETS["large"].width, PRESETS["large"].height) == (4096, 3072)
    assert default_cache_dir().parts[-3:] == (".cache", "antenna-worker", "synthetic")
    with pytest.raises(ValueError, match="unknown preset"):
        generate_preset(Path("/nonexistent"), "huge", 1)


@pytest.mark.timeout(30)
def test_one_small_preset_image_lands_near_1_5_mb(tmp_path: Path) -> None:
    image = generate_preset(tmp_path, "small", 1)[0]
    assert 1_200_000 <= image.jpeg_bytes <= 1_800_000
