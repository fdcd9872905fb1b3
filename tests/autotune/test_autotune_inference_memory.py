"""The measured inference memory: its fit, its term in the memory model, the probe batch's peak,
and the CUDA model-batch planner. Made-up numbers only."""
from __future__ import annotations

import pytest

from autotune.inference_memory import (
    InferenceMemory,
    MemoryReading,
    fit_inference_memory,
    plan_model_batch,
    usable_device_bytes,
)
from autotune.memory_model import predict_peak
from autotune.plan import LoaderPlan

MiB = 1024 * 1024
GiB = 1024 * MiB
DETECTOR_PIXELS = 1088 * 800  # a 4:3 image at FasterRCNN's input, padded to 32
pytestmark = pytest.mark.timeout(10)


def readings(*pairs: tuple[int, int]) -> list[MemoryReading]:
    return [MemoryReading(items, bytes_) for items, bytes_ in pairs]


def test_two_counts_separate_the_fixed_cost_from_the_per_image_cost():
    memory = fit_inference_memory(readings((1, 60 * MiB), (4, 210 * MiB)), input_pixels_per_item=1_000_000,
                                  float_copy_bytes_per_item=10 * MiB)
    assert memory.fixed_bytes == 10 * MiB
    assert memory.bytes_per_item() == pytest.approx(50 * MiB)
    assert memory.bytes_per_input_pixel == pytest.approx(40 * MiB / 1_000_000)  # less the float copy
    assert memory.call_bytes(8) == pytest.approx(10 * MiB + 8 * 50 * MiB)
    assert memory.call_bytes(0) == 0


def test_the_largest_reading_per_count_is_kept_and_one_count_is_all_per_image():
    memory = fit_inference_memory(readings((2, 100 * MiB), (2, 80 * MiB)), input_pixels_per_item=100)
    assert memory.fixed_bytes == 0
    assert memory.bytes_per_item() == pytest.approx(50 * MiB)
    assert fit_inference_memory([], input_pixels_per_item=100) is None


def test_a_negative_intercept_refits_through_the_origin_and_a_falling_line_is_flat():
    through_origin = fit_inference_memory(readings((1, 10 * MiB), (4, 100 * MiB)), input_pixels_per_item=1)
    assert through_origin.fixed_bytes == 0
    assert through_origin.bytes_per_item() == pytest.approx((10 + 400) * MiB / 17)
    flat = fit_inference_memory(readings((1, 90 * MiB), (4, 80 * MiB)), input_pixels_per_item=1)
    assert (flat.fixed_bytes, flat.bytes_per_input_pixel) == (90 * MiB, 0.0)


def test_a_larger_image_at_the_same_model_input_costs_only_its_larger_float_copy():
    """A detector that resizes to 800 px: 1024x768 and 2048x1536 see the same input pixels."""
    small_copy, large_copy = 1024 * 768 * 12, 2048 * 1536 * 12
    memory = fit_inference_memory(readings((1, 400 * MiB), (4, 1600 * MiB)), input_pixels_per_item=DETECTOR_PIXELS,
                                  float_copy_bytes_per_item=small_copy)
    assert memory.bytes_per_item(DETECTOR_PIXELS, large_copy) - memory.bytes_per_item() == large_copy - small_copy


def plan(batch: int, workers: int = 0) -> LoaderPlan:
    return LoaderPlan(batch, batch, workers, 2, False, 4)


def measured_probe(make_probe, **changes):
    """A FasterRCNN-like job: 400 MiB per image at the model's input, 16 MiB per call."""
    values = dict(model_input_pixels=DETECTOR_PIXELS, float_copy_bytes_per_image=2048 * 1536 * 12,
                  inference_fixed_bytes=16 * MiB, inference_bytes_per_input_pixel=450.0, forward_batch_size=8)
    values.update(changes)
    return make_probe(**values)


def test_the_measured_term_replaces_the_calibration_and_scales_with_the_forward_batch(make_probe, calibration):
    probe = measured_probe(make_probe)
    per_image = 2048 * 1536 * 12 + DETECTOR_PIXELS * 450.0
    assert probe.inference_bytes_per_image() == pytest.approx(per_image)
    for batch, forward in ((1, 1), (4, 4), (16, 8)):  # the pipeline runs at most 8 images per forward call
        estimate = predict_peak(plan(batch), probe, calibration)
        batch_bytes = batch * probe.decoded_bytes_per_image
        assert estimate.inference_batch_bytes == pytest.approx(batch_bytes + 16 * MiB + forward * per_image, abs=1)
    unmeasured = predict_peak(plan(4), make_probe(forward_batch_size=8), calibration)
    assert unmeasured.inference_batch_bytes == 4 * probe.decoded_bytes_per_image + 4 * 1_000_000 * 100


def test_cuda_keeps_inference_off_the_host(make_probe, calibration):
    probe = measured_probe(make_probe, cuda=True)
    assert predict_peak(plan(4), probe, calibration).inference_batch_bytes == 4 * probe.decoded_bytes_per_image


def test_the_probes_batch_is_the_job_peak_when_the_plan_is_smaller(make_probe, calibration):
    """The probe's three images run as one forward call before any plan: a batch-1 plan's job
    still peaked there, and the correction must learn from that peak, not the plan's."""
    probe = measured_probe(make_probe, sample_count=3)
    small = predict_peak(plan(1), probe, calibration, correction=1.1)
    probe_peak = probe.baseline_bytes + 3 * probe.decoded_bytes_per_image + 16 * MiB + 3 * probe.inference_bytes_per_image()
    assert small.probe_batch_bytes == pytest.approx(probe_peak, abs=1)
    assert small.raw_job_peak_bytes == small.probe_batch_bytes > small.raw_total_bytes
    assert small.job_peak_bytes == round(small.probe_batch_bytes * 1.1)
    large = predict_peak(plan(8, workers=1), probe, calibration)
    assert large.job_peak_bytes == large.total_bytes > large.probe_batch_bytes
    assert "job peak (probe batch)" in small.table() and "job peak" not in large.table()


def test_usable_device_bytes_is_the_share_less_what_is_held_and_at_most_what_is_free():
    assert usable_device_bytes(free_bytes=70 * GiB, total_bytes=80 * GiB, fraction=0.5, held_bytes=2 * GiB) == 38 * GiB
    assert usable_device_bytes(free_bytes=10 * GiB, total_bytes=80 * GiB, fraction=0.5, held_bytes=2 * GiB) == 10 * GiB
    assert usable_device_bytes(free_bytes=10 * GiB, total_bytes=80 * GiB, fraction=0.01, held_bytes=2 * GiB) == 0
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            usable_device_bytes(1, 1, fraction)


def test_the_model_batch_is_the_largest_that_fits_and_never_more_than_configured():
    memory = InferenceMemory(fixed_bytes=100 * MiB, bytes_per_input_pixel=1.0, input_pixels_per_item=500 * MiB,
                             float_copy_bytes_per_item=0, readings=2)  # 500 MiB per image
    roomy = plan_model_batch(memory, 40 * GiB, configured=8)
    assert (roomy.items, roomy.predicted_bytes) == (8, 100 * MiB + 8 * 500 * MiB)
    tight = plan_model_batch(memory, 2 * GiB, configured=8)  # 0.9 x 2048 - 100 = 1743 MiB: 3 images
    assert tight.items == 3 and "3 of the configured 8" in tight.reason
    assert tight.predicted_bytes <= 0.9 * 2 * GiB < memory.call_bytes(4)
    none = plan_model_batch(memory, 300 * MiB, configured=8)
    assert none.items == 1 and "not even one" in none.reason


def test_a_reading_refuses_nonsense():
    with pytest.raises(ValueError):
        MemoryReading(0, 1)
    with pytest.raises(ValueError):
        MemoryReading(1, -1)
