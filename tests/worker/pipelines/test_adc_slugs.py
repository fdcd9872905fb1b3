"""Each of ADC's ten pipelines end to end on its real architecture with random weights: checkpoints
in ADC's two formats and generated labels files are served by a loopback mirror through
``AMI_MODELS_BASE_URL``, fetched into the cache, built offline, and two generated images run.

Cost on this 2-core machine: the checkpoints (11 files, 1.2 GB) are written and fetched once per
module, the detector and the moth/non-moth model are built once and shared by the ten cases (as
the worker shares them), and the detector's internal resize is set to 240 px instead of 800 and its
box head scores 50 proposals instead of 1000 (model attributes, not weights: the stand-in
detector's one whole-image box per image comes back in original pixels either way).
quebec_vermont_moths_2023 runs with its real class count, 2,497.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import data_cache
from worker.imaging import decode
from worker.pipelines import ADCOptions, load_pipeline
from worker.pipelines.adc import ADCPipeline
from worker.pipelines.base import run_batch
from worker.pipelines.catalog import ADC_SLUGS, PIPELINES
from worker.pipelines.weights import read_labels
from worker.schema import PipelineResultsResponse, ResultItem, Task
from worker.testing.adc_models import ModelMirror, relative_path, write_models
from worker.testing.synthetic import generate_images

pytestmark = pytest.mark.timeout(300)

REAL_COUNT = {"quebec_vermont_species_classifier_apr_2024": 2497}
NESTED = {"moth_nonmoth_classifier", "panama_species_classifier_2023", "turing_costa_rica_species_classifier",
          "insect_order_classifier"}  # ADC's {"model_state_dict": ...} format; the others are bare state dicts
KEEP: list[torch.nn.Module] = []  # the shared detector and filter stay built across the cases


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("ami-models")
    write_models(root, num_classes=REAL_COUNT, nested=NESTED)
    with ModelMirror(root) as server:
        yield server
    shutil.rmtree(root)  # 1.2 GB


@pytest.fixture(scope="module")
def options(mirror, tmp_path_factory):
    cache = tmp_path_factory.mktemp("models-cache")
    yield ADCOptions(models_dir=cache, base_url=mirror.base_url, hub_dir=tmp_path_factory.mktemp("empty-hub"))
    shutil.rmtree(cache)
    KEEP.clear()


class _Loaded:
    def __init__(self, task: Task, image: torch.Tensor) -> None:
        self.task, self.image, self.error = task, image, None


@pytest.fixture(scope="module")
def items() -> list[_Loaded]:
    images = generate_images(data_cache() / "adc-320x240", 2, 320, 240, quality=85, seed=7, noise=4.0, prefix="adc-")
    return [_Loaded(Task(id=f"t{i}", image_id=str(100 + i), image_url=f"http://images/{i}.jpg", reply_subject=f"r{i}"),
                    decode(image.path.read_bytes(), max_pixels=10**8).tensor) for i, image in enumerate(images)]


def _cheap(pipeline: ADCPipeline) -> None:
    models = pipeline.loaded_models()
    models.detector.transform.min_size = (240,)
    models.detector.transform.max_size = 320
    models.detector.rpn._post_nms_top_n["testing"] = 50  # boxes the box head scores (1000 in torchvision)
    KEEP.extend(m.model for m in (models.binary, models.classifier) if m is not None and m.spec.key == "moth_nonmoth_classifier")
    KEEP.append(models.detector)


@pytest.mark.parametrize("slug", ADC_SLUGS)
def test_pipeline_runs_on_adc_format_checkpoints_fetched_from_the_mirror(slug, mirror, options, items):
    spec = PIPELINES[slug]
    pipeline = load_pipeline(slug, torch.device("cpu"), adc=options, localization_batch_size=2,
                             classification_batch_size=4)
    pipeline.prepare()
    for model in spec.models():
        for url in filter(None, (model.weights_url, model.labels_url)):
            assert (options.models_dir / Path(url).name).is_file()
            assert mirror.requests_for(relative_path(url)) == 1  # fetched once for all ten pipelines
    _cheap(pipeline)
    results = run_batch(pipeline, items)
    assert all(r.ok for r in results), [r.failure for r in results]
    labels = read_labels(options.models_dir / Path(spec.classifier.labels_url).name)
    assert len(labels) == REAL_COUNT.get(spec.classifier.key, 2 if slug == "moth_binary" else 4)
    for result, item in zip(results, items):
        body = ResultItem.model_validate(result.item().model_dump(mode="json"))
        assert isinstance(body.result, PipelineResultsResponse) and body.result.pipeline == slug
        detections = body.result.detections
        assert len(detections) >= 1
        height, width = item.image.shape[1:]
        for detection in detections:
            box = detection.bbox
            assert 0 <= box.x1 < box.x2 <= width and 0 <= box.y1 < box.y2 <= height
            assert all(float(v).is_integer() for v in (box.x1, box.y1, box.x2, box.y2))
            keys = [(c.algorithm.key, c.terminal) for c in detection.classifications]
            if spec.binary is not None:  # the stand-in filter says "moth" for every crop
                assert keys == [("moth_nonmoth_classifier", False), (spec.classifier.key, True)]
                assert detection.classifications[0].classification == "moth"
            else:
                assert keys == [(spec.classifier.key, True)]
            terminal = detection.classifications[-1]
            assert len(terminal.scores) == len(labels) == len(terminal.logits)
            assert all(math.isfinite(s) for s in terminal.scores) and abs(sum(terminal.scores) - 1) < 1e-3
            assert terminal.classification == labels[max(range(len(labels)), key=terminal.scores.__getitem__)]
    config = pipeline.config()
    assert [a["key"] for a in config["algorithms"]] == [m.key for m in spec.models()]
    assert config["algorithms"][-1]["category_map"]["labels"] == list(labels)
    pipeline.unload()  # the process-wide pipeline cache keeps the pipeline; its species model can go
