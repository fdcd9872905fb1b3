"""Planner properties: within budget, monotone in budget, pin only with CUDA, timeout-bounded reserves."""
from __future__ import annotations

import random

import pytest

from autotune.memory_model import predict_peak
from autotune.plan import MINIMAL_PLAN, LoaderPlan
from autotune.planner import (
    BATCH_SIZES,
    DOWNLOAD_THREADS,
    PREFETCH_FACTORS,
    TASKS_PER_RESERVE,
    TIE_TOLERANCE,
    PlanConstraints,
    budget_bytes,
    choose_plan,
    max_tasks_per_reserve,
    plan_options,
    price_plan,
    queue_wait_s,
)
from autotune.throughput_model import handoff_cpu_s_per_image, predict_rate

MiB = 1024 * 1024
GiB = 1024 * MiB


def constraints_for(probe, budget: int, **options) -> PlanConstraints:
    return PlanConstraints.from_probe(probe, budget, **options)


def allowed_reserve(plan: LoaderPlan, probe, constraints: PlanConstraints) -> int:
    rate = predict_rate(plan, probe)
    worker_rate = rate.pipeline_images_per_s / max(1, plan.num_workers)
    return max(1, max_tasks_per_reserve(worker_rate, constraints.reservation_timeout_s,
                                        constraints.timeout_margin, queue_wait_s(plan, rate)))


def random_probe(rng: random.Random, make_probe):
    width, height = rng.choice([(1024, 768), (2048, 1536), (4096, 3072), (6000, 4000)])
    jpeg = int(width * height * 3 * rng.uniform(0.05, 0.7))
    cuda = rng.random() < 0.5
    return make_probe(
        cuda=cuda, cpu_count=rng.randint(1, 4),
        median_width=width, max_width=width, median_height=height, max_height=height,
        decoded_bytes_per_image=width * height * 3, median_decoded_bytes=width * height * 3,
        median_jpeg_bytes=jpeg, max_jpeg_bytes=jpeg,
        download_latency_s=rng.uniform(0.0, 0.5), download_bytes_per_s=rng.uniform(3e5, 2e8),
        decode_s_per_image=rng.uniform(0.002, 0.2), inference_overhead_s=rng.uniform(0.0, 0.3),
        inference_per_image_s=rng.uniform(0.002, 0.5), api_round_trip_s=rng.uniform(0.0, 0.5),
        baseline_bytes=int(rng.uniform(0.3, 3.0) * GiB), reservation_timeout_s=rng.choice([30.0, 120.0, 300.0]),
    )


def test_budget_is_limit_minus_reserve_times_safety():
    assert budget_bytes(8 * GiB) == int(7 * GiB * 0.85)
    assert budget_bytes(8 * GiB, reserve_bytes=2 * GiB, safety_factor=0.5) == 3 * GiB
    assert budget_bytes(512 * MiB) == 0


def test_tasks_per_reserve_rule():
    assert max_tasks_per_reserve(2.0, 300.0) == 300  # 150 s x 2 images/s
    assert max_tasks_per_reserve(2.0, 300.0, timeout_margin=0.5, queue_wait_s=50.0) == 200
    assert max_tasks_per_reserve(0.5, 300.0, timeout_margin=0.25) == 37
    assert max_tasks_per_reserve(0.001, 300.0) == 0  # not even one fits
    assert max_tasks_per_reserve(5.0, 10.0, queue_wait_s=10.0) == 0


def test_no_plan_reserves_more_than_its_connections_or_a_batch_unless_pinned(make_probe, calibration):
    """Each lane's last reservation of a job is worked off alone: reserving past what keeps a lane's
    connections and one batch going lengthens that tail, for fewer API exchanges only."""
    rng = random.Random(20261201)
    for _ in range(25):
        probe = random_probe(rng, make_probe)
        constraints = constraints_for(probe, 8 * GiB)
        decision = choose_plan(probe, constraints, calibration)
        for plan in [decision.plan] + [o.plan for o in plan_options(probe, constraints, calibration)]:
            assert plan.tasks_per_reserve <= max(plan.batch_size, plan.download_threads), plan.describe()
    probe = make_probe(download_latency_s=0.3, download_bytes_per_s=5e6)
    pinned = choose_plan(probe, constraints_for(probe, 8 * GiB, pinned={"tasks_per_reserve": 128}), calibration)
    assert pinned.plan.tasks_per_reserve == 128 and pinned.plan.download_threads < 128


def test_random_probes_respect_budget_timeout_pin_and_monotonicity(make_probe, calibration):
    rng = random.Random(20261125)
    for _ in range(25):
        probe = random_probe(rng, make_probe)
        budgets = sorted(int(probe.baseline_bytes + rng.uniform(-0.5, 12) * GiB) for _ in range(4))
        previous_rate = 0.0
        for budget in budgets:
            constraints = constraints_for(probe, max(0, budget))
            decision = choose_plan(probe, constraints, calibration)
            plan = decision.plan
            if decision.fits:
                assert decision.memory.bound_bytes <= constraints.budget_bytes
                assert decision.memory == predict_peak(plan, probe, calibration, rate=decision.rate)
                assert decision.memory.bound_bytes == predict_peak(plan, probe, calibration).total_bytes
            else:
                assert plan == MINIMAL_PLAN
                assert decision.memory.bound_bytes > constraints.budget_bytes
            if not probe.cuda:
                assert not plan.pin_memory
            # what a loader worker holds (a reservation and the previous one's last downloads)
            assert plan.held_tasks <= allowed_reserve(plan, probe, constraints) or plan.tasks_per_reserve == 1
            rate = decision.rate.pipeline_images_per_s
            assert rate >= previous_rate * (1 - 1e-9), (budgets, probe)
            previous_rate = rate
            assert_no_sampled_plan_beats(decision, probe, constraints, calibration, rng)


def assert_no_sampled_plan_beats(decision, probe, constraints, calibration, rng) -> None:
    """Random grid plans that fit and respect the timeout are never faster by more than the tie tolerance than the choice."""
    if not decision.fits:
        return
    for _ in range(20):
        other = LoaderPlan(
            rng.choice(TASKS_PER_RESERVE), rng.choice(BATCH_SIZES), rng.randint(0, constraints.max_workers),
            rng.choice(PREFETCH_FACTORS), False, rng.choice(DOWNLOAD_THREADS),
        )
        if predict_peak(other, probe, calibration).total_bytes > constraints.budget_bytes:
            continue
        if other.held_tasks > allowed_reserve(other, probe, constraints) and other.tasks_per_reserve > 1:
            continue
        best = decision.rate.pipeline_images_per_s
        assert predict_rate(other, probe).pipeline_images_per_s <= best / (1 - TIE_TOLERANCE) + 1e-9


def test_no_pin_memory_without_cuda_even_when_copies_are_cheap(make_probe, calibration, large_images):
    probe = make_probe(cuda=False, **large_images)
    decision = choose_plan(probe, constraints_for(probe, 500 * GiB), calibration)
    assert not decision.plan.pin_memory
    assert "no CUDA" in " ".join(decision.reasons)


def test_pin_memory_when_cuda_copy_dominates_and_it_fits(make_probe, calibration, large_images):
    # inference-bound CUDA job whose host->device copy is most of the inference time
    probe = make_probe(**{**large_images, **dict(
        cuda=True, cpu_count=16, inference_overhead_s=0.0, inference_per_image_s=0.01,
        download_latency_s=0.0, download_bytes_per_s=1e10, decode_s_per_image=0.001,
    )})
    roomy = choose_plan(probe, constraints_for(probe, 200 * GiB), calibration)
    assert roomy.plan.pin_memory
    share_reason = [r for r in roomy.reasons if r.startswith("pin_memory on")]
    assert share_reason, roomy.reasons
    unhelpful = make_probe(cuda=True, inference_per_image_s=1.0)  # copy is ~0.3% of inference time
    assert not choose_plan(unhelpful, constraints_for(unhelpful, 200 * GiB), calibration).plan.pin_memory


def test_reserved_tasks_never_exceed_the_timeout(make_probe, calibration):
    slow = make_probe(inference_overhead_s=0.0, inference_per_image_s=1.0, api_round_trip_s=2.0)
    decision = choose_plan(slow, constraints_for(slow, 64 * GiB), calibration)
    allowed = allowed_reserve(decision.plan, slow, constraints_for(slow, 64 * GiB))
    assert decision.plan.held_tasks <= allowed
    assert decision.plan.tasks_per_reserve < max(TASKS_PER_RESERVE)
    tight = make_probe(inference_per_image_s=1.0, reservation_timeout_s=6.0)
    assert choose_plan(tight, constraints_for(tight, 64 * GiB), calibration).plan.tasks_per_reserve == 1


def test_pinned_fields_are_kept(make_probe, calibration):
    probe = make_probe()
    pinned = {"batch_size": 3, "num_workers": 2, "pin_memory": True, "tasks_per_reserve": 5000}
    decision = choose_plan(probe, constraints_for(probe, 64 * GiB, pinned=pinned), calibration)
    for name, value in pinned.items():
        assert getattr(decision.plan, name) == value
    assert any("pinned by the operator" in reason for reason in decision.reasons)
    assert any("exceeds what the reservation timeout allows" in reason for reason in decision.reasons)
    assert "pinned by the operator" in decision.log_line()


def test_pinned_fields_survive_the_minimal_fallback(make_probe, calibration):
    probe = make_probe()
    decision = choose_plan(probe, constraints_for(probe, 1, pinned={"batch_size": 6}), calibration)
    assert not decision.fits
    assert decision.plan.batch_size == 6
    assert decision.plan.num_workers == 0


def test_unknown_pinned_field_is_refused(make_probe):
    with pytest.raises(ValueError, match="batchsize"):
        constraints_for(make_probe(), GiB, pinned={"batchsize": 4})


def test_tiny_budget_gives_the_minimal_plan_and_says_by_how_much(make_probe, calibration):
    probe = make_probe(baseline_bytes=2 * GiB)
    decision = choose_plan(probe, constraints_for(probe, GiB), calibration)
    assert not decision.fits
    assert decision.plan == MINIMAL_PLAN
    assert decision.plan.source == "minimal"
    over_mib = (decision.memory.total_bytes - GiB) / MiB
    assert f"by {over_mib:.0f} MiB" in decision.reasons[0]
    assert "OVER BUDGET" in decision.log_line()


def test_large_images_at_4_gib_get_a_small_plan(make_probe, calibration, large_images):
    probe = make_probe(cuda=True, cpu_count=2, **large_images)
    decision = choose_plan(probe, constraints_for(probe, budget_bytes(4 * GiB)), calibration)
    plan = decision.plan
    assert decision.fits
    assert plan.batch_size <= 4 and plan.prefetch_factor == 1 and plan.num_workers <= 2
    adc = LoaderPlan(24, 24, 4, 4, True, 8)
    assert predict_peak(adc, probe, calibration).total_bytes > 4 * budget_bytes(4 * GiB)


def test_small_images_on_a_slow_network_get_more_concurrency(make_probe, calibration, large_images):
    gpu = dict(cuda=True, cpu_count=2, inference_overhead_s=0.02, inference_per_image_s=0.01)
    large = make_probe(**gpu, **large_images)
    slow_small = make_probe(**gpu, download_latency_s=0.3, download_bytes_per_s=1e6, api_round_trip_s=0.3)
    budget = budget_bytes(4 * GiB)
    large_plan = choose_plan(large, constraints_for(large, budget), calibration).plan
    small_plan = choose_plan(slow_small, constraints_for(slow_small, budget), calibration).plan

    def connections(plan: LoaderPlan) -> int:
        return max(1, plan.num_workers) * min(plan.download_threads, plan.tasks_per_reserve)

    assert connections(small_plan) >= 16
    assert connections(small_plan) > 2 * connections(large_plan)


def test_grid_size_is_bounded(make_probe, calibration):
    # 2 CPUs, no CUDA: workers 0..4 (prefetch 1 only without workers) x (batch, threads, reserve):
    # threads from 2 (1 when reserving one task) up to below the reserve, plus the smallest count
    # >= reserve where there is one; and no reserve above both the batch and the threads. About
    # 0.03 s here; the CUDA grid at 16 CPUs (9 worker counts, pin on and off) is the largest and
    # must stay under ~12k (about 0.15 s).
    probe = make_probe(cpu_count=2)
    decision = choose_plan(probe, constraints_for(probe, 8 * GiB), calibration)
    triples = sum(len([t for t in DOWNLOAD_THREADS if min(2, reserve) <= t < reserve and reserve <= max(batch, t)])
                  + any(t >= reserve for t in DOWNLOAD_THREADS)
                  for batch in BATCH_SIZES for reserve in TASKS_PER_RESERVE)
    assert decision.candidates_considered == (1 + 4 * 3) * triples == 13 * 84
    # a lane reserving two or more downloads on two connections or more, and reserves hold a batch
    # (the 300 s timeout allows it here)
    for plan in [decision.plan] + [o.plan for o in plan_options(probe, constraints_for(probe, 8 * GiB), calibration)]:
        assert plan.download_threads >= min(2, plan.tasks_per_reserve)
        assert plan.tasks_per_reserve >= plan.batch_size
    big = make_probe(cuda=True, cpu_count=16, inference_per_image_s=0.001)
    assert choose_plan(big, constraints_for(big, 64 * GiB), calibration).candidates_considered <= 12_000


def test_inference_threads_follow_where_the_cpu_goes(make_probe, calibration, large_images):
    timed = dict(inference_overhead_s=0.0, download_latency_s=0.0, download_bytes_per_s=1e9, api_round_trip_s=0.0)
    decode_heavy = make_probe(**{**large_images, "decode_s_per_image": 0.35}, inference_per_image_s=0.084,
                              single_thread_inference_s=0.1, **timed)
    inference_heavy = make_probe(decode_s_per_image=0.02, inference_per_image_s=0.08,
                                 single_thread_inference_s=0.14, **timed)
    heavy = choose_plan(decode_heavy, constraints_for(decode_heavy, 8 * GiB), calibration)
    light = choose_plan(inference_heavy, constraints_for(inference_heavy, 8 * GiB), calibration)
    assert heavy.plan.inference_threads == 1
    assert light.plan.inference_threads == 2
    assert any(reason.startswith("inference_threads 1: loading takes") for reason in heavy.reasons)
    assert heavy.candidates_considered == 2 * 13 * 84  # one thread and the default, each timed
    # CUDA, or no one-thread timing: the default only; an operator's OMP_NUM_THREADS is kept
    cuda = make_probe(cuda=True, **{**large_images, "decode_s_per_image": 0.35}, single_thread_inference_s=0.1)
    assert choose_plan(cuda, constraints_for(cuda, 8 * GiB), calibration).plan.inference_threads == 2
    untimed = make_probe(**{**large_images, "decode_s_per_image": 0.35}, **timed)
    assert choose_plan(untimed, constraints_for(untimed, 8 * GiB), calibration).plan.inference_threads == 2
    pinned = choose_plan(decode_heavy, constraints_for(decode_heavy, 8 * GiB, pinned={"inference_threads": 2}),
                         calibration)
    assert pinned.plan.inference_threads == 2
    assert any("as pinned by the operator (OMP_NUM_THREADS)" in reason for reason in pinned.reasons)


def test_plan_options_form_a_pareto_front(make_probe, calibration):
    probe = make_probe(download_latency_s=0.3, download_bytes_per_s=1e6)
    options = plan_options(probe, constraints_for(probe, 0), calibration)
    assert len(options) >= 3
    for smaller, larger in zip(options, options[1:]):
        assert larger.predicted_peak_bytes >= smaller.predicted_peak_bytes
        assert larger.predicted_images_per_s > smaller.predicted_images_per_s


def test_log_line_is_one_line_with_the_numbers(make_probe, calibration):
    probe = make_probe()
    decision = choose_plan(probe, constraints_for(probe, 8 * GiB), calibration)
    line = decision.log_line()
    assert "\n" not in line
    assert decision.plan.describe() in line
    assert f"{decision.memory.total_bytes / MiB:.0f} MiB" in line
    assert f"{decision.rate.pipeline_images_per_s:.2f} images/s" in line
    assert decision.plan.source == "autotune"


def test_price_plan_says_how_far_the_current_settings_are_over(make_probe, calibration, large_images):
    probe = make_probe(cuda=True, **large_images)
    constraints = constraints_for(probe, budget_bytes(4 * GiB))
    adc = LoaderPlan(24, 24, 4, 4, True, 8, tensor_dtype="float32")
    priced = price_plan(adc, probe, constraints, calibration)
    assert not priced.fits
    over_mib = (priced.memory.total_bytes - constraints.budget_bytes) / MiB
    assert f"by {over_mib:.0f} MiB" in priced.reasons[0]
    chosen = choose_plan(probe, constraints, calibration)
    assert price_plan(chosen.plan, probe, constraints, calibration).fits


def test_costly_api_exchanges_buy_bigger_batches_when_inference_is_cheap(make_probe, calibration):
    decode_only = dict(decode_s_per_image=0.05, inference_overhead_s=0.0, inference_per_image_s=1e-6,
                       inference_threads=1, download_latency_s=0.0, download_bytes_per_s=1e12, api_round_trip_s=0.0)
    free = make_probe(**decode_only)
    costly = make_probe(**decode_only, api_exchange_cpu_s=0.01)
    # free exchanges leave the handoff of each batch (4.8 ms, autotune.throughput_model): the
    # batch grows until what it saves is within the tie tolerance, then the smallest peak wins
    free_plan = choose_plan(free, constraints_for(free, 8 * GiB), calibration).plan
    handoff = handoff_cpu_s_per_image(free_plan)
    assert handoff - handoff_cpu_s_per_image(free_plan.with_changes(batch_size=64)) <= 0.02 * 0.05
    plan = choose_plan(costly, constraints_for(costly, 8 * GiB), calibration).plan
    assert plan.batch_size >= free_plan.batch_size and plan.tasks_per_reserve > free_plan.tasks_per_reserve
    # at batch b and reserve r, exchanges add 0.01 x (1/r + 1/b) to 0.05 core-s per image: the
    # plan's share stays within the 5% tie tolerance of the cheapest (b1 r2 paid 0.015, +30%)
    assert plan.batch_size >= 4 and plan.tasks_per_reserve >= plan.batch_size
    assert costly.api_cpu_s_per_image(plan.tasks_per_reserve, plan.batch_size) <= 0.06 * 0.05


def test_on_cpu_no_batch_past_what_the_probe_timed(make_probe, calibration):
    # a large per-batch overhead would buy the biggest batch if the fit were extrapolated
    probe = make_probe(inference_overhead_s=0.2, inference_per_image_s=0.05, max_timed_batch=3)
    decision = choose_plan(probe, constraints_for(probe, 16 * GiB), calibration)
    assert decision.plan.batch_size == 4  # 3 rounded up to the next candidate: the biggest allowed
    options = plan_options(probe, constraints_for(probe, 16 * GiB), calibration)
    assert max(option.plan.batch_size for option in options) == 4
    unknown = make_probe(inference_overhead_s=0.2, inference_per_image_s=0.05)  # max_timed_batch 0
    assert choose_plan(unknown, constraints_for(unknown, 16 * GiB), calibration).plan.batch_size > 4
    cuda = make_probe(cuda=True, inference_overhead_s=0.2, inference_per_image_s=0.05, max_timed_batch=3)
    assert choose_plan(cuda, constraints_for(cuda, 16 * GiB), calibration).plan.batch_size > 4
    pinned = constraints_for(probe, 16 * GiB, pinned={"batch_size": 16})
    assert choose_plan(probe, pinned, calibration).plan.batch_size == 16  # the operator's pin wins


def test_on_cpu_batches_grow_past_the_timed_one_when_inference_is_a_minor_cost(make_probe, calibration):
    # the null pipeline: nothing to infer, each image's cost is its loading; the handoff and the
    # result post per batch are what a bigger batch saves, and the model's working set is no risk
    probe = make_probe(decode_s_per_image=0.03, inference_overhead_s=0.0001, inference_per_image_s=1e-6,
                       inference_threads=1, download_latency_s=0.0, download_bytes_per_s=1e12,
                       api_round_trip_s=0.0, api_exchange_cpu_s=0.003, max_timed_batch=3)
    decision = choose_plan(probe, constraints_for(probe, 8 * GiB), calibration)
    assert decision.plan.batch_size > 4
    assert max(option.plan.batch_size for option in plan_options(probe, constraints_for(probe, 8 * GiB),
                                                                 calibration)) > 4
    # a model whose inference is a real share of the work keeps the cap (see the test above)
    costly = make_probe(decode_s_per_image=0.03, inference_overhead_s=0.01, inference_per_image_s=0.01,
                        inference_threads=1, download_latency_s=0.0, download_bytes_per_s=1e12,
                        api_round_trip_s=0.0, api_exchange_cpu_s=0.003, max_timed_batch=3)
    assert choose_plan(costly, constraints_for(costly, 8 * GiB), calibration).plan.batch_size <= 4


def test_a_loader_bound_plan_is_held_to_its_full_queue_bound_and_reports_its_expected_peak(make_probe, calibration):
    """The null pipeline's stand-in (inference far faster than decoding): the loader workers'
    queues stay short, so the predicted peak counts what each worker holds; the budget is still
    checked against every queue full, since a main process that stalls lets them fill."""
    probe = make_probe(cuda=True, inference_per_image_s=0.002, inference_overhead_s=0.0)
    roomy = choose_plan(probe, constraints_for(probe, 16 * GiB), calibration)
    assert roomy.memory.bound_bytes > roomy.memory.total_bytes
    assert "bound" in roomy.log_line()
    between = (roomy.memory.total_bytes + roomy.memory.bound_bytes) // 2
    tight = constraints_for(probe, between)
    assert not price_plan(roomy.plan, probe, tight, calibration).fits  # the expected peak fits, the bound does not
    chosen = choose_plan(probe, tight, calibration)
    assert chosen.plan != roomy.plan and chosen.memory.bound_bytes <= tight.budget_bytes
