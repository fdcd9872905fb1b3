"""End to end with ADC's models: ``worker register``, then ``worker run --burst`` with
``quebec_vermont_moths_2023`` against the local server in strict mode (it saves results as Antenna
does). Randomly initialised checkpoints of ADC's architectures in ADC's two formats (the binary
model's nested under ``model_state_dict``) and generated labels files (``adc_models.write_models``:
one whole-image detection per image, every crop ``moth``, so the species model runs) are served by
that server as a model mirror (``AMI_MODELS_BASE_URL``). Every task must be saved, none lost.

Slow on purpose: the FasterRCNN forward pass takes ~10-30 s per image on a shared 2-core CPU.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import data_cache, worker_env
from worker.pipelines.catalog import PIPELINES
from worker.testing.antenna_server import LocalAntenna
from worker.testing.adc_models import write_models
from worker.testing.synthetic import generate_preset, with_integer_ids

SLUG = "quebec_vermont_moths_2023"
SPEC = PIPELINES[SLUG]
SPECIES_CLASSES = 12


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("adc-mirror")
    write_models(root, [SLUG], num_classes={SPEC.classifier.key: SPECIES_CLASSES}, nested=[SPEC.binary.key])
    yield root
    shutil.rmtree(root, ignore_errors=True)  # ~350 MB of weights


def worker(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", "--env-file", os.devnull, *args], env=env,
                          capture_output=True, text=True, timeout=timeout_s, cwd=cwd)


@pytest.mark.timeout(900)
def test_register_then_burst_run_saves_every_task(antenna_factory, mirror, tmp_path) -> None:
    server: LocalAntenna = antenna_factory(require_registration=True)
    images = with_integer_ids(generate_preset(data_cache(), "tiny", 2, seed=11), first=9001)
    env = worker_env(server, tmp_path, AMI_ANTENNA_PIPELINES=SLUG, AMI_MODELS_BASE_URL=server.mount(mirror),
                     AMI_MODELS_DIR=str(tmp_path / "models"), TORCH_HOME=str(tmp_path / "torch-home"),
                     AMI_AUTOTUNE="false", AMI_ANTENNA_API_BATCH_SIZE="2", AMI_LOCALIZATION_BATCH_SIZE="1",
                     AMI_CLASSIFICATION_BATCH_SIZE="32", AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="0")
    registered = worker(["register"], env, tmp_path, 120)
    assert registered.returncode == 0, registered.stderr[-3000:]
    stored = server.registry.snapshot()
    assert stored["pipelines"][SLUG]["algorithms"] == [m.key for m in SPEC.models()]
    assert stored["algorithms"][SPEC.classifier.key]["category_map_entries"] == SPECIES_CLASSES

    job_id = server.add_job(images, SLUG)
    ran = worker(["run", "--burst"], env, tmp_path, 840)
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = server.report(job_id)
    assert report.results_unsaved == 0, report.unsaved_reasons
    assert (report.results_ok, report.results_error, report.lost, report.complete) == (2, 0, 0, True)
    classifications = [c["algorithm"]["key"] for post in server.result_posts for item in post["results"]
                       for d in item["result"]["detections"] for c in d["classifications"]]
    detections = sum(len(item["result"]["detections"]) for post in server.result_posts for item in post["results"])
    assert detections > 0 and classifications.count(SPEC.binary.key) == detections
    assert classifications.count(SPEC.classifier.key) == detections, "every crop is a moth: species for each"
