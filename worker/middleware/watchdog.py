"""The watchdog in the worker: memory samples in, the governor's decisions applied to the live loader.

Policy is ``watchdog.governor``; this module only wires it to the loop. The sample listener runs
on the sampler thread and writes the loader's ``SharedControl`` knobs directly (plain shared
integers: loader workers read them at each reserve and before each image, so a shrink needs no
restart). The plan the loader was built from (autotune's, or the settings') is the ceiling the
governor shrinks from and grows back to. With no loader (between jobs) decisions are kept by the
governor and applied when the next loader starts.

Pause also trims the heap: ``malloc_trim`` at once on the sampler thread, ``gc.collect`` on the
loop thread at its next hook (a collection runs finalizers on the collecting thread). Rebuild sets
``ctx.request_rebuild`` and abandons the loader from the sampler thread too, because a loop
waiting on a paused loader would otherwise never reach its between-batch check.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Optional

from autotune.plan import MINIMAL_PLAN, LoaderPlan
from watchdog.governor import Decision, FetchLimits, Governor, GovernorConfig
from watchdog.heap import trim_heap
from watchdog.limits import MIB
from watchdog.sampler import MemorySnapshot
from worker import metrics
from worker.hooks import JobContext, Middleware
from worker.planning import plan_from_settings
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.results import ImageResult
    from worker.daemon import Worker
    from worker.ingest import Batch, Loader

log = logging.getLogger(__name__)

HISTORY_LEN = 1000


def ceiling_of(plan: LoaderPlan) -> FetchLimits:
    """The knobs a plan allows at most: its tasks per reserve and its prefetch factor."""
    return FetchLimits(plan.tasks_per_reserve, plan.prefetch_factor)


def apply_limits(loader: "Loader", limits: FetchLimits) -> None:
    loader.control.set_limits(
        tasks_per_reserve=limits.tasks_per_reserve, prefetch_depth=limits.prefetch_depth,
        admit=limits.admit_reserves,
    )


class WatchdogMiddleware(Middleware):
    """Feeds every memory sample to a ``Governor`` and applies what it decides.

    ``decisions`` keeps the last 1000 decisions that were not ``hold`` (newest last). Each such
    decision is logged once by the governor (one line with memory, caps, old -> new) and counted
    in ``antenna_worker_watchdog_actions_total{action}``; ``antenna_worker_fetch_limit{knob}``
    follows the current knobs.
    """

    def __init__(self, settings: Settings, config: Optional[GovernorConfig] = None) -> None:
        self.config = config or GovernorConfig(hard_cap_deadline_s=settings.watchdog_hard_cap_deadline_s)
        self.governor: Optional[Governor] = None
        self.decisions: deque[Decision] = deque(maxlen=HISTORY_LEN)
        self._worker: Optional["Worker"] = None
        self._lock = threading.Lock()
        self._collect_pending = threading.Event()

    # --- loop thread ---

    def on_start(self, worker: "Worker") -> None:
        if worker.limits is None:
            log.warning("watchdog: no memory limits were read, so nothing to govern: the watchdog is off")
            return
        if self.governor is None:  # on_start runs once per run(); listen once per worker
            ceiling = ceiling_of(plan_from_settings(worker.settings, cuda=worker.cuda))
            self.governor = Governor(ceiling, worker.limits, self.config)
            self._worker = worker
            worker.add_sample_listener(self.observe)
        log.info("watchdog: %s; low water %.1f MiB; sampling every %.0f ms; hard-cap deadline %.0f s",
                 worker.limits.describe(), self.governor.low_water_bytes / MIB,
                 worker.settings.watchdog_interval_s * 1000, self.config.hard_cap_deadline_s)
        self._publish(self.governor.current)

    def on_loader_start(self, worker: "Worker", ctx: JobContext) -> None:
        governor, loader = self.governor, ctx.loader
        if governor is None or loader is None:
            return
        with self._lock:
            if ctx.plan.source == MINIMAL_PLAN.source:
                governor.reset_to_minimal()  # a rebuilt loader settles before it grows
            governor.set_ceiling(ceiling_of(ctx.plan))
            current = governor.current
            apply_limits(loader, current)
        self._publish(current)
        log.info("job %d: watchdog ceiling tasks_per_reserve %d prefetch_depth %d (the plan); loader starts at "
                 "tasks_per_reserve %d prefetch_depth %d admit_reserves %s",
                 ctx.job.id, ctx.plan.tasks_per_reserve, ctx.plan.prefetch_factor,
                 current.tasks_per_reserve, current.prefetch_depth, current.admit_reserves)
        self._collect_if_pending()

    def after_batch(self, worker: "Worker", ctx: JobContext, batch: "Batch", results: "list[ImageResult]") -> None:
        self._collect_if_pending()

    def on_idle(self, worker: "Worker") -> None:
        self._collect_if_pending()

    def on_job_end(self, worker: "Worker", ctx: JobContext) -> None:
        self._collect_if_pending()

    def on_stop(self, worker: "Worker") -> None:
        if self.governor is None:
            return
        counts: dict[str, int] = {}
        for decision in self.decisions:
            counts[decision.action] = counts.get(decision.action, 0) + 1
        peak_bytes = worker.sampler.peak_used_bytes if worker.sampler is not None else 0
        log.info("watchdog: peak used %.1f MiB (hard cap %.1f MiB); decisions %s; knobs now %s",
                 peak_bytes / MIB, self.governor.limits.hard_cap_bytes / MIB,
                 " ".join(f"{action}={n}" for action, n in sorted(counts.items())) or "none",
                 self.governor.current)

    def _collect_if_pending(self) -> None:
        if self._collect_pending.is_set():
            self._collect_pending.clear()
            freed_bytes = trim_heap()
            log.debug("watchdog: gc + malloc_trim on the loop thread freed %.1f MiB", freed_bytes / MIB)

    # --- sampler thread ---

    def observe(self, snapshot: MemorySnapshot) -> Optional[Decision]:
        """One governor step for ``snapshot``, applied to the current job's loader (if any).

        Runs on the sampler thread (a ``Worker`` sample listener). Returns the decision, or None
        when the watchdog is off.
        """
        governor = self.governor
        if governor is None:
            return None
        with self._lock:
            decision = governor.observe(snapshot)
            if decision.action == "hold":
                return decision
            ctx = self._worker.current if self._worker is not None else None
            loader = ctx.loader if ctx is not None else None
            if loader is not None:
                apply_limits(loader, decision.after)
            if decision.action == "rebuild":
                self._rebuild(ctx, loader, decision)
            self.decisions.append(decision)
        metrics.watchdog_actions.labels(action=decision.action).inc()
        self._publish(decision.after)
        if decision.action == "pause":
            trim_heap(collect=False)
            self._collect_pending.set()
        return decision

    @staticmethod
    def _rebuild(ctx: Optional[JobContext], loader: Optional["Loader"], decision: Decision) -> None:
        if ctx is None or loader is None:
            return  # no loader to end: the minimal knobs apply to the next one
        ctx.request_rebuild(
            f"watchdog: used {decision.used_bytes / MIB:.1f} MiB at/above the hard cap "
            f"{decision.hard_cap_bytes / MIB:.1f} MiB: {decision.reason}"
        )
        # Decoded batches still arrive and are posted; reserved, unloaded tasks are stranded and
        # released (or left for redelivery) per task by the loop when the loader ends.
        loader.abandon()

    @staticmethod
    def _publish(limits: FetchLimits) -> None:
        metrics.fetch_limit.labels(knob="tasks_per_reserve").set(limits.tasks_per_reserve)
        metrics.fetch_limit.labels(knob="prefetch_depth").set(limits.prefetch_depth)
        metrics.fetch_limit.labels(knob="admit_reserves").set(1 if limits.admit_reserves else 0)
