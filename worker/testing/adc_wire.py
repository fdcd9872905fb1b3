"""Bodies built by hand exactly as the AMI Data Companion's ``ami worker`` sends them.

An independent oracle for compatibility tests: a server where ADC registered first must save this
worker's results, and a server where this worker registered first must save ADC's. Facts from
/work/shared/adc-pipelines.md: section 1 (registration: names, keys, version 1, category map
objects, algorithm order detector, binary filter, terminal classifier) and section 3.5 (one result
per image: ``algorithms`` {}, ``config`` {"example_config_param": null}, naive local timestamps,
``labels`` null, full-length ``scores`` and ``logits``, binary ``terminal: false`` first).
Nothing here is imported by the worker.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping, Optional, Sequence

MODELS_PREFIX = "https://object-arbutus.cloud.computecanada.ca/ami-models"
CLASSIFICATION_PREFIX = f"{MODELS_PREFIX}/moths/classification"
DETECTOR_NAME = "FasterRCNN for AMI Moth Traps 2023"
DETECTOR_KEY = "fasterrcnn_for_ami_moth_traps_2023"
DETECTOR_URI = f"{MODELS_PREFIX}/moths/localization/fasterrcnn_resnet50_fpn_tz53qv9v.pt"
BINARY_NAME = "Moth / Non-Moth Classifier"
BINARY_KEY = "moth_nonmoth_classifier"


@dataclass(frozen=True)
class AdcClassifier:
    """One ADC classifier as registered: ``labels`` in model index order (index i = position i)."""

    name: str
    key: str
    weights_uri: str
    labels_uri: str
    labels: tuple[str, ...]
    taxon_rank: str
    description: str = ""


def binary_classifier(labels: Sequence[str]) -> AdcClassifier:
    return AdcClassifier(
        name=BINARY_NAME, key=BINARY_KEY,
        weights_uri=f"{CLASSIFICATION_PREFIX}/moth-nonmoth_resnet50_20240417_b4fe3efe.pth",
        labels_uri=f"{CLASSIFICATION_PREFIX}/05-moth-nonmoth_category_map.json",
        labels=tuple(labels), taxon_rank="SUPERFAMILY")


def quebec_vermont_classifier(labels: Sequence[str]) -> AdcClassifier:
    return AdcClassifier(
        name="Quebec & Vermont Species Classifier - Apr 2024", key="quebec_vermont_species_classifier_apr_2024",
        weights_uri=f"{CLASSIFICATION_PREFIX}/quebec-vermont_resnet50_baseline_20240417_950de764.pth",
        labels_uri=f"{CLASSIFICATION_PREFIX}/01_ami-gbif_fine-grained_ne-america_category_map-with_names.json",
        labels=tuple(labels), taxon_rank="SPECIES")


def labels_in_index_order(labels_file: Mapping[str, int]) -> list[str]:
    """A labels file (``{"<label>": index}``) as the label list ADC registers."""
    return [label for label, _ in sorted(labels_file.items(), key=lambda item: item[1])]


def category_map(classifier: Optional[AdcClassifier]) -> dict:
    if classifier is None:  # the detector: ADC attaches an empty map object
        return {"data": [], "labels": [], "version": None, "description": None, "uri": None}
    return {"data": [{"index": i, "label": label, "taxon_rank": classifier.taxon_rank}
                     for i, label in enumerate(classifier.labels)],
            "labels": list(classifier.labels), "version": None, "description": None,
            "uri": classifier.labels_uri}


def algorithm_config(classifier: AdcClassifier) -> dict:
    return {"name": classifier.name, "key": classifier.key, "task_type": "classification",
            "description": classifier.description, "version": 1, "version_name": None,
            "uri": classifier.weights_uri, "category_map": category_map(classifier)}


def detector_config() -> dict:
    return {"name": DETECTOR_NAME, "key": DETECTOR_KEY, "task_type": "localization", "description": "",
            "version": 1, "version_name": None, "uri": DETECTOR_URI, "category_map": category_map(None)}


def pipeline_config(slug: str, terminal: AdcClassifier, binary: Optional[AdcClassifier]) -> dict:
    """ADC's PipelineConfigResponse: named and described after the terminal classifier, version 1."""
    algorithms = [detector_config()] + ([algorithm_config(binary)] if binary is not None else [])
    return {"name": terminal.name, "slug": slug, "version": 1, "description": terminal.description,
            "algorithms": algorithms + [algorithm_config(terminal)], "stages": []}


def registration_body(pipelines: Sequence[dict], hostname: str = "adc-host") -> dict:
    return {"processing_service_name": f"AMI Data Companion ({hostname})", "pipelines": list(pipelines)}


@dataclass(frozen=True)
class AdcDetection:
    """A detection as ADC reports it: an int box and what the classifiers said (logits per model)."""

    box: tuple[int, int, int, int]
    binary_logits: Optional[Sequence[float]] = None
    terminal_logits: Optional[Sequence[float]] = None


def classification(classifier: AdcClassifier, logits: Sequence[float], terminal: bool, timestamp: str) -> dict:
    peak = max(logits)
    exps = [math.exp(v - peak) for v in logits]
    total = sum(exps)
    scores = [e / total for e in exps]
    best = max(range(len(scores)), key=scores.__getitem__)
    return {"classification": classifier.labels[best], "labels": None, "scores": scores,
            "logits": list(logits), "inference_time": 0.0,
            "algorithm": {"name": classifier.name, "key": classifier.key}, "terminal": terminal,
            "timestamp": timestamp}


def result(slug: str, image_id: str, image_url: str, detections: Sequence[AdcDetection],
           terminal: AdcClassifier, binary: Optional[AdcClassifier]) -> dict:
    """One image's PipelineResultsResponse as ADC's worker posts it (section 3.5)."""
    timestamp = datetime.now().isoformat()  # naive local time, as ADC
    responses = []
    for detection in detections:
        classifications = []
        if binary is not None and detection.binary_logits is not None:
            classifications.append(classification(binary, detection.binary_logits, False, timestamp))
        if detection.terminal_logits is not None:
            classifications.append(classification(terminal, detection.terminal_logits, True, timestamp))
        x1, y1, x2, y2 = detection.box
        responses.append({
            "source_image_id": image_id, "bbox": {"x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2)},
            "inference_time": 0.0, "algorithm": {"name": DETECTOR_NAME, "key": DETECTOR_KEY},
            "timestamp": timestamp, "crop_image_url": None, "classifications": classifications})
    return {"pipeline": slug, "algorithms": {}, "total_time": 0.5,
            "source_images": [{"id": image_id, "url": image_url}], "detections": responses,
            "config": {"example_config_param": None}}
