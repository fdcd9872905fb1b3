"""ADCPipeline's rules with test doubles for the models: where crops are cut, gating, terminal flags,
scores, boxes, chunking by the batch settings, the OOM split, registration, idle eviction.

The real architectures run in test_adc_slugs.py; here the models are doubles so each rule is
checked against known boxes and known crops, in milliseconds.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import pytest
import torch
from torch import nn

from worker.pipelines.adc import ADCPipeline, IdleEvictor
from worker.pipelines.base import run_batch
from worker.pipelines.catalog import IMAGENET_MEAN, IMAGENET_STD, PIPELINES, ModelSpec
from worker.pipelines.weights import ModelFileError
from worker.schema import PipelineResultsResponse, RegisterPipelines, ResultItem, Task

pytestmark = pytest.mark.timeout(60)

BACKGROUND = 220
# (x1, y1, x2, y2) in image pixels, fill colour; dark = a moth for the binary double
SPECIMENS = {
    1: [((20.7, 30.2, 60.9, 70.5), (40, 10, 10)), ((100.0, 50.0, 140.0, 90.0), (200, 200, 200)),
        ((150.0, 10.0, 190.0, 60.0), (10, 60, 10))],
    2: [((5.0, 5.0, 45.0, 25.0), (10, 10, 80))],
    3: [],
    4: [((20.9, 30.0, 370.0, 390.5), (10, 10, 80))],  # 400x400 image: the crop is scaled down
}
# boxes the detector double reports besides the specimens: not above 0.80, and degenerate after truncation
EXTRA = [((60.0, 60.0, 80.0, 80.0), 0.80), ((10.2, 100.0, 10.9, 120.0), 0.99), ((30.0, 40.0, 90.0, 40.5), 0.95)]


def make_image(image_id: int, height: int = 120, width: int = 200) -> torch.Tensor:
    """uint8 (3,H,W): light sheet, filled rectangles; pixel (0,0) of channel 0 carries the id."""
    image = torch.full((3, height, width), BACKGROUND, dtype=torch.uint8)
    for (x1, y1, x2, y2), colour in SPECIMENS[image_id]:
        image[:, int(y1):int(y2), int(x1):int(x2)] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
    image[0, 0, 0] = image_id
    return image


class KnownBoxesDetector(nn.Module):
    """TEST DOUBLE for the FasterRCNN: returns SPECIMENS[id] (score 0.9) + EXTRA for the image whose
    pixel (0,0) holds ``id`` (the input is float [0,1], as torchvision's detectors take it).
    Records the size of every call and the dtype and value range it was given."""

    def __init__(self, oom_above: Optional[int] = None) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.inputs: list[tuple[torch.dtype, float]] = []
        self.oom_above = oom_above

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        self.calls.append(len(images))
        if self.oom_above is not None and len(images) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test double)")
        out = []
        for image in images:
            self.inputs.append((image.dtype, float(image.max())))
            image_id = round(float(image[0, 0, 0]) * 255)
            found = [(box, 0.9) for box, _ in SPECIMENS[image_id]] + EXTRA
            out.append({"boxes": torch.tensor([b for b, _ in found], dtype=torch.float32).view(-1, 4),
                        "scores": torch.tensor([s for _, s in found]), "labels": torch.ones(len(found), dtype=torch.int64)})
        return out


class CropReporter(nn.Module):
    """TEST DOUBLE for a classifier: records every crop batch it is given (normalised, as the
    model sees it) and answers with logits whose largest entry is ``pick(crop)``."""

    def __init__(self, num_classes: int, pick, oom_above: Optional[int] = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.pick = pick
        self.batches: list[torch.Tensor] = []
        self.oom_above = oom_above

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        self.batches.append(crops.clone())
        if self.oom_above is not None and len(crops) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test double)")
        logits = torch.zeros(len(crops), self.num_classes)
        for row, crop in enumerate(crops):
            logits[row, self.pick(crop)] = 5.0
            logits[row, -1] += 0.5  # distinct values, so the order of scores is checkable
        return logits


def unnormalise(crop: torch.Tensor) -> torch.Tensor:
    return crop * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def is_dark(crop: torch.Tensor) -> bool:
    return float(unnormalise(crop).mean()) < 0.5


class DoubleSource:
    """TEST DOUBLE for StoreSource: labels from memory, the model doubles above, no files."""

    def __init__(self, *, binary_labels=("nonmoth", "moth"), species: int = 5, oom_above: Optional[int] = None) -> None:
        self.binary_labels = tuple(binary_labels)
        self.species_labels = tuple(f"species {i}" for i in range(species))
        self.detector = KnownBoxesDetector(oom_above=oom_above)
        moth_index = self.binary_labels.index("moth") if "moth" in self.binary_labels else 0
        self.binary = CropReporter(2, lambda crop: moth_index if is_dark(crop) else 1 - moth_index, oom_above)
        # species: the index of the crop's brightest channel (R -> 0, G -> 1, B -> 2)
        self.species = CropReporter(species, lambda crop: int(unnormalise(crop).mean(dim=(1, 2)).argmax()), oom_above)
        self.built: list[str] = []

    def labels(self, spec: ModelSpec) -> tuple[str, ...]:
        return self.binary_labels if spec.key == "moth_nonmoth_classifier" else self.species_labels

    def prepare(self, spec: ModelSpec) -> None:
        pass

    def model(self, spec: ModelSpec, device: torch.device, num_classes: int) -> nn.Module:
        self.built.append(spec.key)
        if spec.task_type == "localization":
            return self.detector
        return self.binary if spec.key == "moth_nonmoth_classifier" else self.species


def pipeline(slug: str = "quebec_vermont_moths_2023", source: Optional[DoubleSource] = None, **kwargs) -> ADCPipeline:
    return ADCPipeline(torch.device("cpu"), PIPELINES[slug], source or DoubleSource(), **kwargs)


def test_crops_are_cut_from_the_boxes_truncated_to_int():
    source = DoubleSource()
    results = pipeline(source=source).infer([make_image(1)])
    boxes = [(d.x1, d.y1, d.x2, d.y2) for d in results[0]]
    assert boxes == [(20.0, 30.0, 60.0, 70.0), (100.0, 50.0, 140.0, 90.0), (150.0, 10.0, 190.0, 60.0)]
    crops = source.binary.batches[0]
    assert crops.shape == (3, 3, 128, 128)
    for crop, (_, colour) in zip(crops, SPECIMENS[1]):
        # a crop inside one filled rectangle is that colour everywhere, stretched to 128x128
        expected = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255.0
        assert torch.allclose(unnormalise(crop), expected.expand(3, 128, 128), atol=1e-5)


def test_threshold_is_strict_and_degenerate_boxes_are_dropped():
    results = pipeline().infer([make_image(3)])
    assert results == [[]]  # EXTRA: a box at exactly 0.80 and two that truncate to zero width/height


def test_gating_terminal_flags_and_detector_order():
    source = DoubleSource()
    detections = pipeline(source=source).infer([make_image(1)])[0]
    flags = [[(c.algorithm.key, c.terminal) for c in d.classifications] for d in detections]
    assert flags == [
        [("moth_nonmoth_classifier", False), ("quebec_vermont_species_classifier_apr_2024", True)],
        [("moth_nonmoth_classifier", False)],  # the light rectangle: nonmoth, never sent to the species model
        [("moth_nonmoth_classifier", False), ("quebec_vermont_species_classifier_apr_2024", True)],
    ]
    assert [c.label for c in detections[1].classifications] == ["nonmoth"]
    assert [d.classifications[1].label for d in (detections[0], detections[2])] == ["species 0", "species 1"]
    assert sum(len(b) for b in source.species.batches) == 2


def test_scores_full_length_finite_in_label_order_and_logits_optional():
    detection = pipeline().infer([make_image(2)])[0][0]
    species = detection.classifications[1]
    assert len(species.scores) == 5 and all(math.isfinite(s) for s in species.scores)
    assert abs(sum(species.scores) - 1.0) < 1e-5
    assert max(range(5), key=lambda i: species.scores[i]) == 2 and species.label == "species 2"  # blue crop
    assert species.scores[4] > species.scores[0]  # the double adds 0.5 to the last logit
    assert len(species.logits) == 5 and species.logits[2] == 5.0
    binary = detection.classifications[0]
    assert binary.label == "moth" and len(binary.scores) == 2 and binary.scores[1] > binary.scores[0]
    no_logits = pipeline(include_logits=False).infer([make_image(2)])[0][0]
    assert all(c.logits is None for c in no_logits.classifications)


def test_binary_label_order_comes_from_the_labels_file():
    source = DoubleSource(binary_labels=("moth", "nonmoth"))
    detections = pipeline(source=source).infer([make_image(1)])[0]
    assert [len(d.classifications) for d in detections] == [2, 1, 2]


def test_unfiltered_pipelines_classify_every_detection_as_terminal():
    source = DoubleSource()
    binary_only = pipeline("moth_binary", source).infer([make_image(1)])[0]
    assert [[(c.label, c.terminal) for c in d.classifications] for d in binary_only] == [
        [("moth", True)], [("nonmoth", True)], [("moth", True)]]
    orders = pipeline("insect_orders_2025", DoubleSource()).infer([make_image(1)])[0]
    assert all(len(d.classifications) == 1 and d.classifications[0].terminal for d in orders)
    assert orders[0].classifications[0].algorithm.key == "insect_order_classifier"


def test_forward_passes_follow_the_batch_settings():
    source = DoubleSource()
    images = [make_image(i) for i in (1, 2, 3, 1, 2)]
    results = pipeline(source=source, localization_batch_size=2, classification_batch_size=2).infer(images)
    assert [len(r) for r in results] == [3, 1, 0, 3, 1]
    assert source.detector.calls == [2, 2, 1]
    # per detector chunk (images 1+2, 3+1, 2): 4, 3 and 1 crops, two per classifier pass
    assert [len(b) for b in source.binary.batches] == [2, 2, 2, 1, 1]
    assert [len(b) for b in source.species.batches] == [2, 1, 2, 1]  # the moths: 3, 2, 1
    assert all(dtype == torch.float32 and top <= 1.0 for dtype, top in source.detector.inputs)


def test_out_of_memory_splits_the_chunk_before_any_image_fails():
    source = DoubleSource(oom_above=1)
    images = [make_image(1), make_image(2), make_image(1)]
    split = pipeline(source=source, localization_batch_size=3, classification_batch_size=4).infer(images)
    expected = pipeline(localization_batch_size=3, classification_batch_size=4).infer(images)
    assert [[(d.x1, d.y1, d.x2, d.y2, [c.label for c in d.classifications]) for d in r] for r in split] == \
        [[(d.x1, d.y1, d.x2, d.y2, [c.label for c in d.classifications]) for d in r] for r in expected]
    assert source.detector.calls == [3, 1, 2, 1, 1]  # 3 fails -> 1 + 2; 2 fails -> 1 + 1
    assert max(len(b) for b in source.binary.batches) == 4 and {len(b) for b in source.binary.batches} >= {1}


def test_after_an_out_of_memory_split_later_passes_start_at_the_size_that_fitted():
    source = DoubleSource(oom_above=1)
    adc = pipeline(source=source, localization_batch_size=3, classification_batch_size=4)
    images = [make_image(1), make_image(2), make_image(1)]
    adc.infer(images)
    source.detector.calls.clear()
    source.binary.batches.clear()
    adc.infer(images)
    assert source.detector.calls == [1, 1, 1]  # no failing pass of 3 first
    assert [len(b) for b in source.binary.batches] == [1] * 7
    assert adc.unload()
    source.detector.calls.clear()
    adc.infer(images)
    assert source.detector.calls[0] == 3  # unloading forgets what was learnt


def test_a_single_item_out_of_memory_reaches_run_batch_as_one_failed_image():
    source = DoubleSource(oom_above=0)
    items = [_Loaded(Task(id="t1", image_id="11", image_url="u", reply_subject="r"), make_image(2))]
    results = run_batch(pipeline(source=source), items)
    assert not results[0].ok and results[0].failure.reason == "inference"


class _Loaded:
    def __init__(self, task: Task, image: torch.Tensor) -> None:
        self.task, self.image, self.error = task, image, None


def test_results_validate_as_antenna_results():
    items = [_Loaded(Task(id=f"t{i}", image_id=str(i), image_url=f"http://x/{i}.jpg", reply_subject=f"r{i}"),
                     make_image(i)) for i in (1, 2, 3)]
    results = run_batch(pipeline(), items)
    bodies = [ResultItem.model_validate(r.item().model_dump(mode="json")) for r in results]
    first = bodies[0].result
    assert isinstance(first, PipelineResultsResponse) and first.pipeline == "quebec_vermont_moths_2023"
    assert [len(b.result.detections) for b in bodies] == [3, 1, 0]
    assert first.detections[0].algorithm.key == "fasterrcnn_for_ami_moth_traps_2023"
    assert first.detections[0].bbox.x1 == 20.0



def test_float_images_in_0_1_are_taken_as_they_are_and_left_unchanged():
    """ADC's loader hands its models float [0,1] images, and so does the benchmark-only float32
    ingest (AMI_BENCHMARK_PLAN_JSON): they give the results of their uint8 pixels, not those of
    an image divided by 255 once more, and the caller's tensors are not written to."""
    images = [make_image(1), make_image(2), make_image(4, 400, 400)]
    floats = [image.float().div(255.0) for image in images]
    before = [image.clone() for image in floats]
    tasks = [Task(id=f"t{i}", image_id=str(i), image_url=f"http://x/{i}.jpg", reply_subject=f"r{i}") for i in range(3)]
    uint8_source, float_source = DoubleSource(), DoubleSource()
    expected = run_batch(pipeline(source=uint8_source), [_Loaded(t, i) for t, i in zip(tasks, images)])
    found = run_batch(pipeline(source=float_source), [_Loaded(t, i) for t, i in zip(tasks, floats)])
    assert all(r.ok for r in found), [r.failure for r in found]
    assert [[(d.bbox, [c.classification for c in d.classifications]) for d in r.result.detections] for r in found] \
        == [[(d.bbox, [c.classification for c in d.classifications]) for d in r.result.detections] for r in expected]
    for seen, wanted in zip(float_source.species.batches + float_source.binary.batches,
                            uint8_source.species.batches + uint8_source.binary.batches):
        assert torch.allclose(seen, wanted, atol=1e-5)
    assert all(torch.equal(image, copy) for image, copy in zip(floats, before))


def test_registration_is_adcs_body_from_labels_alone():
    source = DoubleSource()
    config = pipeline(source=source).config()
    assert source.built == []  # no model was built
    assert [a["key"] for a in config["algorithms"]] == [
        "fasterrcnn_for_ami_moth_traps_2023", "moth_nonmoth_classifier", "quebec_vermont_species_classifier_apr_2024"]
    assert (config["name"], config["slug"], config["version"], config["stages"]) == (
        "Quebec & Vermont Species Classifier - Apr 2024", "quebec_vermont_moths_2023", 1, [])
    assert config["description"].startswith("Trained on April 17, 2024 for 2,497 species.")
    detector, binary, species = config["algorithms"]
    assert detector["task_type"] == "localization" and detector["category_map"] == {
        "data": [], "labels": [], "version": None, "description": None, "uri": None}
    assert detector["uri"] == PIPELINES["moth_binary"].detector.weights_url
    assert binary["category_map"]["data"] == [{"index": 0, "label": "nonmoth", "taxon_rank": "SUPERFAMILY"},
                                              {"index": 1, "label": "moth", "taxon_rank": "SUPERFAMILY"}]
    assert binary["category_map"]["uri"].endswith("/05-moth-nonmoth_category_map.json")
    assert species["category_map"]["labels"] == [f"species {i}" for i in range(5)]
    assert {e["taxon_rank"] for e in species["category_map"]["data"]} == {"SPECIES"}
    assert all(a["version"] == 1 and a["version_name"] is None for a in config["algorithms"])
    RegisterPipelines(processing_service_name="AMI Data Companion", pipelines=[config])  # the wire model takes it
    orders = pipeline("insect_orders_2025", DoubleSource()).config()["algorithms"]
    assert [a["key"] for a in orders] == ["fasterrcnn_for_ami_moth_traps_2023", "insect_order_classifier"]
    assert orders[1]["category_map"]["data"][0]["taxon_rank"] == "ORDER"


def test_binary_labels_without_moth_are_refused_at_construction():
    with pytest.raises(ModelFileError) as error:
        pipeline(source=DoubleSource(binary_labels=("insect", "nonmoth")))
    assert "moth" in str(error.value) and "\n" not in str(error.value)


def test_idle_pipeline_drops_its_models_and_reloads_on_demand():
    source = DoubleSource()
    adc = pipeline(source=source, idle_evict_s=30.0)
    adc.infer([make_image(2)])
    assert adc.is_loaded() and len(source.built) == 3
    assert not adc.evict_if_idle(time.monotonic() + 10)  # used 10 s ago: kept
    assert adc.evict_if_idle(time.monotonic() + 31)
    assert not adc.is_loaded()
    assert len(adc.infer([make_image(2)])[0]) == 1
    assert adc.is_loaded() and len(source.built) == 6


def test_the_evictor_thread_unloads_idle_pipelines():
    evictor = IdleEvictor()
    adc = pipeline(idle_evict_s=0.2)
    adc.infer([make_image(2)])
    evictor.watch(adc)
    deadline_s = time.monotonic() + 10
    while adc.is_loaded() and time.monotonic() < deadline_s:
        time.sleep(0.05)
    assert not adc.is_loaded()


@pytest.mark.parametrize("slug, size_px, mean, std", [
    ("quebec_vermont_moths_2023", 128, IMAGENET_MEAN, IMAGENET_STD),
    ("costa_rica_moths_turing_2024", 300, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ("insect_orders_2025", 128, IMAGENET_MEAN, IMAGENET_STD),
])
def test_crops_equal_adcs_torchvision_transform_chain(slug, size_px, mean, std):
    """ADC crops the float image and applies torchvision's Resize((s, s), antialias=True) and
    Normalize; the pipeline's crop of the uint8 image, made float on the device, gives the same."""
    from torchvision import transforms

    generator = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 400, 400), dtype=torch.uint8, generator=generator)
    image[:, :, :] = torch.where(image < 128, image, make_image(4, 400, 400))  # the specimen stays dark: a moth
    image[0, 0, 0] = 4
    source = DoubleSource()
    pipeline(slug, source).infer([image])
    seen = source.species.batches[0][0]
    x1, y1, x2, y2 = (int(v) for v in SPECIMENS[4][0][0])
    chain = transforms.Compose([transforms.Resize((size_px, size_px), antialias=True), transforms.Normalize(mean, std)])
    expected = chain(image.float().div(255.0)[:, y1:y2, x1:x2])
    assert seen.shape == (3, size_px, size_px)
    assert torch.allclose(seen, expected, atol=1e-5)
