"""Governor: walk the state machine with made-up snapshots (limit 1000 MiB: low water 550,
soft cap 700, hard cap 850), and once with a real Sampler."""
from __future__ import annotations

import logging
import os
import time

import pytest

from watchdog.governor import Decision, FetchLimits, Governor, GovernorConfig
from watchdog.limits import Limits
from watchdog.sampler import MemorySnapshot, Sampler
from watchdog_testing import MIB

pytestmark = pytest.mark.timeout(10)

LIMITS = Limits(mem_total_bytes=1000 * MIB)
CEILING = FetchLimits(tasks_per_reserve=8, prefetch_depth=4)
SOFT, HARD, LOW = 750 * MIB, 900 * MIB, 600 * MIB  # above soft, above hard, in the band
BELOW_LOW = 400 * MIB


def snap(taken_at_s: float, used_bytes: int) -> MemorySnapshot:
    return MemorySnapshot(
        taken_at_s=taken_at_s, used_bytes=used_bytes, tree_pss_bytes=used_bytes,
        tree_rss_bytes=used_bytes, process_count=3, mem_available_bytes=0, open_fds=10, shm_bytes=0, tree_private_bytes=used_bytes,
    )


def walk(governor: Governor, *steps: tuple[float, int]) -> list[Decision]:
    return [governor.observe(snap(t, used)) for t, used in steps]


def knobs(decision: Decision) -> tuple[int, int, bool]:
    a = decision.after
    return a.tasks_per_reserve, a.prefetch_depth, a.admit_reserves


def test_caps_of_the_test_limits() -> None:
    assert (LIMITS.soft_cap_bytes, LIMITS.hard_cap_bytes) == (700 * MIB, 850 * MIB)
    assert Governor(CEILING, LIMITS).low_water_bytes == 550 * MIB


def test_shrinks_above_soft_cap_respecting_cooldown_down_to_floor() -> None:
    governor = Governor(CEILING, LIMITS)
    decisions = walk(governor, (0.0, SOFT), (0.5, SOFT), (1.0, SOFT), (2.0, SOFT), (3.0, SOFT), (4.0, SOFT))
    assert [d.action for d in decisions] == ["shrink", "hold", "shrink", "shrink", "hold", "hold"]
    assert [knobs(d)[:2] for d in decisions] == [(4, 2), (4, 2), (2, 1), (1, 1), (1, 1), (1, 1)]
    assert "cooldown" in decisions[1].reason
    assert "floor" in decisions[4].reason
    first = decisions[0]
    assert (first.before, first.used_bytes) == (CEILING, SOFT)
    assert (first.soft_cap_bytes, first.hard_cap_bytes) == (700 * MIB, 850 * MIB)


def test_holds_between_low_water_and_soft_cap() -> None:
    governor = Governor(CEILING, LIMITS)
    walk(governor, (0.0, SOFT))
    decisions = walk(governor, *((t, LOW) for t in (5.0, 10.0, 20.0)))
    assert {d.action for d in decisions} == {"hold"}
    assert governor.current == FetchLimits(4, 2)


def test_grows_additively_below_low_water_up_to_the_ceiling() -> None:
    governor = Governor(CEILING, LIMITS)
    walk(governor, (0.0, SOFT), (1.0, SOFT), (2.0, SOFT))  # down to (1, 1) at t=2
    times = [3.0, 4.0, 4.5, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0]
    decisions = walk(governor, *((t, BELOW_LOW) for t in times))
    assert [d.action for d in decisions] == ["hold", "grow", "hold", "grow", "grow", "grow", "grow", "grow", "grow", "hold", "hold"]
    assert "grow interval" in decisions[0].reason  # 2 s after the last shrink, not 1
    assert [knobs(d)[:2] for d in decisions if d.action == "grow"] == [(2, 2), (3, 3), (4, 4), (5, 4), (6, 4), (7, 4), (8, 4)]
    assert governor.current == CEILING
    assert "at ceiling" in decisions[-1].reason


def test_pause_at_hard_cap_then_resume_below_it() -> None:
    governor = Governor(CEILING, LIMITS)
    pause, held, resume = walk(governor, (0.0, HARD), (0.5, HARD), (1.0, SOFT))
    assert pause.action == "pause" and knobs(pause) == (4, 2, False)  # shrinks too
    assert held.action == "hold" and not held.after.admit_reserves
    assert resume.action == "resume" and knobs(resume) == (4, 2, True)
    assert walk(governor, (1.5, SOFT))[0].action == "shrink"  # then the soft-cap rule applies


def test_rebuild_once_per_deadline_while_stuck_at_hard_cap() -> None:
    governor = Governor(CEILING, LIMITS, GovernorConfig(hard_cap_deadline_s=20.0))
    decisions = walk(governor, *((float(t), HARD) for t in range(0, 46)))
    rebuild_times = [t for t, d in enumerate(decisions) if d.action == "rebuild"]
    assert decisions[0].action == "pause"
    assert rebuild_times == [21, 42]  # first at > 20 s after the pause, then re-armed
    rebuild = decisions[21]
    assert knobs(rebuild) == (1, 1, False)
    assert "rebuild" in rebuild.reason
    assert walk(governor, (46.0, LOW))[0].action == "resume"


def test_deadline_restarts_after_a_resume() -> None:
    governor = Governor(CEILING, LIMITS)
    walk(governor, (0.0, HARD), (15.0, HARD), (16.0, LOW))  # paused 16 s, then resumed
    decisions = walk(governor, *((float(t), HARD) for t in range(17, 40)))
    assert [t for t, d in zip(range(17, 40), decisions) if d.action == "rebuild"] == [38]


def test_set_ceiling_clamps_current_and_raises_the_grow_target() -> None:
    governor = Governor(CEILING, LIMITS)
    governor.set_ceiling(FetchLimits(tasks_per_reserve=2, prefetch_depth=8))
    assert governor.current == FetchLimits(2, 4)
    decisions = walk(governor, *((float(t), BELOW_LOW) for t in range(0, 20, 2)))
    assert governor.current == FetchLimits(2, 8)
    assert sum(d.action == "grow" for d in decisions) == 4


def test_reset_to_minimal_waits_a_grow_interval_from_the_next_snapshot() -> None:
    governor = Governor(CEILING, LIMITS)
    governor.reset_to_minimal()
    assert governor.current == FetchLimits(1, 1)
    decisions = walk(governor, (100.0, BELOW_LOW), (101.0, BELOW_LOW), (102.0, BELOW_LOW))
    assert [d.action for d in decisions] == ["hold", "hold", "grow"]


def test_decision_log_line_has_the_numbers(caplog: pytest.LogCaptureFixture) -> None:
    governor = Governor(CEILING, LIMITS)
    with caplog.at_level(logging.INFO, logger="watchdog.governor"):
        shrink, hold = walk(governor, (0.0, SOFT), (0.1, SOFT))
    line = shrink.log_line()
    for part in ("watchdog shrink", "used 750.0 MiB", "soft 700.0 MiB", "hard 850.0 MiB",
                 "tasks_per_reserve 8 -> 4", "prefetch_depth 4 -> 2", "admit_reserves True -> True"):
        assert part in line
    assert "\n" not in line
    assert [record.getMessage() for record in caplog.records] == [line]  # holds are not logged
    assert hold.action == "hold"


@pytest.mark.parametrize(
    "config",
    [{"low_water_fraction": 0}, {"shrink_factor": 1.0}, {"grow_step": 0}, {"cooldown_s": -1.0}, {"hard_cap_deadline_s": 0}],
)
def test_bad_config_is_rejected(config: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        GovernorConfig(**config)


def test_low_water_must_be_below_the_soft_cap() -> None:
    with pytest.raises(ValueError, match="AMI_WATCHDOG_SOFT_CAP_FRACTION"):
        Governor(CEILING, LIMITS, GovernorConfig(low_water_fraction=0.75))
    with pytest.raises(ValueError):
        FetchLimits(tasks_per_reserve=0, prefetch_depth=1)


def test_real_sampler_drives_a_shrink() -> None:
    """A configured limit that puts real snapshots at 75% of it, between a soft cap at 60% and a
    hard cap at 95%: wide margins, so this process's own memory moving on a busy machine cannot
    cross a cap. Shrinks come one cooldown (1 s) apart."""
    decisions: list[Decision] = []
    sampler = Sampler(os.getpid(), interval_s=0.05)
    sampler.start()
    try:
        while sampler.latest is None:
            time.sleep(0.01)
        limits = Limits(mem_total_bytes=1 << 40, configured_max_bytes=int(sampler.latest.used_bytes / 0.75),
                        soft_cap_fraction=0.60, hard_cap_fraction=0.95)
        governor = Governor(CEILING, limits)
        deadline_s = time.monotonic() + 5.0
        while time.monotonic() < deadline_s and governor.current != FetchLimits(1, 1):
            decisions.append(governor.observe(sampler.latest))
            time.sleep(0.05)
    finally:
        sampler.stop()
    shrinks = [d for d in decisions if d.action == "shrink"]
    assert [knobs(d)[:2] for d in shrinks] == [(4, 2), (2, 1), (1, 1)]
    assert all(b.after.admit_reserves for b in decisions)


def test_memory_still_rising_after_a_shrink_overrides_the_cooldown() -> None:
    """3% of the 1000 MiB limit: a rise of 30 MiB or more since the last shrink shrinks again."""
    governor = Governor(CEILING, LIMITS)
    decisions = walk(governor, (0.0, 710 * MIB), (0.2, 735 * MIB), (0.4, 745 * MIB), (0.6, 770 * MIB))
    assert [d.action for d in decisions] == ["shrink", "hold", "shrink", "hold"]
    assert [knobs(d)[:2] for d in decisions] == [(4, 2), (4, 2), (2, 1), (2, 1)]
    assert "still rising" in decisions[2].reason and "cooldown" in decisions[3].reason
