"""predict_rate: the loader against the inference, with the contention cases."""
from __future__ import annotations

import random

import pytest

from autotune.plan import LoaderPlan
from autotune.throughput_model import (
    contended_inference,
    LANE_HANDOFF_CPU_S_PER_BATCH, UNLIMITED_PER_S, bounds, buffered_rate, connections_in_flight,
    handoff_cpu_s_per_image, handoff_wait_s,
    predict_rate, transfer_share,
)


def plan(**changes) -> LoaderPlan:
    values = dict(tasks_per_reserve=32, batch_size=8, num_workers=2, prefetch_factor=2,
                  pin_memory=False, download_threads=8)
    values.update(changes)
    return LoaderPlan(**values)


def test_inference_rate_is_batch_over_batch_seconds(make_probe):
    probe = make_probe(cuda=True, inference_overhead_s=0.04, inference_per_image_s=0.01, host_to_device_bytes_per_s=0.0)
    for batch in (1, 4, 16):
        rate = predict_rate(plan(batch_size=batch), probe)
        assert rate.inference_images_per_s == pytest.approx(batch / (0.04 + 0.01 * batch))


def test_loader_follows_the_reservation_cycle(make_probe):
    # one image per connection takes 0.3 + 1.5 = 1.8 s; 2 workers x 8 connections; decode 0.015 s.
    # The ingest reserves ahead: a reservation of 32 is 32 streaming steps of ~1.8 / 8 s, and the
    # 0.2 s round trip (decoder side: 32 x 0.015 + 0.2 = 0.68 s) hides behind the downloads
    probe = make_probe(cuda=True, download_latency_s=0.3, download_bytes_per_s=1e6, api_round_trip_s=0.2)
    rate = predict_rate(plan(), probe)
    step_s = 1.0 / buffered_rate(8 / 1.8, 1 / 0.015, 8, 0.5)
    assert step_s == pytest.approx(1.8 / 8, rel=1e-3)  # the decoder is far faster: it barely couples
    assert rate.loader_images_per_s == pytest.approx(2 * 32 / (32 * step_s))
    assert rate.download_images_per_s == pytest.approx(2 * 8 / 1.8)
    assert rate.bottleneck == "download"
    faster = predict_rate(plan(download_threads=16), probe)
    assert faster.loader_images_per_s > rate.loader_images_per_s


def test_small_reservations_pay_the_round_trip(make_probe):
    probe = make_probe(cuda=True, api_round_trip_s=0.5)
    one = predict_rate(plan(tasks_per_reserve=1), probe)
    many = predict_rate(plan(tasks_per_reserve=64), probe)
    assert one.bottleneck == "reserve"
    assert many.loader_images_per_s > 5 * one.loader_images_per_s


def test_reserving_more_than_the_downloads_need_buys_nothing(make_probe):
    # 300 ms latency, 2 MB/s, 1.5 MB images: ~1.05 s a download, 0.3 s a round trip. With the
    # round trip hidden behind the downloads in flight, 8 per reserve on 8 connections streams as
    # fast as 128 (the old refill-after-drain model paid 1.3 s per reservation, favouring 128)
    probe = make_probe(cuda=True, download_latency_s=0.3, download_bytes_per_s=2e6, api_round_trip_s=0.3,
                       median_jpeg_bytes=1_500_000, decode_s_per_image=0.03, inference_per_image_s=0.001)
    eight = predict_rate(plan(tasks_per_reserve=8, download_threads=8), probe)
    many = predict_rate(plan(tasks_per_reserve=128, download_threads=8), probe)
    assert eight.loader_images_per_s == pytest.approx(many.loader_images_per_s)
    assert eight.bottleneck == "download"


def test_decode_parallelism_is_capped_by_cpu_count(make_probe):
    probe = make_probe(cuda=True, cpu_count=2, decode_s_per_image=0.1, download_latency_s=0.0,
                       download_bytes_per_s=1e12, inference_per_image_s=0.0001)
    two = predict_rate(plan(num_workers=2), probe)
    eight = predict_rate(plan(num_workers=8), probe)
    assert two.decode_images_per_s == eight.decode_images_per_s == pytest.approx(20.0)
    assert eight.loader_images_per_s <= 20.0 + 1e-9
    assert eight.bottleneck == "decode"


def test_no_workers_loads_and_infers_in_turn(make_probe):
    probe = make_probe(cuda=True, api_round_trip_s=0.0)
    rate = predict_rate(plan(num_workers=0), probe)
    loader = rate.loader_images_per_s
    inference = 8 / (probe.inference_overhead_s + probe.inference_per_image_s * 8)
    assert rate.pipeline_images_per_s == pytest.approx(1 / (1 / loader + 1 / inference))
    assert rate.bottleneck == "main_process"
    assert predict_rate(plan(num_workers=1), probe).pipeline_images_per_s > rate.pipeline_images_per_s


def test_on_cpu_decoding_takes_cores_from_inference(make_probe):
    kwargs = dict(decode_s_per_image=0.2, inference_overhead_s=0.0, inference_per_image_s=0.1, cpu_count=2,
                  download_latency_s=0.0, download_bytes_per_s=1e12, api_round_trip_s=0.0)
    cpu = predict_rate(plan(num_workers=4), make_probe(cuda=False, **kwargs))
    gpu = predict_rate(plan(num_workers=4), make_probe(cuda=True, **kwargs))
    assert gpu.inference_images_per_s == pytest.approx(10.0)  # inference alone
    # each image: 0.1 s of all cores for inference + 0.2 core-s of decode (and the main
    # process's handoff) on 2 cores
    handoff = handoff_cpu_s_per_image(plan(num_workers=4))
    assert cpu.inference_images_per_s == pytest.approx(1 / (0.1 + (0.2 + handoff) / 2))
    assert cpu.bottleneck == "cpu"
    assert cpu.pipeline_images_per_s <= cpu.inference_images_per_s
    # inference's threads need more than a fair share (0.1 s per image vs 0.2 / 4 per lane): it is
    # the stage held back, and the loader runs ahead of it (the queue fills)
    assert cpu.loader_images_per_s > cpu.inference_images_per_s


def test_pin_memory_speeds_up_a_transfer_heavy_cuda_batch(make_probe, large_images):
    probe = make_probe(cuda=True, inference_overhead_s=0.0, inference_per_image_s=0.02, api_round_trip_s=0.0,
                       **large_images)
    share = transfer_share(plan(), probe)
    assert share == pytest.approx((4096 * 3072 * 3 / 6e9) / 0.02)
    unpinned = predict_rate(plan(pin_memory=False), probe).inference_images_per_s
    pinned = predict_rate(plan(pin_memory=True), probe).inference_images_per_s
    saved_s = 4096 * 3072 * 3 / 6e9 - 4096 * 3072 * 3 / 12e9
    assert pinned == pytest.approx(1 / (0.02 - saved_s))
    assert pinned > unpinned
    cpu_probe = make_probe(cuda=False, **large_images)
    assert transfer_share(plan(), cpu_probe) == 0.0
    assert predict_rate(plan(pin_memory=True), cpu_probe) == predict_rate(plan(pin_memory=False), cpu_probe)


def test_pipeline_never_exceeds_the_slower_stage_and_deeper_queues_never_hurt(make_probe):
    rng = random.Random(7)
    for _ in range(300):
        probe = make_probe(
            cuda=rng.random() < 0.5, cpu_count=rng.randint(1, 16),
            download_latency_s=rng.uniform(0, 0.5), download_bytes_per_s=rng.uniform(5e5, 1e8),
            decode_s_per_image=rng.uniform(0.001, 0.2), inference_overhead_s=rng.uniform(0, 0.2),
            inference_per_image_s=rng.uniform(0.001, 0.5), api_round_trip_s=rng.uniform(0, 0.5),
        )
        candidate = plan(num_workers=rng.randint(0, 8), batch_size=rng.choice([1, 4, 16, 64]),
                         tasks_per_reserve=rng.choice([1, 8, 64]), download_threads=rng.choice([1, 4, 32]))
        rate = predict_rate(candidate, probe)
        slower = min(rate.loader_images_per_s, rate.inference_images_per_s)
        assert 0 < rate.pipeline_images_per_s <= slower * (1 + 1e-9)
        if candidate.num_workers == 0:
            assert rate.pipeline_images_per_s == pytest.approx(slower)
        deeper = predict_rate(candidate.with_changes(prefetch_factor=candidate.prefetch_factor + 1), probe)
        assert deeper.pipeline_images_per_s >= rate.pipeline_images_per_s * (1 - 1e-9)
        assert rate.loader_images_per_s <= min(rate.download_images_per_s, rate.decode_images_per_s) * (1 + 1e-9)


def test_buffered_rate_is_below_the_slower_stage_and_tends_to_it():
    assert buffered_rate(10.0, 10.0, 1) == pytest.approx(10.0 * 2 / 3)
    assert buffered_rate(10.0, 20.0, 1) == buffered_rate(20.0, 10.0, 1)  # a tandem line is symmetric
    rates = [buffered_rate(10.0, 12.0, depth) for depth in (1, 2, 4, 8, 16, 64)]
    assert rates == sorted(rates) and rates[-1] == pytest.approx(10.0, rel=1e-3) and rates[0] < 8.0
    assert buffered_rate(10.0, UNLIMITED_PER_S, 1) == 10.0


def test_one_inference_thread_wins_when_decoding_is_most_of_the_cpu_work(make_probe, large_images):
    # Large JPEGs on 2 cores: decode 0.35 core-s per image; inference 0.084 s at 2 threads, 0.1 s at 1.
    probe = make_probe(**{**large_images, "decode_s_per_image": 0.35}, inference_overhead_s=0.0,
                       inference_per_image_s=0.084, single_thread_inference_s=0.1, download_latency_s=0.0,
                       download_bytes_per_s=1e12, api_round_trip_s=0.0)
    one = predict_rate(plan(num_workers=2, batch_size=1, inference_threads=1), probe)
    two = predict_rate(plan(num_workers=2, batch_size=1, inference_threads=2), probe)
    # two threads hold both cores 0.084 s per image: 2 / (0.35 + 2 x 0.084) images/s at most
    # (the decode plus the main process's handoff of each image)
    handoff = handoff_cpu_s_per_image(plan(num_workers=2, batch_size=1))
    assert two.loader_images_per_s == pytest.approx(2 / (0.35 + handoff + 0.168), rel=1e-6)
    assert one.pipeline_images_per_s > two.pipeline_images_per_s
    # the default (0) is the probe's thread count
    assert predict_rate(plan(num_workers=2, batch_size=1), probe) == two
    # CPU bound either way; inference needs less than a fair share, so the loader is held back
    # and inference runs at its share of a core with both lanes busy (2 / 3 of a core)
    assert one.bottleneck == "cpu"
    assert one.loader_images_per_s == pytest.approx(2 / (0.35 + handoff + 0.1))
    assert one.inference_images_per_s == pytest.approx((2 / 3) / 0.1)


def test_all_inference_threads_win_when_inference_is_most_of_the_cpu_work(make_probe):
    probe = make_probe(decode_s_per_image=0.02, inference_overhead_s=0.0, inference_per_image_s=0.08,
                       single_thread_inference_s=0.14, download_latency_s=0.0, download_bytes_per_s=1e12,
                       api_round_trip_s=0.0)
    one = predict_rate(plan(num_workers=1, inference_threads=1), probe)
    two = predict_rate(plan(num_workers=1, inference_threads=2), probe)
    assert one.inference_images_per_s == pytest.approx(1 / 0.14)
    assert two.pipeline_images_per_s > one.pipeline_images_per_s


def test_steadier_stages_need_less_buffer():
    exponential = buffered_rate(10.0, 12.0, 2)
    steadier = buffered_rate(10.0, 12.0, 2, scv=0.5)
    assert steadier == pytest.approx(buffered_rate(10.0, 12.0, 5))  # (2 + 1) / 0.5 = 6 = 5 + 1
    assert exponential < steadier <= 10.0
    with pytest.raises(ValueError, match="scv"):
        buffered_rate(10.0, 12.0, 2, scv=0.0)


def test_api_exchanges_are_priced_per_reserve_and_per_batch(make_probe):
    # A decode-only job (null pipeline): 0.05 core-s to load an image, nothing to infer; each
    # reserve or result post costs this host 0.01 core-s.
    cheap = dict(decode_s_per_image=0.05, inference_overhead_s=0.0, inference_per_image_s=1e-6,
                 inference_threads=1, download_latency_s=0.0, download_bytes_per_s=1e12, api_round_trip_s=0.0)
    probe = make_probe(**cheap, api_exchange_cpu_s=0.01)
    assert probe.api_cpu_s_per_image(2, 1) == pytest.approx(0.01 * (1 / 2 + 1))
    small = predict_rate(plan(tasks_per_reserve=2, batch_size=1), probe)
    large = predict_rate(plan(tasks_per_reserve=16, batch_size=16), probe)
    assert small.bottleneck == large.bottleneck == "cpu"
    small_handoff = handoff_cpu_s_per_image(plan(tasks_per_reserve=2, batch_size=1))
    large_handoff = handoff_cpu_s_per_image(plan(tasks_per_reserve=16, batch_size=16))
    assert small.loader_images_per_s == pytest.approx(2 / (0.05 + 0.015 + small_handoff + 1e-6), rel=1e-4)
    assert large.loader_images_per_s == pytest.approx(2 / (0.05 + 0.01 / 8 + large_handoff + 1e-6), rel=1e-4)
    # unmeasured (0), batch and reservation size cost only the main process's handoff per batch
    free = make_probe(**cheap)
    assert predict_rate(plan(tasks_per_reserve=2, batch_size=1), free).loader_images_per_s == pytest.approx(
        2 / (0.05 + small_handoff + 1e-6), rel=1e-4)


def test_lanes_share_the_cores_with_busy_inference_threads(make_probe):
    # inference (2 threads, both busy) is the slower stage; one lane alone would decode 20/s but
    # runs beside two busy threads on two cores: 2/3 of a core -> 13.3/s; two lanes get 1 core
    probe = make_probe(decode_s_per_image=0.05, inference_overhead_s=0.0, inference_per_image_s=0.1,
                       inference_busy_threads=2.0, download_latency_s=0.001, download_bytes_per_s=1e9)
    one = predict_rate(plan(num_workers=1, tasks_per_reserve=64, download_threads=8), probe)
    two = predict_rate(plan(num_workers=2, tasks_per_reserve=64, download_threads=8), probe)
    load_core_s = probe.loader_cpu_s_per_image()
    assert one.loader_images_per_s == pytest.approx((2 / 3) / load_core_s, rel=0.02)
    assert two.loader_images_per_s == pytest.approx(1.0 / load_core_s, rel=0.02)
    assert two.pipeline_images_per_s > one.pipeline_images_per_s
    # with fewer busy threads (sleeping at barriers) a lane gets more of a core
    passive = predict_rate(plan(num_workers=1, tasks_per_reserve=64, download_threads=8),
                           make_probe(**{**probe.__dict__, "inference_busy_threads": 1.0}))
    assert passive.loader_images_per_s > one.loader_images_per_s


def test_one_connection_barely_faster_than_the_decoder_stalls_it(make_probe):
    # a download takes 0.04 s, a decode 0.05 s: one connection keeps up only on average
    probe = make_probe(cuda=True, decode_s_per_image=0.05, download_latency_s=0.01, download_bytes_per_s=50e6,
                       median_jpeg_bytes=1_500_000, api_round_trip_s=0.0)
    one = predict_rate(plan(num_workers=1, tasks_per_reserve=64, download_threads=1), probe)
    four = predict_rate(plan(num_workers=1, tasks_per_reserve=64, download_threads=4), probe)
    assert four.loader_images_per_s == pytest.approx(20.0, rel=0.02)  # the decoder's rate
    assert one.loader_images_per_s < 0.9 * four.loader_images_per_s


def test_the_plan_names_its_bound_in_an_operators_words(make_probe):
    """A download bottleneck is latency-bound when the request's wait is most of a download and
    bandwidth-bound when the body's transfer is; the plan line (``describe``) carries the word."""
    cuda = dict(cuda=True, inference_per_image_s=0.0005, decode_s_per_image=0.005, median_jpeg_bytes=1_000_000)
    far = make_probe(**cuda, download_latency_s=0.3, download_bytes_per_s=5e6, api_round_trip_s=0.3)
    thin = make_probe(**cuda, download_latency_s=0.01, download_bytes_per_s=2e5, api_round_trip_s=0.01)
    near = make_probe(**{**cuda, "decode_s_per_image": 0.05}, download_latency_s=0.001, download_bytes_per_s=1e9,
                      api_round_trip_s=0.001)
    few = plan(download_threads=2, tasks_per_reserve=32)
    assert predict_rate(few, far).regime == "latency-bound"
    assert predict_rate(few, thin).regime == "bandwidth-bound"
    assert predict_rate(plan(), near).regime == "decode-bound"
    slow_model = make_probe(cuda=True, inference_per_image_s=0.5, decode_s_per_image=0.005)
    assert predict_rate(plan(), slow_model).regime == "inference-bound"
    assert "latency-bound" in predict_rate(few, far).describe()


def test_bounds_are_each_stage_alone(make_probe):
    """Decode: cores x one core's rate. Link: Little's law, connections / seconds per download.
    Inference: the model at the largest batch. No plan is predicted above the lowest."""
    probe = make_probe(cuda=True, cpu_count=2, decode_s_per_image=0.025, download_latency_s=0.3,
                       download_bytes_per_s=5e6, median_jpeg_bytes=1_000_000, inference_overhead_s=0.02,
                       inference_per_image_s=0.001)
    limits = bounds(probe, connections=32)
    assert limits.decode_images_per_s == pytest.approx(2 / 0.025)
    assert limits.link_images_per_s == pytest.approx(32 / (0.3 + 0.2))
    assert limits.inference_images_per_s == pytest.approx(64 / (probe.inference_s(64)))
    for candidate in (plan(), plan(num_workers=4, download_threads=8, tasks_per_reserve=8), plan(num_workers=1)):
        rate = predict_rate(candidate, probe).pipeline_images_per_s
        assert rate <= min(limits.decode_images_per_s, limits.inference_images_per_s,
                           bounds(probe, connections_in_flight(candidate)).link_images_per_s) * 1.0001
    text = "\n".join(limits.lines(probe))
    assert "80.0 images/s" in text and "64.0 images/s" in text and "32 connections" in text


def test_result_posts_cap_the_rate_on_a_far_server(make_probe):
    """One post per batch, max_pending_posts in flight, each a round trip: batch 1 against a
    300 ms server posts at most 5 / 0.3 images/s however fast the rest is; batch 8 lifts it."""
    probe = make_probe(cuda=True, inference_per_image_s=0.0001, decode_s_per_image=0.005, api_round_trip_s=0.3,
                       download_latency_s=0.3, download_bytes_per_s=50e6, max_pending_posts=5)
    one = predict_rate(plan(batch_size=1, download_threads=32), probe)
    assert one.pipeline_images_per_s == pytest.approx(5 / 0.3)
    assert one.bottleneck == "post" and one.regime == "post-bound"
    eight = predict_rate(plan(batch_size=8, download_threads=32), probe)
    assert eight.pipeline_images_per_s == pytest.approx(5 * 8 / 0.3)
    many = predict_rate(plan(batch_size=64, download_threads=32, tasks_per_reserve=64), probe)
    assert many.bottleneck != "post" and many.pipeline_images_per_s > eight.pipeline_images_per_s


def test_a_lane_at_prefetch_1_idles_for_the_main_process_turnaround(make_probe):
    # a decode-only job on 2 cores (null pipeline) whose image server shares the host: at prefetch
    # 1 each lane waits, every batch, for the main process to take it and ask for the next;
    # prefetch 2 hides that wait
    probe = make_probe(decode_s_per_image=0.03, inference_overhead_s=0.0, inference_per_image_s=1e-6,
                       inference_threads=1, download_latency_s=0.0, download_bytes_per_s=1e12,
                       api_round_trip_s=0.0, api_exchange_cpu_s=0.002, external_cpu_s_per_image=0.01,
                       cpu_count=2)
    shallow = predict_rate(plan(batch_size=4, tasks_per_reserve=16, prefetch_factor=1), probe)
    deep = predict_rate(plan(batch_size=4, tasks_per_reserve=16, prefetch_factor=2), probe)
    wait_s = handoff_wait_s(plan(batch_size=4), probe)
    # the main process's CPU for a batch at the 2/3 of a core it gets beside two decoding lanes
    assert wait_s == pytest.approx((0.002 + 4 * 0.0004 + 0.002) / (2 / 3))
    assert shallow.bottleneck == deep.bottleneck == "cpu"
    # the lanes' cores idle for the wait's share of their cycle: 4 decodes, then the wait
    assert shallow.pipeline_images_per_s / deep.pipeline_images_per_s == pytest.approx(
        4 * 0.03 / (4 * 0.03 + wait_s), rel=0.02)
    # no loader workers: the main process loads its own batches, nothing to wait for
    assert handoff_wait_s(plan(num_workers=0), probe) == 0.0
    assert handoff_cpu_s_per_image(plan(num_workers=0)) == 0.0


def test_one_process_loading_its_own_batches_pays_its_receiving_and_api_exchanges(make_probe):
    # with no loader workers the download threads' receiving and the API exchanges run in the
    # process that decodes and infers: their CPU adds to its time per image
    kwargs = dict(decode_s_per_image=0.025, inference_overhead_s=0.0, inference_per_image_s=0.001,
                  inference_threads=1, download_latency_s=0.0, download_bytes_per_s=1e12, api_round_trip_s=0.0)
    quiet = make_probe(**kwargs)
    busy = make_probe(**kwargs, download_cpu_s_per_image=0.01, api_exchange_cpu_s=0.004)
    one = plan(num_workers=0, batch_size=4, tasks_per_reserve=8, prefetch_factor=1)
    base = predict_rate(one, quiet).pipeline_images_per_s
    loaded = predict_rate(one, busy).pipeline_images_per_s
    assert 1 / loaded == pytest.approx(1 / base + 0.01 + 0.004 * (1 / 8 + 1 / 4), rel=1e-6)
    assert predict_rate(one, busy).bottleneck == "main_process"


def test_one_lane_decodes_at_most_one_image_per_decode_receive_and_handoff(make_probe):
    # a lane's download threads receive the bodies in the lane's own process, beside its decoder:
    # one lane on a fast link and idle cores runs at 1 / (decode + receive + its handoff share)
    probe = make_probe(decode_s_per_image=0.025, download_cpu_s_per_image=0.005, inference_overhead_s=0.0,
                       inference_per_image_s=1e-6, inference_threads=1, download_latency_s=0.0,
                       download_bytes_per_s=1e12, api_round_trip_s=0.0, cpu_count=4)
    lane = predict_rate(plan(num_workers=1, batch_size=8, tasks_per_reserve=64, download_threads=32), probe)
    step_s = 0.025 + 0.005 + LANE_HANDOFF_CPU_S_PER_BATCH / 8
    assert lane.loader_images_per_s <= 1 / step_s
    assert lane.loader_images_per_s == pytest.approx(1 / step_s, rel=0.05)


def test_inference_slows_by_its_threads_share_of_the_cores_beside_the_loading():
    # 22 images/s alone at 2 threads on 2 cores; the loading keeps 0.046 core-s per image runnable
    rate = contended_inference(22.0, threads=2, cores=2, load_core_s=0.046)
    assert rate < 22.0
    assert rate * (2 + rate * 0.046) == pytest.approx(22.0 * 2)  # r x (threads + r x l) = F x cores
    assert rate == pytest.approx(16.07, abs=0.01)
    # a core to spare for every runnable thread: nothing lost
    assert contended_inference(10.0, threads=1, cores=2, load_core_s=0.05) == 10.0
    assert contended_inference(22.0, threads=2, cores=2, load_core_s=0.0) == 22.0


def test_an_inference_bound_plan_on_cpu_is_priced_at_the_contended_rate(make_probe):
    # threads busy 1.45 of 2 on average (OpenMP threads sleep at barriers), as the probe measured
    probe = make_probe(decode_s_per_image=0.03, inference_overhead_s=0.0, inference_per_image_s=0.045,
                       inference_busy_threads=1.45,
                       download_latency_s=0.0, download_bytes_per_s=1e12, api_round_trip_s=0.0)
    candidate = plan(num_workers=1, batch_size=4, inference_threads=2)
    rate = predict_rate(candidate, probe)
    assert rate.bottleneck == "inference"
    load_core_s = (probe.loader_cpu_s_per_image() + probe.api_cpu_s_per_image(4, 4)
                   + handoff_cpu_s_per_image(candidate))
    expected = contended_inference(1 / probe.inference_s(4, 2) * 4, 2, probe.cpu_count, load_core_s)
    assert expected < 4 / probe.inference_s(4, 2)
    assert rate.inference_images_per_s == pytest.approx(expected)
