"""Policy: measure a job (probe), model its memory and throughput, choose a LoaderPlan.

Imports nothing from ``worker`` or ``watchdog``: plain typed values in, plain typed values out.
"""
from autotune.advisory import Advisory, build_advisory, write_advisory
from autotune.calibration import MemoryCalibration, load_calibration
from autotune.corrections import CorrectionStore
from autotune.memory_model import MemoryEstimate, compare_table, predict_peak
from autotune.plan import MINIMAL_PLAN, LoaderPlan
from autotune.planner import (
    PlanConstraints,
    PlanDecision,
    PlanOption,
    budget_bytes,
    choose_plan,
    max_tasks_per_reserve,
    plan_options,
    price_plan,
)
from autotune.probe import ImageSample, InferenceSample, Probe
from autotune.throughput_model import RateEstimate, predict_rate

__all__ = [
    "Advisory", "CorrectionStore", "ImageSample", "InferenceSample", "LoaderPlan", "MINIMAL_PLAN",
    "MemoryCalibration", "MemoryEstimate", "PlanConstraints", "PlanDecision", "PlanOption", "Probe",
    "RateEstimate", "budget_bytes", "build_advisory", "choose_plan", "compare_table", "load_calibration",
    "max_tasks_per_reserve", "plan_options", "predict_peak", "price_plan", "predict_rate", "write_advisory",
]
