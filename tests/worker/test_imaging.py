"""Decoding and download rules of ``worker.imaging`` on real bytes and a real local server."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from worker.imaging import ImageError, decode


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_greyscale_png_decodes_to_its_high_byte_not_to_white():
    grey = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 20).astype(np.uint16)
    data = _png(grey)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = decode(data, max_pixels=10**6)
    assert decoded.tensor.shape == (3, 48, 64)
    expected = (grey >> 8).astype(np.uint8)
    for channel in range(3):
        assert np.array_equal(decoded.tensor[channel].numpy(), expected)


def test_an_8_bit_png_still_decodes_exactly():
    rgb = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    assert np.array_equal(decode(_png(rgb), max_pixels=10**6).tensor.permute(1, 2, 0).numpy(), rgb)


def test_a_floating_point_image_is_an_error_result_not_a_guess():
    buffer = io.BytesIO()
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(buffer, format="TIFF")
    with pytest.raises(ImageError) as raised:
        decode(buffer.getvalue(), max_pixels=10**6)
    assert raised.value.reason == "not_an_image" and "F" in str(raised.value)
