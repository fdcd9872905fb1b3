"""The memory governor: a pure state machine from memory snapshots to ingest knob settings.

No threads, no I/O: time arrives with each snapshot (``taken_at_s``), so tests can walk it
with made-up numbers. The worker applies each Decision's ``after`` to its loader.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

from watchdog.limits import MIB, Limits
from watchdog.sampler import MemorySnapshot

logger = logging.getLogger(__name__)

Action = Literal["hold", "shrink", "grow", "pause", "resume", "rebuild"]


@dataclass(frozen=True)
class FetchLimits:
    """The ingest knobs: tasks fetched per reserve call by each loader worker, decoded batches
    that may wait in the queue, and whether new reserve calls are allowed at all."""

    tasks_per_reserve: int
    prefetch_depth: int
    admit_reserves: bool = True

    def __post_init__(self) -> None:
        if self.tasks_per_reserve < 1 or self.prefetch_depth < 1:
            raise ValueError(f"FetchLimits knobs must be >= 1, got {self}")

    def knobs(self) -> tuple[int, int]:
        return self.tasks_per_reserve, self.prefetch_depth


MINIMAL_FETCH = FetchLimits(tasks_per_reserve=1, prefetch_depth=1)


@dataclass(frozen=True)
class GovernorConfig:
    """Tuning of the governor. Fractions are of ``Limits.effective_limit_bytes``.

    ``low_water_fraction`` (0.55): grow back only below it, so the band up to the soft cap holds.
    ``shrink_factor`` (0.5): multiplicative shrink, floor 1. ``grow_step`` (1): additive grow.
    ``cooldown_s`` (1.0): least time between two shrinks, so one spike (whose memory is already
    allocated and shrinking again cannot free) does not collapse the knobs to 1.
    ``rise_override_fraction`` (0.03): within the cooldown, shrink anyway once memory has risen
    by this fraction of the limit since the last shrink: that shrink did not stop the growth.
    ``grow_interval_s`` (2.0): least time after any grow or shrink before the next grow.
    ``hard_cap_deadline_s`` (20.0): how long at/above the hard cap before asking for a rebuild.
    """

    low_water_fraction: float = 0.55
    shrink_factor: float = 0.5
    grow_step: int = 1
    cooldown_s: float = 1.0
    rise_override_fraction: float = 0.03
    grow_interval_s: float = 2.0
    hard_cap_deadline_s: float = 20.0

    def __post_init__(self) -> None:
        if not 0 < self.low_water_fraction < 1:
            raise ValueError(f"low_water_fraction must be in (0, 1), got {self.low_water_fraction}")
        if not 0 < self.shrink_factor < 1:
            raise ValueError(f"shrink_factor must be in (0, 1), got {self.shrink_factor}")
        if self.grow_step < 1:
            raise ValueError(f"grow_step must be >= 1, got {self.grow_step}")
        if not 0 < self.rise_override_fraction <= 1:
            raise ValueError(f"rise_override_fraction must be in (0, 1], got {self.rise_override_fraction}")
        if min(self.cooldown_s, self.grow_interval_s) < 0 or self.hard_cap_deadline_s <= 0:
            raise ValueError(f"governor intervals must be >= 0 and the deadline > 0, got {self}")


@dataclass(frozen=True)
class Decision:
    """What the governor decided for one snapshot; ``after`` is what the loader should use."""

    action: Action
    before: FetchLimits
    after: FetchLimits
    used_bytes: int
    soft_cap_bytes: int
    hard_cap_bytes: int
    reason: str

    def log_line(self) -> str:
        b, a = self.before, self.after
        return (
            f"watchdog {self.action}: used {self.used_bytes / MIB:.1f} MiB "
            f"(soft {self.soft_cap_bytes / MIB:.1f} MiB, hard {self.hard_cap_bytes / MIB:.1f} MiB) "
            f"tasks_per_reserve {b.tasks_per_reserve} -> {a.tasks_per_reserve} "
            f"prefetch_depth {b.prefetch_depth} -> {a.prefetch_depth} "
            f"admit_reserves {b.admit_reserves} -> {a.admit_reserves}: {self.reason}"
        )

    def __str__(self) -> str:
        return self.log_line()


class Governor:
    """Shrinks fast above the soft cap, grows slowly below low water, pauses at the hard cap.

    Starts at ``ceiling`` (the plan's knobs). Above the soft cap both knobs are multiplied by
    ``shrink_factor`` (floor 1) at most once per ``cooldown_s``, sooner only while memory keeps
    rising past the level of the last shrink (``rise_override_fraction``). Below low water they grow by
    ``grow_step`` toward the ceiling at most once per ``grow_interval_s``. At/above the hard cap
    reserves are paused (and the knobs still shrink); the first snapshot back below it resumes.
    Paused longer than ``hard_cap_deadline_s`` gives one ``rebuild`` (knobs to 1) and re-arms
    the deadline, so a tree stuck above the cap gets one rebuild per deadline.
    """

    def __init__(self, ceiling: FetchLimits, limits: Limits, config: GovernorConfig = GovernorConfig()) -> None:
        if config.low_water_fraction >= limits.soft_cap_fraction:
            raise ValueError(
                f"low_water_fraction {config.low_water_fraction} must be below "
                f"AMI_WATCHDOG_SOFT_CAP_FRACTION {limits.soft_cap_fraction}"
            )
        self.limits = limits
        self.config = config
        self.ceiling = replace(ceiling, admit_reserves=True)
        self.current = self.ceiling
        self._last_shrink_s: float | None = None
        self._last_shrink_used_bytes = 0
        self._last_change_s: float | None = None
        self._hard_since_s: float | None = None
        self._restart_grow_clock = False

    @property
    def low_water_bytes(self) -> int:
        return int(self.limits.effective_limit_bytes * self.config.low_water_fraction)

    @property
    def paused(self) -> bool:
        return not self.current.admit_reserves

    def observe(self, snapshot: MemorySnapshot) -> Decision:
        """Decide for one snapshot and make ``after`` the new ``current``; non-hold decisions
        are logged at INFO as one line."""
        now_s, used_bytes = snapshot.taken_at_s, snapshot.used_bytes
        if self._restart_grow_clock:
            self._last_change_s, self._restart_grow_clock = now_s, False
        if used_bytes >= self.limits.hard_cap_bytes:
            action, after, reason = self._at_hard_cap(now_s, used_bytes)
        elif self.paused:
            action, after, reason = self._resume()
        elif used_bytes >= self.limits.soft_cap_bytes:
            action, after, reason = self._above_soft_cap(now_s, used_bytes)
        elif used_bytes < self.low_water_bytes:
            action, after, reason = self._below_low_water(now_s)
        else:
            action, after, reason = "hold", self.current, "between low water and soft cap"
        decision = Decision(
            action, self.current, after, used_bytes,
            self.limits.soft_cap_bytes, self.limits.hard_cap_bytes, reason,
        )
        self.current = after
        if action != "hold":
            logger.info("%s", decision)
        return decision

    def set_ceiling(self, ceiling: FetchLimits) -> None:
        """A new plan (new job): knobs above the new ceiling are clamped down to it; below it
        they grow back by the normal rule."""
        self.ceiling = replace(ceiling, admit_reserves=True)
        self.current = FetchLimits(
            min(self.current.tasks_per_reserve, ceiling.tasks_per_reserve),
            min(self.current.prefetch_depth, ceiling.prefetch_depth),
            self.current.admit_reserves,
        )
        logger.debug("watchdog ceiling %s, current %s", self.ceiling, self.current)

    def reset_to_minimal(self) -> None:
        """After a rebuild: knobs to 1 (pause state kept) and the grow interval starts again
        at the next snapshot, so a fresh loader settles before it grows."""
        self.current = replace(MINIMAL_FETCH, admit_reserves=self.current.admit_reserves)
        self._restart_grow_clock = True

    def _shrunk(self, now_s: float, used_bytes: int) -> FetchLimits | None:
        """The shrunk knobs, or None when in cooldown (and memory is not still rising) or already
        at the floor."""
        rise_bytes = int(self.limits.effective_limit_bytes * self.config.rise_override_fraction)
        in_cooldown = (
            self._last_shrink_s is not None and now_s - self._last_shrink_s < self.config.cooldown_s
            and used_bytes < self._last_shrink_used_bytes + rise_bytes
        )
        if in_cooldown or self.current.knobs() == MINIMAL_FETCH.knobs():
            return None
        factor = self.config.shrink_factor
        self._last_shrink_s = self._last_change_s = now_s
        self._last_shrink_used_bytes = used_bytes
        return replace(
            self.current,
            tasks_per_reserve=max(1, int(self.current.tasks_per_reserve * factor)),
            prefetch_depth=max(1, int(self.current.prefetch_depth * factor)),
        )

    def _hold_reason(self, now_s: float) -> str:
        if self.current.knobs() == MINIMAL_FETCH.knobs():
            return "knobs at floor"
        assert self._last_shrink_s is not None
        left_s = self.config.cooldown_s - (now_s - self._last_shrink_s)
        return f"shrink cooldown, {left_s:.2f} s left"

    def _above_soft_cap(self, now_s: float, used_bytes: int) -> tuple[str, FetchLimits, str]:
        within_cooldown = self._last_shrink_s is not None and now_s - self._last_shrink_s < self.config.cooldown_s
        shrunk = self._shrunk(now_s, used_bytes)
        if shrunk is None:
            return "hold", self.current, f"above soft cap; {self._hold_reason(now_s)}"
        still_rising = " (still rising within the cooldown)" if within_cooldown else ""
        return "shrink", shrunk, f"above soft cap, x{self.config.shrink_factor}{still_rising}"

    def _at_hard_cap(self, now_s: float, used_bytes: int) -> tuple[str, FetchLimits, str]:
        if not self.paused:
            self._hard_since_s = now_s
            shrunk = self._shrunk(now_s, used_bytes) or self.current
            return "pause", replace(shrunk, admit_reserves=False), "at/above hard cap: stop reserving, trim heap"
        assert self._hard_since_s is not None
        held_s = now_s - self._hard_since_s
        if held_s > self.config.hard_cap_deadline_s:
            self._hard_since_s = self._last_shrink_s = self._last_change_s = now_s
            return "rebuild", replace(MINIMAL_FETCH, admit_reserves=False), (
                f"at/above hard cap for {held_s:.1f} s > {self.config.hard_cap_deadline_s} s: "
                "end the loader, rebuild minimal"
            )
        shrunk = self._shrunk(now_s, used_bytes)
        if shrunk is None:
            return "hold", self.current, f"paused at hard cap {held_s:.1f} s; {self._hold_reason(now_s)}"
        return "shrink", shrunk, f"paused at hard cap {held_s:.1f} s, x{self.config.shrink_factor}"

    def _resume(self) -> tuple[str, FetchLimits, str]:
        self._hard_since_s = None
        return "resume", replace(self.current, admit_reserves=True), "back below hard cap"

    def _below_low_water(self, now_s: float) -> tuple[str, FetchLimits, str]:
        ceiling, current = self.ceiling, self.current
        if current.knobs() == ceiling.knobs():
            return "hold", current, "below low water, at ceiling"
        if self._last_change_s is not None and now_s - self._last_change_s < self.config.grow_interval_s:
            left_s = self.config.grow_interval_s - (now_s - self._last_change_s)
            return "hold", current, f"below low water; grow interval, {left_s:.2f} s left"
        self._last_change_s = now_s
        step = self.config.grow_step
        grown = FetchLimits(
            min(ceiling.tasks_per_reserve, current.tasks_per_reserve + step),
            min(ceiling.prefetch_depth, current.prefetch_depth + step),
        )
        return "grow", grown, f"below low water, +{step} toward ceiling {ceiling.knobs()}"
