"""Probe.from_samples: summaries and the inference / download fits, from synthetic timings."""
from __future__ import annotations

import json

import pytest

from autotune.probe import ImageSample, InferenceSample, Probe, fit_download, fit_inference, fit_line

MiB = 1024 * 1024


def images(*sizes: tuple[int, int, int], latency_s: float = 0.3, bytes_per_s: float = 1e6,
           first_byte: bool = True) -> list[ImageSample]:
    return [
        ImageSample(jpeg, w, h, latency_s + jpeg / bytes_per_s, 0.01 * (i + 1),
                    first_byte_s=latency_s if first_byte else None)
        for i, (jpeg, w, h) in enumerate(sizes)
    ]


def probe_from(image_samples, inference_samples, **options) -> Probe:
    options.setdefault("worker_process_bytes", 250 * MiB)
    return Probe.from_samples(image_samples, inference_samples, baseline_bytes=2 * 1024 * MiB,
                              cpu_count=2, cuda=False, **options)


def test_inference_fit_recovers_overhead_and_per_image_cost():
    samples = [InferenceSample(b, 0.05 + 0.02 * b) for b in (1, 2, 4, 8)]
    overhead_s, per_image_s = fit_inference(samples)
    assert overhead_s == pytest.approx(0.05)
    assert per_image_s == pytest.approx(0.02)


def test_inference_fit_is_least_squares_on_noisy_timings():
    # noisy timings around 0.1 + 0.03 b; by hand: Sxy = 0.13, Sxx = 5 -> slope 0.026, intercept 0.175 - 2.5 x 0.026
    samples = [InferenceSample(1, 0.14), InferenceSample(2, 0.15), InferenceSample(3, 0.20), InferenceSample(4, 0.21)]
    overhead_s, per_image_s = fit_inference(samples)
    assert per_image_s == pytest.approx(0.026, abs=1e-9)
    assert overhead_s == pytest.approx(0.11, abs=1e-9)


def test_one_batch_size_gives_zero_overhead():
    overhead_s, per_image_s = fit_inference([InferenceSample(4, 0.8), InferenceSample(4, 1.2)])
    assert overhead_s == 0.0
    assert per_image_s == pytest.approx(0.25)


def test_overhead_floor_refits_the_per_image_cost_when_noise_zeroes_the_overhead():
    # three images alone and the three as one batch, a lucky-fast single: the free fit clamps the
    # overhead to 0 (intercept < 0), which would make batch 1 as fast per image as batch 4
    samples = [InferenceSample(1, 0.080), InferenceSample(1, 0.085), InferenceSample(1, 0.082),
               InferenceSample(3, 0.262)]
    assert fit_inference(samples)[0] == 0.0
    overhead_s, per_image_s = fit_inference(samples, overhead_floor_s=0.02)
    assert overhead_s == 0.02
    # least squares with the overhead fixed: sum b (t - 0.02) / sum b^2 = (0.187 + 0.726) / 12
    assert per_image_s == pytest.approx((0.06 + 0.065 + 0.062 + 3 * 0.242) / 12)
    # a fit above the floor is kept as it is
    clean = [InferenceSample(b, 0.05 + 0.02 * b) for b in (1, 2, 4)]
    assert fit_inference(clean, overhead_floor_s=0.01) == fit_inference(clean)


def test_probe_uses_the_overhead_floor_and_says_so():
    sample = images((1_500_000, 2048, 1536))
    timings = [InferenceSample(1, 0.080), InferenceSample(1, 0.085), InferenceSample(1, 0.082), InferenceSample(3, 0.262)]
    probe = probe_from(sample, timings, inference_overhead_floor_s=0.02)
    assert probe.inference_overhead_s == 0.02
    assert any("floor" in note for note in probe.notes)
    # without it, batch 1 costs what batch 4 costs per image; with it, 0.02 s more per image
    free = probe_from(sample, timings)
    assert free.inference_s(1) == pytest.approx(free.inference_s(4) / 4)
    assert probe.inference_s(1) - probe.inference_s(4) / 4 == pytest.approx(0.02 * 3 / 4)


def test_fit_clamps_negative_slope_and_negative_intercept():
    # bigger batches measured faster (noise): per-image 0, overhead the mean
    assert fit_line([1.0, 2.0], [0.5, 0.3]) == (pytest.approx(0.4), 0.0)
    # a free fit would give intercept -0.1: refit through the origin instead
    intercept, slope = fit_line([1.0, 2.0, 3.0], [0.1, 0.3, 0.5])
    assert intercept == 0.0
    assert slope == pytest.approx((0.1 + 0.6 + 1.5) / 14)


def test_image_summary_is_conservative_for_memory():
    sample = images((1_000_000, 4000, 1000), (3_000_000, 1000, 4000), (2_000_000, 2000, 2000))
    probe = probe_from(sample, [InferenceSample(1, 0.1)])
    assert probe.sample_count == 3
    assert (probe.median_jpeg_bytes, probe.max_jpeg_bytes) == (2_000_000, 3_000_000)
    assert (probe.median_width, probe.max_width) == (2000, 4000)
    assert (probe.median_height, probe.max_height) == (2000, 4000)
    # the largest IMAGE (12 Mpx), not max width x max height (16 Mpx)
    assert probe.decoded_bytes_per_image == 4000 * 1000 * 3
    assert probe.decode_s_per_image == pytest.approx(0.02)  # median


def test_download_from_time_to_first_byte():
    sample = images((1_500_000, 2048, 1536), (1_500_000, 2048, 1536), latency_s=0.3, bytes_per_s=1e6)
    probe = probe_from(sample, [InferenceSample(1, 0.1)])
    assert probe.download_latency_s == pytest.approx(0.3)
    assert probe.download_bytes_per_s == pytest.approx(1e6)
    assert probe.download_s_per_image() == pytest.approx(1.8)
    assert probe.api_round_trip_s == pytest.approx(0.3)  # defaults to the download latency


def test_download_fitted_over_sizes_without_first_byte():
    sample = images((500_000, 1, 1), (1_500_000, 1, 1), (3_000_000, 1, 1), latency_s=0.2, bytes_per_s=2e6,
                    first_byte=False)
    latency_s, bytes_per_s, how = fit_download(sample)
    assert latency_s == pytest.approx(0.2)
    assert bytes_per_s == pytest.approx(2e6)
    assert "fitted" in how


def test_download_with_similar_sizes_charges_all_time_to_bandwidth():
    sample = images((1_500_000, 1, 1), (1_600_000, 1, 1), latency_s=0.2, bytes_per_s=2e6, first_byte=False)
    latency_s, bytes_per_s, how = fit_download(sample)
    assert latency_s == 0.0
    assert bytes_per_s == pytest.approx(3_100_000 / (0.4 + 3_100_000 / 2e6))
    assert "not separable" in how


def test_a_separately_measured_latency_wins():
    sample = images((1_000_000, 1, 1), latency_s=0.5, bytes_per_s=1e6, first_byte=True)
    probe = probe_from(sample, [InferenceSample(1, 0.1)], download_latency_s=0.25, api_round_trip_s=0.05)
    assert probe.download_latency_s == 0.25
    assert probe.download_bytes_per_s == pytest.approx(1_000_000 / 1.25)
    assert probe.api_round_trip_s == 0.05


def test_worker_process_bytes_from_calibration_unless_measured(calibration):
    sample = images((1_000_000, 10, 10))
    measured = probe_from(sample, [InferenceSample(1, 0.1)], worker_process_bytes=123)
    assert measured.worker_process_bytes == 123
    calibrated = Probe.from_samples(sample, [InferenceSample(1, 0.1)], baseline_bytes=1, cpu_count=1,
                                    cuda=False, calibration=calibration)
    assert calibrated.worker_process_bytes == calibration.worker_process_bytes
    assert any("calibration" in note for note in calibrated.notes)


def test_transfer_rates_only_with_cuda():
    sample = images((1_000_000, 10, 10))
    cpu = probe_from(sample, [InferenceSample(1, 0.1)])
    assert (cpu.host_to_device_bytes_per_s, cpu.pinned_host_to_device_bytes_per_s) == (0.0, 0.0)
    gpu = Probe.from_samples(sample, [InferenceSample(1, 0.1)], baseline_bytes=1, cpu_count=1, cuda=True,
                             worker_process_bytes=1, host_to_device_bytes_per_s=5e9)
    assert gpu.host_to_device_bytes_per_s == 5e9
    assert gpu.pinned_host_to_device_bytes_per_s > 5e9  # assumed typical pinned rate


def test_as_dict_is_json_and_describe_shows_the_numbers():
    sample = images((24_000_000, 4096, 3072), (24_000_000, 4096, 3072))
    inference = [InferenceSample(1, 0.25), InferenceSample(4, 0.85)]
    probe = probe_from(sample, inference, reservation_timeout_s=120.0)
    data = json.loads(json.dumps(probe.as_dict()))
    assert data["decoded_bytes_per_image"] == 4096 * 3072 * 3
    assert data["reservation_timeout_s"] == 120.0
    assert Probe(**{**data, "notes": tuple(data["notes"])}) == probe
    text = probe.describe()
    assert "4096x3072" in text and "0.0500 s per batch + 0.2000 s per image" in text
    assert "36.0 MiB" in text and "0.300 s" in text


def test_empty_samples_are_refused():
    with pytest.raises(ValueError, match="ImageSample"):
        probe_from([], [InferenceSample(1, 0.1)])
    with pytest.raises(ValueError, match="InferenceSample"):
        probe_from(images((1, 1, 1)), [])


def test_one_thread_timing_is_kept_apart_and_priced_by_amdahl():
    # the same batch of 3: 2 threads 0.084 s per image, 1 thread 0.1 s -> time(2)/time(1) = 0.84
    # = serial + (1 - serial) / 2; the slower one-thread sample (batch 1) is not the one used
    default = [InferenceSample(1, 0.084, threads=2), InferenceSample(3, 0.252)]
    one_thread = [InferenceSample(3, 0.3, threads=1), InferenceSample(1, 0.12, threads=1)]
    probe = probe_from(images((1_000_000, 2048, 1536)), default + one_thread, inference_threads=2)
    assert probe.single_thread_batch_size == 3
    assert probe.inference_per_image_s == pytest.approx(0.084)  # the one-thread sample is not in the fit
    assert probe.inference_overhead_s == pytest.approx(0.0, abs=1e-9)
    assert probe.single_thread_inference_s == pytest.approx(0.1)
    assert probe.serial_fraction() == pytest.approx(0.68)
    assert probe.inference_s(4, threads=1) == pytest.approx(0.4)
    assert probe.inference_s(4, threads=2) == probe.inference_s(4) == pytest.approx(0.336)
    assert probe.inference_s(4, threads=4) == pytest.approx(0.4 * (0.68 + 0.32 / 4))
    assert "0.1000 s per image at 1 thread in a batch of 3" in probe.describe()


def test_without_a_one_thread_timing_threads_buy_nothing():
    probe = probe_from(images((1_000_000, 2048, 1536)), [InferenceSample(1, 0.1), InferenceSample(2, 0.2)],
                       inference_threads=4)
    assert probe.single_thread_inference_s == 0.0
    assert probe.serial_fraction() == 1.0
    assert probe.inference_s(2, threads=1) == probe.inference_s(2)
    assert any("4 threads only" in note for note in probe.notes)
    with pytest.raises(ValueError, match="default thread count"):
        probe_from(images((1_000_000, 2048, 1536)), [InferenceSample(1, 0.1, threads=1)], inference_threads=4)


def test_busy_threads_are_measured_cpu_over_wall_and_price_the_inference_cpu():
    # two threads, 0.1 s of wall per image: 0.15 core-s measured -> 1.5 threads busy
    timed = [InferenceSample(1, 0.1, threads=2, cpu_s=0.15), InferenceSample(3, 0.3, cpu_s=0.45)]
    probe = probe_from(images((1_000_000, 2048, 1536)), timed, inference_threads=2)
    assert probe.inference_busy_threads == pytest.approx(1.5)
    assert probe.max_timed_batch == 3
    assert probe.inference_cpu_s_per_image(2, 0.1) == pytest.approx(0.15)
    assert probe.inference_cpu_s_per_image(0, 0.1) == pytest.approx(0.15)  # 0: the default count
    assert probe.inference_cpu_s_per_image(1, 0.12) == pytest.approx(0.12)  # one thread: CPU = wall
    four = probe_from(images((1_000_000, 2048, 1536)), [InferenceSample(2, 0.2, cpu_s=0.7)], inference_threads=4)
    assert four.inference_busy_threads == pytest.approx(3.5)
    assert four.inference_cpu_s_per_image(2, 0.1) == pytest.approx(0.1 * (1 + 2.5 / 3))  # interpolated
    # timing noise never makes it more than every thread or less than one
    spin = probe_from(images((1_000_000, 2048, 1536)), [InferenceSample(1, 0.1, cpu_s=0.5)], inference_threads=2)
    idle = probe_from(images((1_000_000, 2048, 1536)), [InferenceSample(1, 0.1, cpu_s=0.01)], inference_threads=2)
    assert (spin.inference_busy_threads, idle.inference_busy_threads) == (2.0, 1.0)


def test_unmeasured_inference_cpu_counts_every_thread_busy():
    probe = probe_from(images((1_000_000, 2048, 1536)), [InferenceSample(1, 0.1)], inference_threads=2)
    assert probe.inference_busy_threads == 0.0
    assert probe.inference_cpu_s_per_image(2, 0.1) == pytest.approx(0.2)
    assert any("every intra-op thread taken as busy" in note for note in probe.notes)


def test_host_cpu_besides_ours_is_bounded_by_what_receiving_costs():
    """Serving an image costs the local server about what receiving it costs the worker
    (``benchmarks/server_cost.py``); the rest of the host's CPU in the window is other work."""
    sample = [ImageSample(1_500_000, 2048, 1536, 1.05, 0.03, first_byte_s=0.3, download_cpu_s=0.006)
              for _ in range(3)]
    # 0.25 core-s of other work on the host over the one-second window: 0.083 per image unbounded
    probe = probe_from(sample, [InferenceSample(3, 0.3)], external_cpu_s=0.25)
    assert probe.external_cpu_s_per_image == pytest.approx(0.006)
    assert any("bounded at 1 x receiving" in note for note in probe.notes)
    # a server whose cost per image is within the bound is charged in full
    close = probe_from(sample, [InferenceSample(3, 0.3)], external_cpu_s=0.015)
    assert close.external_cpu_s_per_image == pytest.approx(0.005)
    assert not any("bounded" in note for note in close.notes)
