"""``worker models fetch`` and ``worker models list``: ADC's model files ahead of a run.

``fetch`` downloads every weights and labels file the chosen pipelines need into the cache (for
compute nodes without internet: run it on a login node with the same ``AMI_MODELS_DIR``) and checks
each checkpoint is whole. ``list`` says, per file, whether it is in the cache, in ADC's torch-hub
cache, missing, or bad (in the cache but not what its name says, e.g. an HTML page a wrong mirror
sent to an older version; ``fetch`` replaces it); it never downloads.
"""
from __future__ import annotations

import logging
from typing import Optional, TextIO

from worker.pipelines.architectures import CheckpointError, check_checkpoint_file
from worker.pipelines.catalog import ADC_SLUGS, ModelSpec, all_models
from worker.pipelines.weights import ModelFileError, ModelStore, content_problem, file_name
from worker.settings import Settings, SettingsError

log = logging.getLogger(__name__)


def model_store(settings: Settings) -> ModelStore:
    from pathlib import Path

    import torch

    return ModelStore(models_dir=settings.models_path, base_url=settings.models_base_url,
                      hub_dir=Path(torch.hub.get_dir()) / "models")


def chosen_slugs(requested: Optional[list[str]], settings: Settings) -> list[str]:
    """``--pipelines``, else the ADC slugs of AMI_ANTENNA_PIPELINES, else all ten."""
    if requested:
        slugs = [s.strip() for item in requested for s in item.split(",") if s.strip()]
        unknown = [s for s in slugs if s not in ADC_SLUGS]
        if unknown:
            raise SettingsError(f"--pipelines: {', '.join(unknown)} not ADC pipelines; known are {', '.join(ADC_SLUGS)}")
        return slugs
    configured = [s for s in settings.pipeline_slugs if s in ADC_SLUGS]
    return configured or list(ADC_SLUGS)


def _files(models: list[ModelSpec]) -> list[tuple[ModelSpec, str]]:
    return [(m, url) for m in models for url in (m.weights_url, m.labels_url) if url]


def run_fetch(settings: Settings, requested: Optional[list[str]], out: TextIO) -> int:
    store = model_store(settings)
    slugs = chosen_slugs(requested, settings)
    failed = 0
    for model, url in _files(all_models(slugs)):
        try:
            path = store.fetch(url)
            if url == model.weights_url:
                check_checkpoint_file(path)
        except (ModelFileError, CheckpointError) as error:
            if error.problem == "cache_unwritable":  # every other file would fail the same way
                raise SettingsError(str(error)) from None
            failed += 1
            print(f"FAILED  {file_name(url)}: {error}", file=out)
            continue
        print(f"ok      {path} ({path.stat().st_size} bytes)", file=out)
    print(f"{'all' if not failed else 'NOT all'} files for {', '.join(slugs)} are in {store.models_dir}"
          + (f" ({failed} failed)" if failed else ""), file=out)
    return 1 if failed else 0


def run_list(settings: Settings, requested: Optional[list[str]], out: TextIO) -> int:
    store = model_store(settings)
    slugs = chosen_slugs(requested, settings)
    missing = bad = 0
    for model, url in _files(all_models(slugs)):
        origin, path = store.locate(url)
        missing += origin == "absent"
        bad += origin == "bad"
        size = f"{path.stat().st_size} bytes" if origin != "absent" else "-"
        why = f" ({content_problem(path, url)})" if origin == "bad" else ""
        print(f"{'missing' if origin == 'absent' else origin:8} {size:>16}  {model.key:45} {path}{why}", file=out)
    print(f"{missing} missing" + (f", {bad} bad (`worker models fetch` replaces them)" if bad else "")
          + f"; source {settings.models_base_url}", file=out)
    return 1 if missing or bad else 0
