"""Pipelines by slug: the contract (``base``), ADC's ten (``adc``, described in ``catalog``), the
built-in ones that need no weights (``reference``), and a user's TorchScript model (``torchscript``).

``load_pipeline`` builds each pipeline once per process and reuses it across jobs.
"""
from __future__ import annotations

import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import torch

from worker.pipelines.base import (
    OVERHEAD_REPEATS,
    Classification,
    Detection,
    ModelInput,
    Pipeline,
    PipelineUnavailable,
    batch_overhead_s,
    inference_peaks,
    one_image_s,
    run_batch,
    warm_up,
)
from worker.pipelines.catalog import ADC_MODELS_BASE_URL, ADC_SLUGS, PIPELINES
from worker.pipelines.reference import NullPipeline, ReferencePipeline
from worker.pipelines.torchscript import TorchScriptPipeline
from worker.settings import SettingsError

log = logging.getLogger(__name__)

__all__ = [
    "ADC_SLUGS", "ADCOptions", "OVERHEAD_REPEATS", "Classification", "Detection", "ModelInput", "NullPipeline", "Pipeline", "PipelineUnavailable", "ReferencePipeline",
    "TorchScriptPipeline", "batch_overhead_s", "inference_peaks", "load_pipeline", "one_image_s", "run_batch", "select_device", "warm_up",
]


def select_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA when torch sees a device, else CPU. ``cuda`` without one is a SettingsError."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise SettingsError(
            f"AMI_DEVICE=cuda but torch {torch.__version__} sees no CUDA device (CUDA build: "
            f"{torch.version.cuda or 'none'}): set AMI_DEVICE=auto or cpu, or check the NVIDIA driver "
            "and CUDA_VISIBLE_DEVICES")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass(frozen=True)
class ADCOptions:
    """What ADC's pipelines need besides the device and batch sizes (from ``Settings``)."""

    models_dir: Path
    base_url: str
    hub_dir: Optional[Path] = None
    include_logits: bool = True
    idle_evict_s: float = 0.0


_LOADED: dict[tuple, Pipeline] = {}


def load_pipeline(slug: str, device: torch.device, *, torchscript_path: Optional[Path] = None,
                  torchscript_slug: str = "torchscript", reference_cost: int = 1,
                  adc: Optional[ADCOptions] = None, **batching: object) -> Pipeline:
    """Load once per process and reuse across jobs (models are costly to build).

    ADC's pipelines fetch their labels files here (their models are built on first use);
    ``adc`` defaults to ADC's URLs and ``./models``."""
    key = (slug, str(device), str(torchscript_path), reference_cost, adc, tuple(sorted(batching.items())))
    if key not in _LOADED:
        if slug in PIPELINES:
            _LOADED[key] = _adc_pipeline(slug, device, adc or ADCOptions(Path("models"), ADC_MODELS_BASE_URL), batching)
        elif slug == ReferencePipeline.slug:
            _LOADED[key] = ReferencePipeline(device, cost=reference_cost, **batching)
        elif slug == NullPipeline.slug:
            _LOADED[key] = NullPipeline(device, **batching)  # type: ignore[arg-type]
        elif torchscript_path is not None and slug == torchscript_slug:
            _LOADED[key] = TorchScriptPipeline(device, torchscript_path, torchscript_slug, **batching)
        else:
            raise ValueError(f"unknown pipeline {slug!r}: known are {', '.join(ADC_SLUGS)}, {ReferencePipeline.slug}, "
                             f"{NullPipeline.slug}" + (f", {torchscript_slug}" if torchscript_path else ""))
        log.info("loaded pipeline %s on %s", slug, device)
    return _LOADED[key]


def _adc_pipeline(slug: str, device: torch.device, adc: ADCOptions, batching: dict) -> Pipeline:
    from worker.pipelines.adc import ADCPipeline, StoreSource
    from worker.pipelines.weights import ModelStore

    store = ModelStore(models_dir=adc.models_dir, base_url=adc.base_url, hub_dir=adc.hub_dir)
    return ADCPipeline(device, PIPELINES[slug], StoreSource(store), include_logits=adc.include_logits,
                       idle_evict_s=adc.idle_evict_s, **batching)
