"""One image path: the loader lane, the probe and ``worker tune --images`` load through
``worker.loading.ImageLoader``, so the same fault gives the same failure through each.

Real components: the local Antenna server serves the broken images, a real ``Loader`` reserves
and loads them, the probe's ``load_sample`` and tune's ``_load_images`` fetch the same URLs.
"""
from __future__ import annotations

import re

import pytest

from autotune.plan import LoaderPlan
from worker.commands.tune import _load_images
from worker.imaging import image_session
from worker.ingest import IngestSource, Loader
from worker.loading import ImageLoader, LoadedImage, image_timeout_s
from worker.probing import load_sample
from worker.schema import Task
from worker.settings import Settings

# Each injected fault and the reason every path gives it.
FAULT_REASONS = {"404": "not_found", "corrupt": "not_an_image", "truncated": "corrupt", "empty": "empty",
                 "html": "not_an_image", "reset": "connection", "bomb": "too_many_pixels", "drip": "timeout"}


def ingest_source(settings: Settings, job_id: int) -> IngestSource:
    """The IngestSource ``Worker.ingest_source`` builds from these settings."""
    return IngestSource(
        base_url=settings.antenna_api_base_url, token=settings.token, job_id=job_id,
        api_timeout_s=settings.antenna_api_timeout_s, api_max_attempts=settings.antenna_api_max_attempts,
        image_timeout_s=image_timeout_s(settings), image_deadline_s=settings.image_download_deadline_s,
        block_private_hosts=settings.block_private_image_hosts, max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
    )


def through_all_three(settings: Settings, job_id: int) -> dict[str, list[LoadedImage]]:
    """The job's tasks loaded by the loader lane, then by the probe and by tune, in the lane's order."""
    plan = LoaderPlan(tasks_per_reserve=16, batch_size=16, num_workers=0, prefetch_factor=2,
                      pin_memory=False, download_threads=8)
    with Loader(ingest_source(settings, job_id), plan) as loader:
        lane = [item for batch in loader for item in batch.items]
    tasks = [item.task for item in lane]
    probe, _samples, _external_cpu_s = load_sample(tasks, settings)
    tune, _tune_samples = _load_images([task.image_url for task in tasks], settings)
    return {"loader": lane, "probe": probe, "tune": tune}


def failures(items: list[LoadedImage]) -> list[tuple[str, str] | None]:
    """Each item's (reason, message); object addresses in Pillow's messages (``<... at 0x7f..>``)
    differ from run to run and are masked."""
    return [None if item.error is None else (item.error.reason, re.sub(r"0x[0-9a-f]+", "0x?", item.error.message))
            for item in items]


@pytest.mark.timeout(120)
def test_one_fault_gives_the_same_failure_through_the_loader_the_probe_and_tune(antenna, settings_for,
                                                                              tiny_images):
    images = tiny_images[:len(FAULT_REASONS) + 1]
    faults = {image.image_id: kind for image, kind in zip(images, FAULT_REASONS)}
    job_id = antenna.add_job(images, "synthetic-moths", image_faults=faults)
    # The deadline turns the drip (one byte every 2 s) into a timeout; a path without it would wait.
    settings = settings_for(antenna, image_download_deadline_s=1.0)

    loaded = through_all_three(settings, job_id)

    lane = loaded["loader"]
    expected = [FAULT_REASONS[faults[item.task.image_id]] if item.task.image_id in faults else None for item in lane]
    assert [None if f is None else f[0] for f in failures(lane)] == expected
    assert failures(loaded["probe"]) == failures(lane)
    assert failures(loaded["tune"]) == failures(lane)
    drip = next(item for item in lane if faults.get(item.task.image_id) == "drip")
    assert drip.error is not None and drip.error.message == (
        f"download exceeded AMI_IMAGE_DOWNLOAD_DEADLINE_S=1 s for {drip.task.image_url}")
    good = [[item for item in items if item.error is None] for items in loaded.values()]
    assert [[(i.jpeg_bytes, i.width, i.height) for i in items] for items in good] == [
        [(i.jpeg_bytes, i.width, i.height) for i in good[0]]] * 3
    assert len(good[0]) == 1 and good[0][0].first_byte_s is not None and good[0][0].decode_cpu_s > 0


@pytest.mark.timeout(60)
def test_blocked_private_hosts_hold_for_the_probe_and_tune_too(antenna, settings_for, tiny_images):
    """AMI_BLOCK_PRIVATE_IMAGE_HOSTS refuses the loopback image host through every path."""
    job_id = antenna.add_job(tiny_images[:2], "synthetic-moths")
    settings = settings_for(antenna, block_private_image_hosts=True)

    loaded = through_all_three(settings, job_id)

    for path, items in loaded.items():
        assert [f[0] if f else None for f in failures(items)] == ["bad_url", "bad_url"], path
        assert all("AMI_BLOCK_PRIVATE_IMAGE_HOSTS=true" in item.error.message for item in items), path


def test_a_local_file_over_the_byte_cap_is_refused_like_a_download(tmp_path, tiny_images):
    big = tmp_path / "big.jpg"
    big.write_bytes(tiny_images[0].path.read_bytes())
    images = ImageLoader(max_bytes=1024, max_pixels=80_000_000, timeout_s=1.0, local_files=True)
    session = image_session(1)
    try:
        item = images.load(session, Task(id="t", image_id="big", image_url=str(big), reply_subject="r"))
        missing = images.load(session, Task(id="m", image_id="m", image_url=str(tmp_path / "no.jpg"),
                                            reply_subject="r"))
        not_local = ImageLoader(max_bytes=1024, max_pixels=1, timeout_s=1.0).load(
            session, Task(id="u", image_id="u", image_url=str(big), reply_subject="r"))
    finally:
        session.close()
    assert item.error is not None and item.error.reason == "too_large"
    assert "over AMI_MAX_IMAGE_BYTES=1024" in item.error.message
    assert missing.error is not None and missing.error.reason == "other" and "cannot read" in missing.error.message
    assert not_local.error is not None and not_local.error.reason == "bad_url"  # a task's URL is never a path


def test_the_probe_times_a_noisy_decode_again_and_keeps_the_lower_cpu(tiny_images):
    """A shared host's noise only adds CPU time: a decode timed at several times its peers' cost
    per pixel is decoded again, and the lower time is the sample's."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from worker.loading import Fetched
    from worker.probing import DECODE_RETIME_RATIO, _decode, _retime_outliers

    images = ImageLoader(max_bytes=1 << 24, max_pixels=80_000_000, timeout_s=10.0)
    fetched = [Fetched(str(image.path), bytearray(image.path.read_bytes()), 0.0, 0.0) for image in tiny_images[:3]]
    decoded = [_decode(images, fetch) for fetch in fetched]
    assert all(d.decode_cpu_s > 0 for d in decoded)
    # the third as a noisy neighbour left it: ten times its CPU (a measured decode, inflated)
    noisy = replace(decoded[2], decode_cpu_s=decoded[2].decode_cpu_s * 10 + 0.05)
    with ThreadPoolExecutor(2) as pool:
        retimed = _retime_outliers(images, fetched, [decoded[0], decoded[1], noisy], pool)
        untouched = _retime_outliers(images, fetched, decoded, pool)
    assert retimed[2].decode_cpu_s < noisy.decode_cpu_s
    assert retimed[2].tensor is noisy.tensor  # the sample keeps its pixels, only its timing changes
    # the two real timings: untouched unless this host's own noise put one over the ratio too
    # (tiny images decode in well under a millisecond), and then never slower than measured
    fastest = min(d.decode_cpu_s / (d.width * d.height) for d in decoded[:2])
    for again, first in zip(retimed[:2], decoded[:2]):
        if first.decode_cpu_s / (first.width * first.height) <= DECODE_RETIME_RATIO * fastest:
            assert again is first
        else:
            assert again.tensor is first.tensor and again.decode_cpu_s <= first.decode_cpu_s
    fastest = min(d.decode_cpu_s / (d.width * d.height) for d in decoded)
    assert all(u is d for u, d in zip(untouched, decoded)
               if d.decode_cpu_s / (d.width * d.height) <= DECODE_RETIME_RATIO * fastest)
