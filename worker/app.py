"""Wiring: from one ``Settings`` object to a ready ``Worker`` with its middlewares."""
from __future__ import annotations

import logging
from functools import partial

import torch

from worker.antenna import AntennaClient
from worker.daemon import Worker
from worker.hooks import Middleware
from worker.pipeline import NullPipeline, ReferencePipeline, load_pipeline, select_device
from worker.posting import ResultPoster, Spool
from worker.settings import Settings

log = logging.getLogger(__name__)


def offered_slugs(settings: Settings) -> list[str]:
    """Pipelines this worker serves: AMI_ANTENNA_PIPELINES, else every built-in one (+ TorchScript)."""
    if settings.pipeline_slugs:
        return settings.pipeline_slugs
    slugs = [ReferencePipeline.slug, NullPipeline.slug]
    if settings.pipeline_torchscript_path:
        slugs.append(settings.pipeline_torchscript_slug)
    return slugs


def make_client(settings: Settings) -> AntennaClient:
    return AntennaClient(
        settings.antenna_api_base_url, settings.token,
        timeout_s=settings.antenna_api_timeout_s, max_attempts=settings.antenna_api_max_attempts,
    )


def pipeline_loader(settings: Settings, device: torch.device):
    return partial(
        _load, device=device, torchscript_path=settings.pipeline_torchscript_path,
        torchscript_slug=settings.pipeline_torchscript_slug,
        localization_batch_size=settings.localization_batch_size,
        classification_batch_size=settings.classification_batch_size,
        classification_threshold=settings.classification_threshold,
    )


def _load(slug: str, **kwargs):
    return load_pipeline(slug, **kwargs)


def default_middlewares(settings: Settings) -> list[Middleware]:
    middlewares: list[Middleware] = []
    try:
        from worker.middlewares import build_middlewares
    except ImportError:
        return middlewares
    return build_middlewares(settings)


def build_worker(settings: Settings, *, burst: bool = False, middlewares: list[Middleware] | None = None) -> Worker:
    settings.require_token()
    device = select_device(settings.device)
    client = make_client(settings)
    poster = ResultPoster(
        make_client(settings), Spool(settings.user_data_path / "spool"),
        max_pending_posts=settings.antenna_max_pending_posts, max_post_bytes=settings.antenna_max_post_bytes,
    )
    return Worker(
        settings, client=client, poster=poster, pipelines=pipeline_loader(settings, device),
        pipeline_slugs=offered_slugs(settings),
        middlewares=default_middlewares(settings) if middlewares is None else middlewares,
        burst=burst, cuda=device.type == "cuda",
    )
