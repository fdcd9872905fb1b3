"""This worker and ADC share one Antenna: whoever registers first, the other's results are saved.

The server is the local one in strict mode (it saves results as Antenna does). ADC's side is built
by hand from shared/adc-pipelines.md (``worker.testing.adc_wire``); this worker's side is its real
``ADCPipeline`` (registration from the labels files, results from ``run_batch`` and the poster),
with a detector test double (known boxes), a moth/non-moth test double (moth, nonmoth, moth... by
crop order) and a real randomly initialised ResNet-50 species classifier.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from torch import nn

from tests.conftest import TOKEN
from worker.antenna import AntennaClient
from worker.ingest import LoadedImage
from worker.pipelines import run_batch
from worker.pipelines.adc import ADCPipeline
from worker.pipelines.architectures import build_model
from worker.pipelines.catalog import PIPELINES, ModelSpec
from worker.posting import ResultPoster, Spool
from worker.results import ImageResult
from worker.schema import PipelineResultsResponse
from worker.testing import adc_wire
from worker.testing.antenna_server import LocalAntenna
from worker.testing.synthetic import SyntheticImage, generate_preset, with_integer_ids

pytestmark = pytest.mark.timeout(120)

SLUG = "quebec_vermont_moths_2023"
SPEC = PIPELINES[SLUG]
BINARY_LABELS = ("moth", "nonmoth")
SPECIES_LABELS = tuple(f"Genus species{i}" for i in range(7))
BOXES = [(10, 12, 90, 80), (120, 40, 200, 130), (300, 200, 380, 290)]


class KnownBoxesDetector(nn.Module):
    """TEST DOUBLE for the FasterRCNN detector: the same three boxes at score 0.95 in every image
    (a random FasterRCNN finds ~100 boxes per image and takes ~30 s per image on this CPU)."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        boxes = torch.tensor(BOXES, dtype=torch.float32)
        return [{"boxes": boxes, "scores": torch.full((len(BOXES),), 0.95), "labels": torch.ones(len(BOXES))}
                for _ in images]


class AlternatingBinary(nn.Module):
    """TEST DOUBLE for the moth/non-moth classifier: in each forward call crop 0 moth, 1 nonmoth,
    2 moth, ... so both gating branches run (a random network's labels are whatever its weights say)."""

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        moth = torch.arange(len(crops)) % 2 == 0
        return torch.stack([torch.where(moth, 2.0, -2.0), torch.where(moth, -2.0, 2.0)], dim=1)


class TestSource:
    """TEST DOUBLE for ``StoreSource``: labels in memory; the detector and filter are the doubles
    above, the species classifier a real random ResNet-50 (ADC's architecture for this slug)."""

    def labels(self, spec: ModelSpec) -> tuple[str, ...]:
        return BINARY_LABELS if spec.key == SPEC.binary.key else SPECIES_LABELS

    def prepare(self, spec: ModelSpec) -> None:
        pass

    def model(self, spec: ModelSpec, device: torch.device, num_classes: int) -> nn.Module:
        if spec.task_type == "localization":
            return KnownBoxesDetector()
        if spec.key == SPEC.binary.key:
            return AlternatingBinary()
        torch.manual_seed(0)
        return build_model(spec.architecture, num_classes).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticImage]:
    return with_integer_ids(generate_preset(tmp_path_factory.mktemp("synthetic"), "tiny", 3), first=501)


@pytest.fixture
def strict(antenna_factory) -> LocalAntenna:
    return antenna_factory(require_registration=True)


def adc_registration() -> dict:
    terminal = adc_wire.quebec_vermont_classifier(SPECIES_LABELS)
    binary = adc_wire.binary_classifier(BINARY_LABELS)
    return adc_wire.registration_body([adc_wire.pipeline_config(SLUG, terminal, binary)])


def worker_pipeline() -> ADCPipeline:
    return ADCPipeline(torch.device("cpu"), SPEC, TestSource(), localization_batch_size=2, classification_batch_size=2)


def register_as_adc(server: LocalAntenna) -> dict:
    """ADC's exact registration body, posted as ADC's client does."""
    response = requests.post(f"{server.base_url}/projects/1/pipelines/", json=adc_registration(),
                             headers={"Authorization": f"Token {TOKEN}"}, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def post_worker_results(server: LocalAntenna, job_id: int, images: list[SyntheticImage], tmp_path: Path) -> ResultPoster:
    """Reserve every task, run this worker's pipeline on the images as one batch, post the results."""
    client = AntennaClient(server.base_url, TOKEN, timeout_s=10.0)
    by_id = {image.image_id: image for image in images}
    tasks = client.reserve_tasks(job_id, len(images))
    items = [LoadedImage(task, decode(by_id[task.image_id].path)) for task in tasks]
    poster = ResultPoster(client, Spool(tmp_path / "spool"))
    poster.submit(job_id, run_batch(worker_pipeline(), items, SLUG))
    assert poster.flush(timeout_s=60)
    return poster


def decode(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()


def classification_keys(server: LocalAntenna) -> list[tuple[str, bool]]:
    return [(c["algorithm"]["key"], c["terminal"]) for post in server.result_posts for item in post["results"]
            for d in item["result"].get("detections", []) for c in d["classifications"]]


def test_adc_registers_first_and_this_workers_results_are_saved(strict, images, tmp_path) -> None:
    client = AntennaClient(strict.base_url, TOKEN, timeout_s=10.0)
    register_as_adc(strict)
    adc_state = strict.registry.snapshot()
    again = client.register_pipelines(1, "Antenna worker", [worker_pipeline().config()])
    assert again["algorithms_created"] == [] and again["pipelines_created"] == []
    assert strict.registry.snapshot()["pipelines"] == adc_state["pipelines"]
    assert strict.registry.snapshot()["algorithms"] == adc_state["algorithms"], "same keys, names, uris, maps"
    job_id = strict.add_job(images, SLUG)
    poster = post_worker_results(strict, job_id, images, tmp_path)
    report = strict.report(job_id)
    assert (report.results_ok, report.results_unsaved, report.lost, report.complete) == (3, 0, 0, True), \
        report.unsaved_reasons
    assert poster.counters.replaced_items == 0
    keys = classification_keys(strict)
    # 9 crops, in chunks of 2 alternating moth, nonmoth: 5 moths get the species classification too.
    assert keys.count((SPEC.binary.key, False)) == 9 and keys.count((SPEC.classifier.key, True)) == 5


def test_this_worker_registers_first_and_adcs_results_are_saved(strict, images) -> None:
    client = AntennaClient(strict.base_url, TOKEN, timeout_s=10.0)
    client.register_pipelines(1, "Antenna worker", [worker_pipeline().config()])
    worker_state = strict.registry.snapshot()
    answer = register_as_adc(strict)
    assert answer["algorithms_created"] == [] and strict.registry.snapshot()["algorithms"] == worker_state["algorithms"]
    job_id = strict.add_job(images, SLUG)
    tasks = client.reserve_tasks(job_id, len(images))
    terminal = adc_wire.quebec_vermont_classifier(SPECIES_LABELS)
    binary = adc_wire.binary_classifier(BINARY_LABELS)
    species_logits = [0.3, -1.0, 2.5, 0.0, 0.1, -0.2, 1.0]
    detections = [adc_wire.AdcDetection((5, 6, 50, 60), [2.0, -1.0], species_logits),
                  adc_wire.AdcDetection((70, 8, 120, 66), [-1.5, 1.5])]
    client.post_results(job_id, [{"reply_subject": t.reply_subject,
                                  "result": adc_wire.result(SLUG, t.image_id, t.image_url, detections, terminal, binary)}
                                 for t in tasks])
    report = strict.report(job_id)
    assert (report.results_ok, report.results_unsaved, report.complete) == (3, 0, True), report.unsaved_reasons


def test_global_model_results_behind_a_1_mib_proxy_are_split_and_all_saved(antenna_factory, images, tmp_path) -> None:
    """29,176-class scores and logits (~0.5 MB per detection) against nginx's default 1 MiB body
    limit, with the worker's default 32 MiB cap: the first body gets 413, is split, and every
    result is saved with full-length scores in map order."""
    server = antenna_factory(require_registration=True)
    labels = [f"Genus species{i}" for i in range(29_176)]
    terminal = adc_wire.AdcClassifier(
        name="Global Species Classifier - Aug 2024", key="global_species_classifier_aug_2024",
        weights_uri=f"{adc_wire.CLASSIFICATION_PREFIX}/global_resnet50_20240828_b06d3b3a.pth",
        labels_uri=f"{adc_wire.CLASSIFICATION_PREFIX}/global_category_map_with_names_20240828.json",
        labels=tuple(labels), taxon_rank="SPECIES")
    binary = adc_wire.binary_classifier(BINARY_LABELS)
    body = adc_wire.registration_body([adc_wire.pipeline_config("global_moths_2024", terminal, binary)])
    assert requests.post(f"{server.base_url}/projects/1/pipelines/", json=body, timeout=30,
                         headers={"Authorization": f"Token {TOKEN}"}).status_code == 201
    server.max_request_bytes = 1024 * 1024  # from here on (the registration body alone is ~2.6 MB)
    job_id = server.add_job(images, "global_moths_2024")
    client = AntennaClient(server.base_url, TOKEN, timeout_s=30.0)
    tasks = client.reserve_tasks(job_id, len(images))
    rng = np.random.default_rng(0)
    results = []
    for task in tasks:
        logits = np.round(rng.normal(size=len(labels)), 4).tolist()
        wire = adc_wire.result("global_moths_2024", task.image_id, task.image_url,
                               [adc_wire.AdcDetection((5, 5, 60, 60), [2.0, -2.0], logits)], terminal, binary)
        for classification in wire["detections"][0]["classifications"]:
            classification["scores"] = [round(s, 6) for s in classification["scores"]]  # as this worker rounds
        results.append(ImageResult(task, PipelineResultsResponse.model_validate(wire)))
    poster = ResultPoster(client, Spool(tmp_path / "spool"))  # default cap: 32 MiB
    poster.submit(job_id, results)
    assert poster.flush(timeout_s=60)
    report = server.report(job_id)
    assert (report.results_ok, report.results_unsaved, report.complete) == (3, 0, True), report.unsaved_reasons
    assert poster.counters.spooled_items == 0 and poster.counters.replaced_items == 0
    assert poster.counters.posted_bodies >= 2
    saved = [item["result"] for post in server.result_posts[-poster.counters.posted_bodies:] for item in post["results"]]
    assert all(len(r["detections"][0]["classifications"][1]["scores"]) == 29_176 for r in saved)
