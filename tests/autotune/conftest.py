"""Fixture numbers for the autotune tests: no torch, no network, no committed calibration."""
from __future__ import annotations

from typing import Callable

import pytest

from autotune.calibration import MemoryCalibration
from autotune.probe import Probe

MiB = 1024 * 1024
GiB = 1024 * MiB


def fixture_calibration(**changes: object) -> MemoryCalibration:
    values: dict[str, object] = dict(
        worker_process_bytes=300 * MiB,
        download_buffer_factor=2.0,
        decode_scratch_factor=1.0,
        collate_copy_factor=1.0,
        pinned_copy_factor=1.0,
        model_input_pixels=1_000_000,
        inference_bytes_per_input_pixel=100.0,
        provisional=False,
        measured_by="test fixture",
        measured_on="nowhere",
    )
    values.update(changes)
    return MemoryCalibration(**values)  # type: ignore[arg-type]


def fixture_probe(**changes: object) -> Probe:
    """A small-image CPU job on a fast network; override any Probe field."""
    values: dict[str, object] = dict(
        sample_count=3,
        median_jpeg_bytes=1_500_000,
        max_jpeg_bytes=1_600_000,
        median_width=2048,
        max_width=2048,
        median_height=1536,
        max_height=1536,
        decoded_bytes_per_image=2048 * 1536 * 3,
        median_decoded_bytes=2048 * 1536 * 3,
        download_latency_s=0.01,
        download_bytes_per_s=100e6,
        decode_s_per_image=0.015,
        inference_overhead_s=0.05,
        inference_per_image_s=0.1,
        baseline_bytes=1 * GiB,
        worker_process_bytes=300 * MiB,
        cpu_count=2,
        inference_threads=2,
        cuda=False,
        reservation_timeout_s=300.0,
        api_round_trip_s=0.01,
    )
    if changes.get("cuda"):
        values.update(host_to_device_bytes_per_s=6e9, pinned_host_to_device_bytes_per_s=12e9)
    values.update(changes)
    return Probe(**values)  # type: ignore[arg-type]


def large_image_changes() -> dict[str, object]:
    """~24 MB 4096x3072 JPEGs (the OOM story's images)."""
    return dict(
        median_jpeg_bytes=24_000_000, max_jpeg_bytes=24_000_000,
        median_width=4096, max_width=4096, median_height=3072, max_height=3072,
        decoded_bytes_per_image=4096 * 3072 * 3, median_decoded_bytes=4096 * 3072 * 3,
        decode_s_per_image=0.12,
    )


@pytest.fixture
def calibration() -> MemoryCalibration:
    return fixture_calibration()


@pytest.fixture
def make_probe() -> Callable[..., Probe]:
    return fixture_probe


@pytest.fixture
def large_images() -> dict[str, object]:
    return large_image_changes()
