"""memray on the ingest of one large image: no hidden float32 or duplicate copies.

The image is downloaded from the local server and decoded through ``worker.imaging`` exactly as
a loader does, under ``memray.Tracker``. A 4096x3072 image is 36 MiB as uint8; a float32 copy
would add 144 MiB and a second uint8 copy 36 MiB. The compressed JPEG (~23 MB here) has to be
held while it is decoded, so no ingest can peak below ``jpeg + decoded``: the 1.5x budget applies
to the decoded image itself (decode step alone) and to what the whole ingest allocates beyond
the compressed bytes.
"""
from __future__ import annotations

from pathlib import Path

import memray
import pytest
import torch

from tests.conftest import worker_env
from worker.imaging import decode, download, fix_mmap_threshold, image_session

BUDGET = 1.5


def peak_bytes(path: Path) -> int:
    return memray.FileReader(str(path)).metadata.peak_memory


@pytest.mark.timeout(120)
def test_large_image_ingest_peaks_within_1_5x_its_decoded_size(antenna, large_images, tmp_path):
    fix_mmap_threshold()
    image = large_images[0]
    decoded_bytes = image.width * image.height * 3
    job_id = antenna.add_job([image], "null")
    url = antenna._ledger.reserve(job_id, 1)[0]["image_url"]
    session = image_session(1)
    try:
        with memray.Tracker(tmp_path / "ingest.bin"):
            data = download(session, url, max_bytes=100_000_000, timeout_s=60)
            tensor = decode(data, max_pixels=80_000_000).tensor
            jpeg_bytes = len(data)
            del data
        data = download(session, url, max_bytes=100_000_000, timeout_s=60)
        with memray.Tracker(tmp_path / "decode.bin"):
            again = decode(data, max_pixels=80_000_000).tensor
    finally:
        session.close()

    assert tensor.dtype == again.dtype == torch.uint8
    assert tensor.shape == (3, image.height, image.width)
    decode_peak = peak_bytes(tmp_path / "decode.bin")
    ingest_peak = peak_bytes(tmp_path / "ingest.bin")
    assert decoded_bytes <= decode_peak <= BUDGET * decoded_bytes, (decode_peak, decoded_bytes)
    assert ingest_peak - jpeg_bytes <= BUDGET * decoded_bytes, (ingest_peak, jpeg_bytes, decoded_bytes)


@pytest.mark.timeout(180)
def test_worker_run_memray_records_the_run(antenna, tiny_images, tmp_path):
    import subprocess
    import sys

    job_id = antenna.add_job(tiny_images[:2], "synthetic-moths")
    out = tmp_path / "run.bin"
    env = worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES="synthetic-moths",
                     AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="0")
    done = subprocess.run([sys.executable, "-m", "worker.cli", "--env-file", "/dev/null", "run", "--burst",
                           "--memray", str(out)], env=env, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert antenna.report(job_id).results_ok == 2
    reader = memray.FileReader(str(out))
    assert reader.metadata.peak_memory > 1024 * 1024 and reader.metadata.total_allocations > 0
