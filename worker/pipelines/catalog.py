"""The AMI Data Companion's ten pipelines as data: slugs, algorithm names and keys, weights and
labels URLs, architectures, crop transforms and taxon ranks (see shared/adc-pipelines.md).

Names, keys, descriptions and URLs are ADC's byte for byte: Antenna finds a registered algorithm
by (key, version) and refuses a result whose keys are not registered for its pipeline, so a
worker that registers or posts anything else cannot share a server with ADC.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Literal, Optional

ADC_MODELS_BASE_URL = "https://object-arbutus.cloud.computecanada.ca/ami-models"

ArchitectureKind = Literal[
    "fasterrcnn_resnet50_fpn",  # torchvision, FrozenBatchNorm2d backbone, 2 classes, 500 boxes
    "resnet50",  # torchvision resnet50, fc = Linear(2048, N); also loads timm resnet50 weights
    "turing_resnet50",  # resnet50 children minus avgpool/fc as `backbone`, `classifier` Linear(2048, N, bias=False)
    "convnext_tiny",  # timm convnext_tiny.fb_in22k, num_classes=N
]
TransformKind = Literal["resnet", "turing", "convnext"]
TaskType = Literal["localization", "classification"]
TaxonRank = Literal["SUPERFAMILY", "SPECIES", "ORDER"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSFORM_NORMALISATION: dict[TransformKind, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "resnet": (IMAGENET_MEAN, IMAGENET_STD),
    "turing": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "convnext": (IMAGENET_MEAN, IMAGENET_STD),
}

DETECTOR_SCORE_THRESHOLD = 0.80  # ADC keeps boxes whose score is strictly above this
MOTH_LABEL = "moth"
NONMOTH_LABEL = "nonmoth"


def algorithm_key(name: str) -> str:
    """ADC's key for an algorithm name (trapdata/common/utils.py ``slugify``).

    Lower-cased, spaces to ``_``, every character but ASCII letters, digits and ``_`` dropped,
    outer ``_`` trimmed, then each ``__`` replaced by ``_`` in one left-to-right pass (so a run of
    three underscores leaves two, as ADC's does).
    """
    allowed = set(string.ascii_letters + string.digits + "_")
    kept = "".join(c for c in name.replace(" ", "_").lower() if c in allowed)
    return kept.strip("_").replace("__", "_")


@dataclass(frozen=True)
class ModelSpec:
    """One of ADC's models. URLs are ADC's; ``weights.ModelStore`` maps them onto a mirror."""

    name: str
    description: str
    task_type: TaskType
    architecture: ArchitectureKind
    weights_url: str
    labels_url: Optional[str] = None  # the detector has none
    input_size_px: int = 0  # square crop side for classifiers; 0 for the detector
    transform: Optional[TransformKind] = None
    taxon_rank: Optional[TaxonRank] = None

    @property
    def key(self) -> str:
        return algorithm_key(self.name)


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline: the detector, the moth/non-moth filter where ADC runs one, the terminal model.

    Its registered name and description are those of its terminal classifier."""

    slug: str
    detector: ModelSpec
    binary: Optional[ModelSpec]
    classifier: ModelSpec

    @property
    def name(self) -> str:
        return self.classifier.name

    @property
    def description(self) -> str:
        return self.classifier.description

    def models(self) -> tuple[ModelSpec, ...]:
        """In ADC's registration order: detector, filter (if any), terminal classifier."""
        return (self.detector,) + ((self.binary,) if self.binary else ()) + (self.classifier,)


_CLASSIFICATION = f"{ADC_MODELS_BASE_URL}/moths/classification/"

DETECTOR = ModelSpec(
    name="FasterRCNN for AMI Moth Traps 2023",
    description=("Model trained on GBIF images and synthetic data in 2023. "
                 "Accurate but can be slow on a machine without GPU."),
    task_type="localization", architecture="fasterrcnn_resnet50_fpn",
    weights_url=f"{ADC_MODELS_BASE_URL}/moths/localization/fasterrcnn_resnet50_fpn_tz53qv9v.pt",
)

BINARY = ModelSpec(
    name="Moth / Non-Moth Classifier", description="Trained on April 17, 2024",
    task_type="classification", architecture="resnet50",
    weights_url=_CLASSIFICATION + "moth-nonmoth_resnet50_20240417_b4fe3efe.pth",
    labels_url=_CLASSIFICATION + "05-moth-nonmoth_category_map.json",
    input_size_px=128, transform="resnet", taxon_rank="SUPERFAMILY",
)


def _species(name: str, description: str, architecture: ArchitectureKind, weights: str, labels: str,
             *, size_px: int = 128, transform: TransformKind = "resnet") -> ModelSpec:
    return ModelSpec(name=name, description=description, task_type="classification", architecture=architecture,
                     weights_url=_CLASSIFICATION + weights, labels_url=_CLASSIFICATION + labels,
                     input_size_px=size_px, transform=transform, taxon_rank="SPECIES")


def _turing(name: str, description: str, weights: str, labels: str) -> ModelSpec:
    return _species(name, description, "turing_resnet50", weights, labels, size_px=300, transform="turing")


INSECT_ORDERS = ModelSpec(
    name="Insect Order Classifier",
    description="ConvNeXt-T based insect order classifier for 16 classes trained by Mila in January 2025",
    task_type="classification", architecture="convnext_tiny",
    weights_url=f"{ADC_MODELS_BASE_URL}/insect_orders/convnext_tiny_in22k_worder0.5_wbinary0.5_run2_checkpoint.pt",
    labels_url=f"{ADC_MODELS_BASE_URL}/insect_orders/insect_order_category_map.json",
    input_size_px=128, transform="convnext", taxon_rank="ORDER",
)

_TERMINAL: dict[str, ModelSpec] = {
    "panama_moths_2023": _species(
        "Panama Species Classifier 2023",
        "Trained on November 11th, 2023 using a corrected species list of 1060 classes.",
        "resnet50", "panama_resetnet50_best_5aeb515a.pth",
        "03_moths_centralAmerica_category_map-202311110-with-names.json"),
    "panama_moths_2024": _species(
        "Panama Species Classifier - Apr 2024",
        "Trained on April 17, 2024 for 636 species. "
        "https://wandb.ai/moth-ai/ami-gbif-fine-grained/runs/1sekgkan/overview",
        "resnet50", "panama_resnet50_baseline_20240417_edbb46dd.pth",
        "03_ami-gbif_fine-grained_c-america_category_map-with_names.json"),
    "quebec_vermont_moths_2023": _species(
        "Quebec & Vermont Species Classifier - Apr 2024",
        "Trained on April 17, 2024 for 2,497 species. "
        "https://wandb.ai/moth-ai/ami-gbif-fine-grained/runs/1x53zmp2/overview",
        "resnet50", "quebec-vermont_resnet50_baseline_20240417_950de764.pth",
        "01_ami-gbif_fine-grained_ne-america_category_map-with_names.json"),
    "uk_denmark_moths_2023": _species(
        "UK & Denmark Species Classifier - Apr 2024",
        "Trained on April 17, 2024 for 2,603 species. "
        "https://wandb.ai/moth-ai/ami-gbif-fine-grained/runs/x5u7jcbf/overview",
        "resnet50", "uk-denmark_resnet50_baseline_20240417_55250a8b.pth",
        "02_ami-gbif_fine-grained_w-europe_category_map-with_names.json"),
    "costa_rica_moths_turing_2024": _turing(
        "Turing Costa Rica Species Classifier", "Trained on 4th June 2024 by Turing team using Resnet50 model.",
        "turing-costarica_v03_resnet50_2024-06-04-16-17_state.pt", "03_costarica_data_category_map.json"),
    "anguilla_moths_turing_2024": _turing(
        "Turing Anguilla Species Classifier", "Trained on 28th June 2024 by Turing team using Resnet50 model.",
        "turing-anguilla_v01_resnet50_2024-06-28-17-01_state.pt", "01_anguilla_data_category_map.json"),
    "kenya-uganda_moths_turing_2024": _turing(
        "Turing Kenya and Uganda Species Classifier",
        "Trained on 19th November 2024 by Turing team using Resnet50 model.",
        "turing-kenya-uganda_v01_resnet50_2024-11-19-18-44_state.pt", "01_kenya-uganda_data_category_map.json"),
    "global_moths_2024": _species(
        "Global Species Classifier - Aug 2024",
        "Trained on August 28th, 2024 for 29,176 species. "
        "https://wandb.ai/moth-ai/global-moth-classifier/runs/h0cuqrbc/overview",
        "resnet50", "global_resnet50_20240828_b06d3b3a.pth", "global_category_map_with_names_20240828.json"),
    "moth_binary": BINARY,
    "insect_orders_2025": INSECT_ORDERS,
}

# ADC runs the moth/non-moth filter before every terminal classifier but these two.
_UNFILTERED = frozenset({"moth_binary", "insect_orders_2025"})

# In ADC's CLASSIFIER_CHOICES order: the order `ami worker` polls and registers them.
PIPELINES: dict[str, PipelineSpec] = {
    slug: PipelineSpec(slug=slug, detector=DETECTOR, binary=None if slug in _UNFILTERED else BINARY,
                       classifier=classifier)
    for slug, classifier in _TERMINAL.items()
}
ADC_SLUGS: tuple[str, ...] = tuple(PIPELINES)


def all_models(slugs: Optional[list[str]] = None) -> list[ModelSpec]:
    """The distinct models the given pipelines (default: all ten) need, in first-use order."""
    seen: dict[str, ModelSpec] = {}
    for slug in slugs or ADC_SLUGS:
        for model in PIPELINES[slug].models():
            seen.setdefault(model.weights_url, model)
    return list(seen.values())
