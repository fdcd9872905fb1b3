"""Wiring: from one ``Settings`` object to a ready ``Worker`` with its middlewares."""
from __future__ import annotations

import gc
import logging
import os
import time
from functools import partial
from pathlib import Path
from typing import Mapping

import torch

from worker.antenna import AntennaClient
from worker.daemon import Worker
from worker.hooks import Middleware
from worker.ingest import start_fork_server, wait_for_fork_server
from worker.pipelines import ADC_SLUGS, ADCOptions, load_pipeline, select_device, warm_up
from worker.planning import Planner, build_planner, read_worker_limits
from worker.posting import ResultPoster, Spool
from worker.settings import Settings, SettingsError
from watchdog.limits import Limits, find_cgroup, owns_cgroup
from watchdog.sampler import Sampler

log = logging.getLogger(__name__)


def offered_slugs(settings: Settings) -> list[str]:
    """Pipelines this worker serves: AMI_ANTENNA_PIPELINES, else ADC's ten (+ TorchScript).

    ``synthetic-moths`` and ``null`` are served only when named, so a worker left at its defaults
    never registers them with a real server."""
    if settings.pipeline_slugs:
        return settings.pipeline_slugs
    slugs = list(ADC_SLUGS)
    if settings.pipeline_torchscript_path:
        slugs.append(settings.pipeline_torchscript_slug)
    return slugs


def make_client(settings: Settings) -> AntennaClient:
    return AntennaClient(
        settings.antenna_api_base_url, settings.token,
        timeout_s=settings.antenna_api_timeout_s, max_attempts=settings.antenna_api_max_attempts,
    )


def adc_options(settings: Settings) -> ADCOptions:
    return ADCOptions(
        models_dir=settings.models_path, base_url=settings.models_base_url,
        hub_dir=Path(torch.hub.get_dir()) / "models", include_logits=settings.result_include_logits,
        idle_evict_s=settings.pipeline_idle_evict_s,
    )


def pipeline_loader(settings: Settings, device: torch.device):
    return partial(
        load_pipeline, device=device, torchscript_path=settings.pipeline_torchscript_path,
        torchscript_slug=settings.pipeline_torchscript_slug, reference_cost=settings.reference_pipeline_cost,
        adc=adc_options(settings),
        localization_batch_size=settings.localization_batch_size,
        classification_batch_size=settings.classification_batch_size,
        classification_threshold=settings.classification_threshold,
    )


def preload_pipelines(settings: Settings, pipelines) -> None:
    """Load every offered pipeline now and fetch and check its files: a missing or broken model
    fails the start, not the first job."""
    for slug in offered_slugs(settings):
        try:
            pipelines(slug).prepare()
        except (OSError, RuntimeError, ValueError) as error:
            variable = "AMI_PIPELINE_TORCHSCRIPT_PATH" if slug == settings.pipeline_torchscript_slug else "AMI_ANTENNA_PIPELINES"
            raise SettingsError(f"{variable}: pipeline {slug!r} cannot be loaded: {str(error).splitlines()[0][:300]}") from None


def warm_up_pipelines(settings: Settings, pipelines) -> None:
    """One synthetic image through every offered pipeline (see ``worker.pipelines.warm_up``). A
    failure is logged, not fatal: the model loaded, and a job's images get per-image errors."""
    for slug in offered_slugs(settings):
        started_s = time.perf_counter()
        try:
            if warm_up(pipelines(slug)):
                log.info("warmed up pipeline %s in %.2f s", slug, time.perf_counter() - started_s)
        except Exception as error:  # a model that fails on the synthetic image must not stop the start
            log.warning("warm-up of pipeline %s failed: %s: %.200s", slug, type(error).__name__, error)


def freeze_startup_objects() -> None:
    """Move what start-up made (imports, models, the warm-up's survivors) out of the cyclic
    collector's reach: they live as long as the process, and a full collection then walks only
    what jobs create (the probe's baseline and each loader's close run one)."""
    gc.collect()
    gc.freeze()


def make_sampler(settings: Settings, on_sample) -> Sampler:
    """One sampler of this process tree; it uses the cgroup's usage when the worker owns its cgroup."""
    paths = find_cgroup()
    owned = paths if paths is not None and owns_cgroup(paths) else None
    return Sampler(os.getpid(), interval_s=settings.watchdog_interval_s, cgroup=owned, on_sample=on_sample)


def startup_banner(settings: Settings, device: torch.device, limits: Limits) -> str:
    """One line with what an operator asks first: which build, on what, against which server."""
    from worker import __version__
    from worker.settings import redact_url

    cuda = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    if device.type == "cuda":
        cuda += f", {torch.cuda.device_count()} visible, using {torch.cuda.get_device_name(device)}"
    return (f"antenna-worker {__version__} starting: torch {torch.__version__} ({cuda}), device {device.type}, "
            f"API {redact_url(settings.antenna_api_base_url)}, pipelines {','.join(offered_slugs(settings))}, "
            f"memory limit {limits.effective_limit_bytes / 2**20:.0f} MiB ({limits.limit_source})")


def check_user_data_path(path: Path) -> None:
    """A path that cannot be a folder is a bad setting (a typo, a path under a file); an existing
    folder that is not writable (a read-only mount) is one ERROR line, and the worker goes on: its
    results still post, only what the API cannot take is not spooled."""
    error = Spool(path / "spool").unwritable()
    if error is None:
        return
    if not path.is_dir():
        raise SettingsError(f"AMI_USER_DATA_PATH={path} cannot be created ({error.strerror or error}); "
                            "set it to a writable folder (the result spool, corrections, advisories)")
    log.error("AMI_USER_DATA_PATH=%s is not writable: results the API cannot take will not be spooled "
              "(their tasks are redelivered after the reservation timeout), and memory corrections and "
              "advisories are not kept", path)


def build_worker(settings: Settings, *, burst: bool = False, middlewares: list[Middleware] | None = None,
                 planner: Planner | None = None, environ: Mapping[str, str] = {}) -> Worker:
    """The worker ``settings`` describe. ``environ`` is the process environment as the CLI read it
    (systemd's and OpenMP's variables); nothing below the CLI reads ``os.environ``."""
    settings.require_token()
    device = select_device(settings.device)
    if device.type == "cuda" and settings.gpu_memory_fraction < 1.0:
        torch.cuda.set_per_process_memory_fraction(settings.gpu_memory_fraction, device)
        log.info("CUDA allocations capped at %.0f%% of the device (AMI_GPU_MEMORY_FRACTION)",
                 100 * settings.gpu_memory_fraction)
    limits = read_worker_limits(settings)
    log.info("%s", startup_banner(settings, device, limits))
    check_user_data_path(settings.user_data_path)
    client = make_client(settings)
    poster = ResultPoster(
        make_client(settings), Spool(settings.user_data_path / "spool"),
        max_pending_posts=settings.antenna_max_pending_posts, max_post_bytes=settings.antenna_max_post_bytes,
    )
    pipelines = pipeline_loader(settings, device)
    loader_workers = settings.dataloader_num_workers > 0  # 0 is an explicit setting: no loader workers, ever
    if loader_workers:
        start_fork_server()  # imports torch for the loader workers while the models load
    preload_pipelines(settings, pipelines)
    warm_up_pipelines(settings, pipelines)
    freeze_startup_objects()
    if loader_workers:
        wait_for_fork_server()  # ready means a job's loader starts at once
    planner = build_planner(settings) if planner is None else planner
    if middlewares is None:
        from worker.middleware import build_middlewares

        middlewares = build_middlewares(settings, planner, environ)
    worker = Worker(
        settings, client=client, poster=poster, pipelines=pipelines,
        pipeline_slugs=offered_slugs(settings), middlewares=middlewares, planner=planner,
        burst=burst, cuda=device.type == "cuda", limits=limits, environ=environ,
    )
    worker.sampler = make_sampler(settings, worker._on_sample)
    return worker
