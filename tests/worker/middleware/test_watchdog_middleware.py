"""WatchdogMiddleware against a real Loader (real DataLoader workers) and the real local server.

The governor is fed made-up snapshots (limit 1000 MiB: low water 550, soft cap 700, hard cap 850)
from a driver middleware at chosen batches, on a made-up clock, so every decision is deterministic;
what is measured is what the live loader and the server saw.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest

from autotune.plan import LoaderPlan
from watchdog.limits import MIB, Limits
from watchdog.sampler import MemorySnapshot
from worker import metrics
from worker.planning import ForcedPlanner
from worker.app import build_worker
from worker.middleware.watchdog import WatchdogMiddleware
from worker.hooks import JobContext, Middleware
from worker.ingest import ABANDON

LIMITS = Limits(mem_total_bytes=1000 * MIB)
SOFT, HARD, BAND, LOW = 750 * MIB, 900 * MIB, 600 * MIB, 400 * MIB


def snap(taken_at_s: float, used_bytes: int) -> MemorySnapshot:
    return MemorySnapshot(
        taken_at_s=taken_at_s, used_bytes=used_bytes, tree_pss_bytes=used_bytes, tree_rss_bytes=used_bytes,
        process_count=3, mem_available_bytes=0, open_fds=10, shm_bytes=0, tree_private_bytes=used_bytes,
    )


def knobs(ctx: JobContext) -> tuple[int, int, bool]:
    control = ctx.loader.control
    return control.tasks_per_reserve.value, control.prefetch_depth.value, bool(control.admit.value)


@dataclass(frozen=True)
class Seen:
    """What the loader showed right after one decision was applied."""

    action: str
    knobs: tuple[int, int, bool]
    reservations: int
    rebuild_requested: bool
    stop: int


@dataclass
class Driver(Middleware):
    """Its ``plan`` is forced on each job (``make_worker``); after batch N it feeds ``script[N]``'s snapshots to the guard
    (after loader start number K: ``on_loader[K]``); records what the loader shows right after."""

    guard: WatchdogMiddleware
    plan: LoaderPlan
    script: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    on_loader: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    probe: Optional[Callable[[JobContext], None]] = None
    seen: list[Seen] = field(default_factory=list)
    plans: list[str] = field(default_factory=list)
    batches: int = 0
    server: object = None

    def on_loader_start(self, worker, ctx: JobContext) -> None:
        self.plans.append(ctx.plan.source)
        self._feed(ctx, self.on_loader.get(len(self.plans), []))

    def after_batch(self, worker, ctx: JobContext, batch, results) -> None:
        self.batches += 1
        if self.probe is not None:
            self.probe(ctx)
        self._feed(ctx, self.script.get(self.batches, []))

    def _feed(self, ctx: JobContext, steps: list[tuple[float, int]]) -> None:
        for taken_at_s, used_bytes in steps:
            decision = self.guard.observe(snap(taken_at_s, used_bytes))
            self.seen.append(Seen(decision.action, knobs(ctx), len(self.server.reservations),
                                  ctx.rebuild_reason is not None, ctx.loader.control.stop.value))


def make_worker(settings, guard: WatchdogMiddleware, driver: Driver):
    worker = build_worker(settings, burst=True, middlewares=[driver, guard], planner=ForcedPlanner(driver.plan))
    worker.limits = LIMITS  # the governor's caps come from here, not from this machine
    worker.sampler = None  # only the driver's snapshots reach the governor
    return worker


def plan(**changes) -> LoaderPlan:
    base = LoaderPlan(tasks_per_reserve=4, batch_size=2, num_workers=2, prefetch_factor=4,
                      pin_memory=False, download_threads=2)
    return base.with_changes(**changes)


def action_count(action: str) -> float:
    return metrics.REGISTRY.get_sample_value("antenna_worker_watchdog_actions_total", {"action": action}) or 0.0


@pytest.mark.timeout(180)
def test_shrink_pause_resume_grow_reach_the_live_loader_and_bound_each_reserve(
        antenna, settings_for, tiny_images, caplog):
    job = antenna.add_job(tiny_images[:32], "synthetic-moths")
    settings = settings_for(antenna)
    guard = WatchdogMiddleware(settings)
    driver = Driver(guard, plan(), server=antenna, script={
        1: [(0.0, SOFT)],                     # shrink (4, 4) -> (2, 2)
        3: [(10.0, HARD), (10.5, BAND)],      # pause (and shrink to (1, 1)), then resume
        5: [(20.0, LOW)],                     # grow to (2, 2)
        6: [(30.0, LOW)],                     # grow to (3, 3)
    })
    shrinks_before = action_count("shrink")
    with caplog.at_level(logging.INFO, logger="watchdog.governor"):
        assert make_worker(settings, guard, driver).run() == 0
    assert [(seen.action, seen.knobs) for seen in driver.seen] == [
        ("shrink", (2, 2, True)), ("pause", (1, 1, False)), ("resume", (1, 1, True)),
        ("grow", (2, 2, True)), ("grow", (3, 3, True)),
    ]
    assert [d.action for d in guard.decisions] == ["shrink", "pause", "resume", "grow", "grow"]
    report = antenna.report(job)
    assert (report.results_ok, report.lost, report.redeliveries) == (32, 0, 0)
    # Each loader worker reads tasks_per_reserve at each reserve: after a decision (and one
    # reserve per worker already under way) no reserve asks for more than the knob allowed.
    sizes = [r["batch_size"] for r in antenna.reservations if r["job_id"] == job]
    windows = [(seen.reservations, seen.knobs[0]) for seen in driver.seen] + [(len(sizes), 0)]
    assert sizes[0] == 4
    for (start, limit), (end, _) in zip(windows, windows[1:]):
        assert all(size <= limit for size in sizes[start + 2:end]), (start, limit, sizes)
    assert min(sizes) <= 2
    assert action_count("shrink") == shrinks_before + 1
    assert metrics.REGISTRY.get_sample_value("antenna_worker_fetch_limit", {"knob": "tasks_per_reserve"}) == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "watchdog.governor"]
    assert lines[0] == ("watchdog shrink: used 750.0 MiB (soft 700.0 MiB, hard 850.0 MiB) tasks_per_reserve 4 -> 2 "
                        "prefetch_depth 4 -> 2 admit_reserves True -> True: above soft cap, x0.5")
    assert len(lines) == 5


@pytest.mark.timeout(180)
def test_after_a_shrink_each_loader_worker_holds_at_most_depth_x_batch_decoded_images(
        antenna, settings_for, tiny_images):
    """The credit gate reads the live prefetch_depth: after the shrink from 2 to 1 a worker never
    holds more than one batch (3 images) decoded and not yet received (6 with the plan's depth)."""
    antenna.add_job(tiny_images[:36], "synthetic-moths")
    settings = settings_for(antenna)
    guard = WatchdogMiddleware(settings)
    waiting: list[int] = []
    batches = [0]

    def probe(ctx: JobContext) -> None:
        batches[0] += 1
        if batches[0] >= 4:  # the shrink came after batch 1; each worker has been received from since
            time.sleep(0.15)  # let the workers run ahead as far as credit allows
            control = ctx.loader.control
            waiting.extend(control.produced[slot] - control.consumed[slot] for slot in (1, 2))

    driver = Driver(guard, plan(tasks_per_reserve=12, batch_size=3, prefetch_factor=2), server=antenna,
                    script={1: [(0.0, SOFT)]}, probe=probe)
    assert make_worker(settings, guard, driver).run() == 0
    assert (driver.seen[0].action, driver.seen[0].knobs) == ("shrink", (6, 1, True))
    assert max(waiting) == 3, waiting  # reached (the bound is real) and never passed


@pytest.mark.timeout(180)
def test_decisions_between_jobs_apply_to_the_next_loader(antenna, settings_for, tiny_images):
    job = antenna.add_job(tiny_images[:12], "synthetic-moths")
    settings = settings_for(antenna, antenna_api_batch_size=4)  # the ceiling before any plan: (4, 4)
    guard = WatchdogMiddleware(settings)
    driver = Driver(guard, plan(), server=antenna)
    worker = make_worker(settings, guard, driver)
    guard.on_start(worker)
    assert worker.current is None
    assert guard.observe(snap(0.0, SOFT)).after.knobs() == (2, 2)  # no loader: kept
    assert worker.process_job(worker.client.list_jobs(["synthetic-moths"])[0]) == 12
    sizes = [r["batch_size"] for r in antenna.reservations if r["job_id"] == job]
    assert sizes and max(sizes) == 2, sizes  # from the first reserve on


@pytest.mark.timeout(240)
def test_rebuild_abandons_the_loader_and_every_task_still_gets_a_result(
        antenna_factory, settings_for, tiny_images, caplog):
    server = antenna_factory(reservation_timeout_s=3.0)
    job = server.add_job(tiny_images[:30], "synthetic-moths")
    settings = settings_for(server)
    guard = WatchdogMiddleware(settings)  # hard-cap deadline 20 s (the settings default)
    driver = Driver(
        guard, plan(tasks_per_reserve=8, batch_size=2, prefetch_factor=1), server=server,
        script={1: [(0.0, HARD), (21.0, HARD)]},  # pause, then past the deadline: rebuild
        on_loader={2: [(22.0, BAND)]},  # the rebuilt loader starts paused; memory has fallen
    )
    with caplog.at_level(logging.WARNING, logger="worker.release"):
        assert make_worker(settings, guard, driver).run() == 0
    assert [seen.action for seen in driver.seen] == ["pause", "rebuild", "resume"]
    rebuild = driver.seen[1]
    assert (rebuild.knobs, rebuild.rebuild_requested, rebuild.stop) == ((1, 1, False), True, ABANDON)
    assert driver.plans[:2] == ["settings", "minimal"]  # abandoned, then rebuilt minimal
    stranded = {r.getMessage().split()[3] for r in caplog.records if "left for redelivery" in r.getMessage()}
    assert stranded, "the abandoned loader held reserved, unloaded tasks"
    report = server.report(job)
    # every task has a result or waits for redelivery (still reserved, or expired after the 3 s timeout)
    assert report.lost == 0 and report.results_ok + report.reserved + report.awaiting_redelivery == 30
    time.sleep(3.5)  # the stranded tasks' reservations expire and are redelivered
    finisher = build_worker(settings, burst=True, middlewares=[])
    assert finisher.run() == 0
    report = server.report(job)
    assert (report.results_ok, report.lost, report.complete) == (30, 0, True)
    assert report.redeliveries == len(stranded)
