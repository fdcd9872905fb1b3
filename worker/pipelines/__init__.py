"""Pipelines by slug: the contract (``base``), the built-in ones that need no weights
(``reference``), and a user's TorchScript model (``torchscript``).

``load_pipeline`` builds each pipeline once per process and reuses it across jobs.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from worker.pipelines.base import (
    OVERHEAD_REPEATS,
    Classification,
    Detection,
    Pipeline,
    batch_overhead_s,
    run_batch,
    warm_up,
)
from worker.pipelines.reference import NullPipeline, ReferencePipeline
from worker.pipelines.torchscript import TorchScriptPipeline
from worker.settings import SettingsError

log = logging.getLogger(__name__)

__all__ = [
    "OVERHEAD_REPEATS", "Classification", "Detection", "NullPipeline", "Pipeline", "ReferencePipeline",
    "TorchScriptPipeline", "batch_overhead_s", "load_pipeline", "run_batch", "select_device", "warm_up",
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


_LOADED: dict[tuple, Pipeline] = {}


def load_pipeline(slug: str, device: torch.device, *, torchscript_path: Optional[Path] = None,
                  torchscript_slug: str = "torchscript", reference_cost: int = 1, **batching: object) -> Pipeline:
    """Load once per process and reuse across jobs (models are costly to build)."""
    key = (slug, str(device), str(torchscript_path), reference_cost, tuple(sorted(batching.items())))
    if key not in _LOADED:
        if slug == ReferencePipeline.slug:
            _LOADED[key] = ReferencePipeline(device, cost=reference_cost, **batching)
        elif slug == NullPipeline.slug:
            _LOADED[key] = NullPipeline(device, **batching)  # type: ignore[arg-type]
        elif torchscript_path is not None and slug == torchscript_slug:
            _LOADED[key] = TorchScriptPipeline(device, torchscript_path, torchscript_slug, **batching)
        else:
            raise ValueError(f"unknown pipeline {slug!r}: known are {ReferencePipeline.slug}, {NullPipeline.slug}"
                             + (f", {torchscript_slug}" if torchscript_path else ""))
        log.info("loaded pipeline %s on %s", slug, device)
    return _LOADED[key]
