"""benchmarks/server_cost.py against the real local server and the real plain downloader."""
from __future__ import annotations

from benchmarks.server_cost import measure


def test_every_image_is_served_once_per_task_and_both_sides_cpu_is_counted():
    figures = measure("tiny", 6, threads=2, latency_s=0.0, bandwidth=None)
    assert figures["images"] == 12 and figures["failures"] == 0  # each distinct image served twice
    assert figures["server_ms_per_image"] > 0 and figures["client_ms_per_image"] > 0
    assert figures["images_per_s"] > 0
