"""Autotune in the worker: the probe posts its tasks, one plan line with numbers, pins win,
AMI_AUTOTUNE=false keeps the settings plan, correction and advisory are written after a job.

All against the real local Antenna server over loopback, with tiny images.
"""
from __future__ import annotations

import json
import logging
import os
import re
from multiprocessing import shared_memory

import pytest
import torch

from autotune.plan import LoaderPlan
from watchdog.limits import find_cgroup
from watchdog.sampler import sample_tree
from worker.app import build_worker
from worker.hooks import Middleware
from worker.middleware import build_middlewares
from worker.middleware.autotune import TuningMiddleware, observed_bytes
from worker.planning import ForcedPlanner, SettingsPlanner, benchmark_plan, build_planner, pinned_fields
from worker.probing import api_exchange_cpu_s, host_busy_cpu_s, is_this_host
from worker.settings import SettingsError

PIPELINE = "synthetic-moths"


def run_burst(settings):
    worker = build_worker(settings, burst=True)
    assert worker.run() == 0
    return worker


def plan_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "autotune plan:" in r.getMessage()]


def loader_plans(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if ": loader plan " in r.getMessage()]


@pytest.mark.timeout(120)
def test_probe_tasks_get_results_and_the_plan_is_logged_once_with_numbers(antenna, settings_for, tiny_images, caplog):
    job_id = antenna.add_job(tiny_images[:12], PIPELINE)
    settings = settings_for(antenna, autotune=True, antenna_pipelines=PIPELINE, autotune_probe_tasks=3)
    caplog.set_level(logging.INFO)
    run_burst(settings)

    report = antenna.report(job_id)
    assert (report.results_ok, report.results_error, report.lost, report.redeliveries) == (12, 0, 0, 0)
    probe_reserve = antenna.reservations[0]
    assert probe_reserve["batch_size"] == 3 and len(probe_reserve["task_ids"]) == 3
    posted = {item["reply_subject"] for post in antenna.result_posts for item in post["results"]}
    assert len(posted) == 12  # the probed tasks' results are among them, posted once each
    lines = plan_lines(caplog)
    assert len(lines) == 1
    line = lines[0]
    for needle in ("predicted peak", "MiB of budget", "images/s", "probe 3 images", "decode", "baseline",
                   "no knob pinned by the operator", "source=autotune"):
        assert needle in line, needle
    # the server is on loopback: its share of the reserve round trip is this host's CPU too
    assert float(re.search(r"; ([\d.]+) core-s per API exchange", line).group(1)) > 0
    assert "source=autotune" in loader_plans(caplog)[0]


@pytest.mark.timeout(120)
def test_failed_probe_images_become_error_results(antenna, settings_for, tiny_images):
    images = tiny_images[:3]  # the probe reserves all three: the failure happens inside it
    job_id = antenna.add_job(images, PIPELINE, image_faults={images[0].image_id: "corrupt"})
    run_burst(settings_for(antenna, autotune=True, antenna_pipelines=PIPELINE, autotune_probe_tasks=3))
    report = antenna.report(job_id)
    assert (report.results_ok, report.results_error, report.lost) == (2, 1, 0)
    assert len(antenna.reservations[0]["task_ids"]) == 3


@pytest.mark.timeout(120)
def test_operator_pins_win_and_are_named_in_the_log(antenna, settings_for, tiny_images, caplog):
    antenna.add_job(tiny_images[:8], PIPELINE)
    settings = settings_for(antenna, autotune=True, antenna_pipelines=PIPELINE, antenna_api_batch_size=5,
                            antenna_api_dataloader_prefetch_factor=3, antenna_api_dataloader_num_workers=0)
    assert pinned_fields(settings, cuda=False) == {
        "tasks_per_reserve": 5, "batch_size": 5, "prefetch_factor": 3, "num_workers": 0}
    caplog.set_level(logging.INFO)
    run_burst(settings)
    line = plan_lines(caplog)[0]
    assert "tasks_per_reserve=5 batch_size=5 num_workers=0 prefetch_factor=3" in line
    assert "pinned by the operator: batch_size=5, num_workers=0, prefetch_factor=3, tasks_per_reserve=5" in line


@pytest.mark.timeout(30)
def test_pin_memory_pinned_on_cpu_means_off():
    from worker.settings import load_settings

    settings = load_settings(env_file=None, antenna_api_dataloader_pin_memory=True)
    assert pinned_fields(settings, cuda=False) == {"pin_memory": False}
    assert pinned_fields(settings, cuda=True) == {"pin_memory": True}


@pytest.mark.timeout(120)
def test_autotune_false_keeps_the_settings_plan(antenna, settings_for, tiny_images, caplog):
    job_id = antenna.add_job(tiny_images[:6], PIPELINE)
    settings = settings_for(antenna, autotune=False, antenna_pipelines=PIPELINE, antenna_api_batch_size=2,
                            antenna_api_dataloader_num_workers=0)
    assert isinstance(build_planner(settings), SettingsPlanner)
    assert not any(isinstance(m, TuningMiddleware) for m in build_middlewares(settings, build_planner(settings), {}))
    caplog.set_level(logging.INFO)
    run_burst(settings)
    assert plan_lines(caplog) == []
    assert all("source=settings" in line for line in loader_plans(caplog))
    assert antenna.reservations[0]["batch_size"] == 2  # no probe reserve of 3
    assert antenna.report(job_id).results_ok == 6


@pytest.mark.timeout(120)
def test_correction_and_advisory_are_written_after_a_job(antenna, settings_for, tiny_images):
    antenna.add_job(tiny_images[:8], PIPELINE)
    settings = settings_for(antenna, autotune=True, antenna_pipelines=PIPELINE)
    run_burst(settings)
    store = json.loads((settings.user_data_path / "autotune" / "memory_corrections.json").read_text())
    entry = store["pipelines"][PIPELINE]
    assert entry["jobs"] == 1 and 0.5 <= entry["correction"] <= 3.0
    advisories = sorted((settings.user_data_path / "advisories").glob("memory-advisory_*"))
    assert {p.suffix for p in advisories} == {".json", ".txt"}
    advisory = json.loads(next(p for p in advisories if p.name.endswith(".json") and ".plan." not in p.name).read_text())
    assert advisory["peak_bytes"] > 100 * 1024 * 1024  # a process with torch and a model loaded
    assert advisory["predicted_bytes"] > 0 and advisory["plan"]["source"] == "autotune"
    text = next(p for p in advisories if p.suffix == ".txt").read_text()
    assert "Pre-run" in text and "Post-run" in text and "conservative" in text
    # What the probe measured beyond sizes and seconds: receiving CPU, the loopback server's CPU
    # (the images came from this host), one-thread inference where torch runs more by default.
    probe = json.loads(next(p for p in advisories if p.name.endswith(".plan.json")).read_text())["probe"]
    assert probe["download_cpu_s_per_image"] > 0
    assert probe["inference_threads"] == torch.get_num_threads()
    if torch.get_num_threads() > 1:
        assert probe["single_thread_inference_s"] > 0 and probe["single_thread_batch_size"] == 3
    # measured, not assumed: between one thread and all of them (clamped), from CPU over wall
    assert 1.0 <= probe["inference_busy_threads"] <= torch.get_num_threads()
    assert probe["max_timed_batch"] == 3  # the sample as one batch
    record = json.loads(next(p for p in advisories if p.name.endswith(".plan.json")).read_text())
    # the probed tasks' own inference and post are part of the probe's wall, not of its overhead
    assert 0 < record["probe_overhead_s"] < record["probe_wall_s"]


class ThreadsSeen(Middleware):
    """Records torch's intra-op thread count while each batch is handled."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def after_batch(self, worker, ctx, batch, results) -> None:
        self.seen.append(torch.get_num_threads())


@pytest.mark.timeout(120)
def test_the_plan_sets_inference_threads_for_its_job_and_the_default_comes_back(antenna, settings_for, tiny_images):
    default = torch.get_num_threads()
    if default < 2:
        pytest.skip("torch runs one intra-op thread here: nothing to lower")
    antenna.add_job(tiny_images[:6], PIPELINE)
    seen = ThreadsSeen()
    plan = LoaderPlan(2, 2, 1, 1, False, 2, "uint8", "benchmark", inference_threads=1)
    worker = build_worker(settings_for(antenna, antenna_pipelines=PIPELINE), burst=True,
                          middlewares=[seen], planner=ForcedPlanner(plan))
    assert worker.run() == 0
    assert seen.seen == [1, 1, 1]
    assert torch.get_num_threads() == default


def test_host_cpu_and_whether_images_come_from_this_host(tmp_path):
    stat = tmp_path / "stat"
    ticks = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal: idle, iowait and steal are not busy time
    stat.write_text(f"cpu  {2 * ticks} {ticks} {3 * ticks} 999999 5000 {ticks} {ticks} 7000 0 0\ncpu0 1 2 3\n")
    assert host_busy_cpu_s(stat) == pytest.approx(8.0)
    assert host_busy_cpu_s(tmp_path / "missing") == -1.0
    assert is_this_host("http://127.0.0.1:8000/media/a.jpg")
    assert is_this_host("http://localhost/a.jpg")
    assert not is_this_host("http://192.0.2.7/a.jpg")  # TEST-NET-1: documentation, never this host
    assert not is_this_host("not a url")


def test_an_api_exchange_costs_the_client_and_a_local_server():
    assert api_exchange_cpu_s(0.005, 0.003, local_server=True) == pytest.approx(0.005)  # the rest of the round trip
    assert api_exchange_cpu_s(0.300, 0.003, local_server=True) == pytest.approx(0.006)  # a slow link's wait is no CPU
    assert api_exchange_cpu_s(0.080, 0.003, local_server=False) == 0.003  # a remote server's time is not ours
    assert api_exchange_cpu_s(0.002, 0.003, local_server=True) == 0.003  # never below the client's CPU


@pytest.mark.timeout(30)
def test_benchmark_plan_env_forces_a_full_plan_and_rejects_garbage(settings_for, antenna, monkeypatch):
    def from_env(text):
        if text is None:
            monkeypatch.delenv("AMI_BENCHMARK_PLAN_JSON", raising=False)
        else:
            monkeypatch.setenv("AMI_BENCHMARK_PLAN_JSON", text)
        return settings_for(antenna)

    settings = from_env(json.dumps({
        "tasks_per_reserve": 24, "batch_size": 24, "num_workers": 4, "prefetch_factor": 4,
        "pin_memory": False, "download_threads": 8, "tensor_dtype": "float32"}))
    plan = benchmark_plan(settings)
    assert plan is not None and plan.tensor_dtype == "float32" and plan.source == "benchmark"
    assert isinstance(build_planner(settings), ForcedPlanner) and build_planner(settings).forced == plan
    assert benchmark_plan(from_env(None)) is None
    with pytest.raises(SettingsError, match="AMI_BENCHMARK_PLAN_JSON"):
        benchmark_plan(from_env('{"batch_size": 0}'))


@pytest.mark.timeout(120)
def test_with_sleeping_openmp_threads_the_probe_times_no_single_thread_batch(antenna, settings_for, tiny_images,
                                                                              monkeypatch):
    """The worker command's default OMP_WAIT_POLICY=PASSIVE: no one-thread batch is run and, the
    pipeline's per-batch cost being measured at start, no image is timed alone: the sample's own
    batch (posted as results) gives the per-image cost. The plan keeps torch's count."""
    import worker.planning
    import worker.probing

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    # The start-up figure is measured (tests/worker/test_pipeline.py); fixed here, since the
    # reference pipeline's is a few ms and can measure 0 on a busy machine (then every sampled
    # image is timed alone instead). The real time_sample is counted, not replaced.
    monkeypatch.setattr(worker.probing, "overhead_floor", lambda pipeline: 0.02)
    monkeypatch.setattr(worker.planning, "overhead_floor", lambda pipeline: 0.02)
    timed_alone = []
    real_time_sample = worker.probing.time_sample
    monkeypatch.setattr(worker.probing, "time_sample",
                        lambda *args, **kwargs: timed_alone.append(args) or real_time_sample(*args, **kwargs))
    fitted = []  # (the timings the probe took, what the fit was given)
    real_median = worker.probing.median_of_repeats
    monkeypatch.setattr(worker.probing, "median_of_repeats",
                        lambda samples, *args: fitted.append((list(samples), real_median(samples, *args))) or fitted[-1][1])
    antenna.add_job(tiny_images[:6], PIPELINE)
    settings = settings_for(antenna, autotune=True, antenna_pipelines=PIPELINE)
    worker = build_worker(settings, burst=True, environ=dict(os.environ))
    assert worker.run() == 0
    assert timed_alone == []
    advisories = sorted((settings.user_data_path / "advisories").glob("*.plan.json"))
    record = json.loads(advisories[0].read_text())
    assert record["probe"]["single_thread_inference_s"] == 0.0
    assert record["decision"]["plan"]["inference_threads"] == torch.get_num_threads()
    assert record["probe"]["sample_count"] == 3 and record["probe"]["inference_busy_threads"] >= 1.0
    # one batch size timed in the job (3), the per-batch cost from the start-up measurement
    assert record["probe"]["max_timed_batch"] == 3
    assert record["probe"]["inference_overhead_s"] == 0.02
    assert any("measured at start" in note for note in record["probe"]["notes"])
    # the sample batch timed again before the loop (once or twice: a second repeat only within the
    # budget, which a busy host's first timing can use up) and once in it: the fit gets the median
    (timings, given), = fitted
    assert len(timings) in (2, 3)
    assert [(sample.batch_size, sample.threads) for sample in timings] == [(3, torch.get_num_threads())] * len(timings)
    median_s = sorted(sample.seconds for sample in timings)[(len(timings) - 1) // 2]
    assert [sample.seconds for sample in given] == [median_s]
    assert record["probe"]["inference_per_image_s"] == pytest.approx(max(0.0, median_s - 0.02) / 3)


def test_the_sample_batch_is_timed_again_only_within_its_budget(tiny_images):
    """``time_repeats`` times the sample as one batch (nothing posted) at most ``repeats`` times,
    and makes no further timing once one more like the longest would pass the budget."""
    from worker.imaging import decode
    from worker.loading import LoadedImage
    from worker.pipelines import load_pipeline, warm_up
    from worker.probing import median_of_repeats, time_repeats
    from worker.schema import Task
    from autotune import InferenceSample

    pipeline = load_pipeline(PIPELINE, torch.device("cpu"))
    items = [LoadedImage(Task(id=str(n), image_id=str(n), image_url=f"http://example.invalid/{n}.jpg",
                              reply_subject=f"r{n}"),
                         decode(bytearray(image.path.read_bytes()), max_pixels=80_000_000).tensor, None)
             for n, image in enumerate(tiny_images[:2])]
    warm_up(pipeline, items[0].image)
    assert len(time_repeats(pipeline, items, PIPELINE, repeats=2, budget_s=60.0)) == 2
    assert len(time_repeats(pipeline, items, PIPELINE, repeats=5, budget_s=60.0)) == 5
    once = time_repeats(pipeline, items, PIPELINE, repeats=2, budget_s=0.0)
    assert len(once) == 1 and once[0].batch_size == 2 and once[0].seconds > 0 and once[0].cpu_s > 0
    # the median replaces only the whole sample's timings at the default threads
    alone = [InferenceSample(1, 0.5, threads=2), InferenceSample(1, 0.7, threads=2)]
    whole = [InferenceSample(2, s, threads=2) for s in (0.9, 0.3, 0.4)]
    one_thread = InferenceSample(2, 0.6, threads=1)
    assert median_of_repeats(alone + whole + [one_thread], 2, 2) == alone + [one_thread, whole[2]]
    assert median_of_repeats(alone + whole[:1], 2, 2) == alone + whole[:1]


class HookOrder(Middleware):
    """Records the hooks the loop calls, with the plan each one saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def on_job_start(self, worker, ctx) -> None:
        self.calls.append(("on_job_start", ctx.plan))

    def on_loader_start(self, worker, ctx) -> None:
        self.calls.append(("on_loader_start", ctx.plan.source))

    def after_batch(self, worker, ctx, batch, results) -> None:
        self.calls.append(("after_batch", None if ctx.plan is None else ctx.plan.source))


@pytest.mark.timeout(180)
def test_planning_is_a_loop_step_and_an_autotuned_job_counts_one_plan_change(antenna, settings_for, tiny_images):
    """Every on_job_start runs before the probe's batch reaches after_batch; the plan is written once,
    by the loop, after that batch; antenna_worker_plan_changes_total{source="autotune"} counts one per job."""
    import socket

    from worker import metrics
    from worker.middleware.prometheus import MetricsMiddleware

    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    antenna.add_job(tiny_images[:6], PIPELINE)
    antenna.add_job(tiny_images[6:12], PIPELINE)
    order = HookOrder()
    changes = metrics.plan_changes.labels(source="autotune")
    before = changes._value.get()
    settings = settings_for(antenna, autotune=True, antenna_pipelines=PIPELINE)
    worker = build_worker(settings, burst=True, middlewares=[order, MetricsMiddleware(f"127.0.0.1:{port}")])
    assert worker.run() == 0
    assert changes._value.get() - before == 2
    for job_start in [i for i, (hook, _) in enumerate(order.calls) if hook == "on_job_start"]:
        job_calls = order.calls[job_start:]
        assert job_calls[0] == ("on_job_start", None)
        assert job_calls[1] == ("after_batch", None)  # the probe's tasks, through the loop's batch path
        assert job_calls[2] == ("on_loader_start", "autotune")


@pytest.mark.timeout(180)
def test_a_job_the_probe_cannot_sample_gets_the_last_measured_plan_else_the_minimal_one(antenna, settings_for,
                                                                                        tiny_images, caplog):
    """Every task out with another worker: the probe gets []. With nothing measured yet the plan is
    the minimal plan, never the settings' (ADC's 24/4/prefetch 4); after a measured job of the
    same pipeline, that job's plan. No loader is built for such a job: its reserve said nothing is
    deliverable now, and the next poll probes again (before, every idle poll started and stopped
    a loader and its worker processes for it)."""
    from worker.antenna import AntennaClient, JobRef
    from tests.conftest import TOKEN

    busy_first = antenna.add_job(tiny_images[:4], PIPELINE)
    measured = antenna.add_job(tiny_images[4:10], PIPELINE)
    busy_later = antenna.add_job(tiny_images[10:14], PIPELINE)
    other_worker = AntennaClient(antenna.base_url, TOKEN)
    assert len(other_worker.reserve_tasks(busy_first, 10)) == 4
    assert len(other_worker.reserve_tasks(busy_later, 10)) == 4
    worker = build_worker(settings_for(antenna, autotune=True, antenna_pipelines=PIPELINE), burst=True,
                          middlewares=[])
    caplog.set_level(logging.DEBUG, logger="worker")
    plans = []
    for job_id in (busy_first, measured, busy_later):
        worker.process_job(JobRef(id=job_id, pipeline_slug=PIPELINE))
        chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job {job_id}: ")
                  and ("autotune probe got 0 tasks" in r.getMessage() or ": loader plan " in r.getMessage())]
        plans.append(chosen[-1].split("plan ", 1)[1] if "loader plan" in chosen[-1] else chosen[-1].split("plan ")[-1])
    assert "source=minimal" in plans[0] and "tasks_per_reserve=1 " in plans[0]
    assert "source=autotune" in plans[1] and "source=settings" not in "".join(plans)
    assert plans[2] == plans[1]
    assert antenna.report(measured).results_ok == 6
    assert [line.split(":")[0] for line in loader_plans(caplog)] == [f"job {measured}"]


def test_the_observed_peak_counts_a_mapped_and_touched_shared_segment_once_under_a_cgroup():
    """Under an owned cgroup the correction learns from the tree's PSS less shmem plus each
    /dev/shm segment: a loader's reused image buffers are mapped and touched, so PSS alone
    already holds them, and PSS plus the segments counted them twice (a job of small images
    learned x1.26 where the meter saw its prediction)."""
    cgroup = find_cgroup(pid=os.getpid())
    if cgroup is None:
        pytest.skip("no memory cgroup to read")
    size = 64 * 1024 * 1024
    before = sample_tree(os.getpid(), cgroup=cgroup)
    block = shared_memory.SharedMemory(create=True, size=size)
    try:
        block.buf[:] = b"\x01" * size  # every page written through this process's mapping
        during = sample_tree(os.getpid(), cgroup=cgroup)
    finally:
        block.close()
        block.unlink()
    assert during.cgroup_usage_bytes is not None
    assert during.shm_bytes - before.shm_bytes == size
    assert abs(observed_bytes(during) - observed_bytes(before) - size) < 8 * 1024 * 1024
