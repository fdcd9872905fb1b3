"""benchmarks/adc_cpu.py: the checks compare medians, the grid's best is chosen among its repeated
plans, and result bytes per image come from the runs with and without logits."""
from __future__ import annotations

import pytest

from benchmarks.adc_cpu import START_MARK, END_MARK, summarise, write_section
from benchmarks.run import RunResult

MiB = 1024 * 1024


def run(key: str, rate: float, *, predicted_mib: int = 0, peak_mib: int = 2000, result_bytes: int = 0,
        images: int = 32) -> RunResult:
    return RunResult("adc-small", key, key, 0, images, images, 0, 0, images / rate, rate, rate, peak_mib * MiB,
                     peak_mib * MiB, {}, 8 << 30, plan=key, predicted_peak_bytes=predicted_mib * MiB,
                     result_bytes=result_bytes or 30_000 * images)


def test_summary_uses_medians_and_the_repeated_grid_plans():
    draws = {
        "a": [run("a", 0.30)],
        "c": [run("c", 0.37, predicted_mib=2200), run("c", 0.38, predicted_mib=2100), run("c", 0.35, predicted_mib=1600)],
        "d0": [run("d0", 0.50)],  # a single lucky draw: not repeated, does not compete
        "d1": [run("d1", 0.41), run("d1", 0.39), run("d1", 0.40)],
        "d2": [run("d2", 0.37), run("d2", 0.36), run("d2", 0.38)],
    }
    summary = summarise(draws, run("n", 0.3, result_bytes=8 * 15_500, images=8))
    assert summary.grid_best_key == "d1"
    assert summary.autotune_per_s == pytest.approx(0.37)
    assert summary.speed_ratio == pytest.approx(0.37 / 0.40)
    assert summary.speed_ok
    assert summary.peak_errors == pytest.approx((0.10, 0.05, -0.20))
    assert summary.peak_ok  # median +5%
    assert summary.bytes_with_logits == pytest.approx(30_000)
    assert summary.bytes_without_logits == pytest.approx(15_500)


def test_section_is_replaced_between_its_marks(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nbefore\n\n{START_MARK}\nold\n{END_MARK}\n\nafter\n")
    write_section(doc, f"{START_MARK}\nnew\n{END_MARK}\n")
    assert doc.read_text() == f"# Benchmarks\n\nbefore\n\n{START_MARK}\nnew\n{END_MARK}\n\nafter\n"
