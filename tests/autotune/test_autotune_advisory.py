"""The post-job memory advisory: statistics, sizing from the observed peak, text and JSON files."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from autotune.advisory import MemoryStats, build_advisory, write_advisory
from autotune.plan import MINIMAL_PLAN, LoaderPlan
from autotune.planner import PlanOption

MiB = 1024 * 1024
GiB = 1024 * MiB
JOB_PLAN = LoaderPlan(8, 4, 2, 2, False, 4, source="autotune")
SMALL = PlanOption(LoaderPlan(2, 1, 1, 1, False, 2), 2 * GiB, 5.0)
MEDIUM = PlanOption(LoaderPlan(8, 4, 2, 1, False, 4), 4 * GiB, 9.0)
LARGE = PlanOption(LoaderPlan(16, 8, 4, 2, False, 8), 6 * GiB, 12.0)
WHEN = datetime(2026, 11, 25, 14, 8, 9, tzinfo=timezone.utc)


def advisory(**changes):
    values = dict(
        limit_bytes=9 * GiB, reserve_bytes=1 * GiB, safety_factor=0.85,
        memory_samples_bytes=[v * MiB for v in range(1, 101)], peak_bytes=4 * GiB, predicted_bytes=4 * GiB,
        plan=JOB_PLAN, alternatives=[SMALL, MEDIUM, LARGE], created_at=WHEN,
    )
    values.update(changes)
    return build_advisory("moth-detector", 42, **values)


def test_end_of_batch_statistics():
    stats = MemoryStats.of([v * MiB for v in range(1, 101)])
    assert stats.count == 100
    assert stats.mean_bytes == pytest.approx(50.5 * MiB)
    assert stats.median_bytes == pytest.approx(50.5 * MiB)
    assert stats.p95_bytes == pytest.approx(95.05 * MiB)  # linear between ranks, as numpy
    assert stats.max_bytes == 100 * MiB
    assert MemoryStats.of([7]).p95_bytes == 7.0
    assert MemoryStats.of([]) is None


def test_pre_run_numbers():
    a = advisory()
    assert a.usable_bytes == 8 * GiB
    assert a.budget_bytes == int(8 * GiB * 0.85)


def test_peak_is_never_below_an_end_of_batch_sample():
    a = advisory(memory_samples_bytes=[5 * GiB], peak_bytes=3 * GiB)
    assert a.peak_bytes == 5 * GiB


def test_aggressive_and_conservative_are_sized_from_the_observed_peak():
    # observed 1.2x the prediction: LARGE needs 6 x 1.2 x 1.1 = 7.92 GiB (fits 8), x1.5 = 10.8 (does not);
    # MEDIUM x 1.2 x 1.5 = 7.2 GiB fits
    a = advisory(peak_bytes=int(4.8 * GiB))
    assert a.observed_over_predicted == pytest.approx(1.2)
    assert a.aggressive.plan == LARGE.plan and a.aggressive.fits
    assert a.aggressive.required_bytes == pytest.approx(6 * GiB * 1.2 * 1.1, rel=1e-6)
    assert a.conservative.plan == MEDIUM.plan and a.conservative.fits
    assert a.conservative.predicted_images_per_s == 9.0
    assert a.aggressive.recommended_limit_bytes == int(4.8 * GiB * 1.1) + GiB
    assert a.conservative.recommended_limit_bytes == int(4.8 * GiB * 1.5) + GiB


def test_nothing_fits_recommends_the_minimal_plan():
    a = advisory(limit_bytes=3 * GiB, peak_bytes=8 * GiB)
    assert not a.conservative.fits and not a.aggressive.fits
    assert a.conservative.plan == MINIMAL_PLAN
    assert a.conservative.required_bytes == int(2 * GiB * 2.0 * 1.5)
    assert "nothing fits" in a.text()


def test_text_has_pre_and_post_run_sections_with_numbers():
    text = advisory().text()
    pre, post = text.split("Post-run")
    assert "Pre-run" in pre and "9,216 MiB" in pre and "usable           8,192 MiB" in pre and "0.85" in pre
    assert "100 samples" in post and "50 MiB" in post and "95 MiB" in post and "4,096 MiB" in post
    assert "aggressive (x1.1" in post and "conservative (x1.5" in post


def test_json_and_files(tmp_path):
    a = advisory()
    data = json.loads(a.to_json())
    assert data["end_of_batch"]["p95_bytes"] == pytest.approx(95.05 * MiB)
    assert data["conservative"]["plan"]["batch_size"] == a.conservative.plan.batch_size
    path = write_advisory(a, tmp_path / "advisories")
    assert path.name == "memory-advisory_moth-detector_job-42_20261125T140809.json"
    assert json.loads(path.read_text()) == data
    assert path.with_suffix(".txt").read_text() == a.text()
    assert sorted(p.suffix for p in path.parent.iterdir()) == [".json", ".txt"]
