"""Built-in pipelines that need no downloaded weights.

- ``ReferencePipeline`` (slug ``synthetic-moths``): a real torch detector + classifier. The detector
  finds dark specimens on a light sheet (fixed-weight blur, threshold, connected components by
  max-pool label propagation) and scores them with a small conv backbone; the classifier labels
  each crop by colour prototype (a fixed linear head) plus a conv feature stack, so its cost is that
  of a real small CNN.
- ``NullPipeline`` (slug ``null``): decode only, no model: measures the ingest ceiling.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from worker.pipelines.base import Classification, Detection, ModelInput, Pipeline, unit_float
from worker.schema import AlgorithmReference

DETECT_SIZE = (384, 512)  # (height, width) the detector's backbone sees; boxes are scaled back
LABEL_POOL = 2  # components are labelled at DETECT_SIZE / LABEL_POOL: 8x cheaper, boxes within a few px
CROP_SIZE = 128


class NullPipeline(Pipeline):
    slug = "null"
    name = "Null (decode only)"
    description = "No model: results with no detections; measures the ingest ceiling."
    detector = AlgorithmReference(name="Null (decode only) detector", key="null-detector")

    def infer(self, images: Sequence[torch.Tensor]) -> list[list[Detection]]:
        return [[] for _ in images]

    def model_input(self, width: int, height: int) -> ModelInput:
        """No model: nothing is resized or converted (the default, a float copy of each image,
        priced a 4096x3072 image at 144 MiB more than the null pipeline holds)."""
        return ModelInput(0, 0)


def _to_device_resized(image: torch.Tensor, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """uint8 (3,H,W), or float in [0,1], -> float (3,h,w) in [0,1] on ``device``; a uint8 image gets
    no full-size float copy on the host."""
    if device.type == "cpu":
        return unit_float(F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0])
    on_device = unit_float(image.to(device, non_blocking=True))
    return F.interpolate(on_device[None], size=size, mode="bilinear", antialias=True)[0]


class SpecimenDetector(nn.Module):
    """Dark specimens on a light sheet: darkness -> blur -> threshold -> components; backbone scores them."""

    def __init__(self, threshold: float = 0.45, min_area_fraction: float = 0.0004, cost: int = 1) -> None:
        super().__init__()
        self.threshold = threshold
        self.cost = cost
        self.min_area_fraction = min_area_fraction
        self.blur = nn.Conv2d(1, 1, 5, padding=2, bias=False)
        nn.init.constant_(self.blur.weight, 1.0 / 25.0)
        generator = torch.Generator().manual_seed(7)
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(128, 1, 1),
        )
        for parameter in self.backbone.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """batch: float (B,3,h,w) in [0,1] -> (component labels (B,h,w) int64, objectness (B,h,w))."""
        darkness = F.avg_pool2d(self.blur(1.0 - batch.mean(dim=1, keepdim=True)), LABEL_POOL)
        mask = darkness > self.threshold
        # ``cost`` > 1 runs the backbone that many times (averaged: same result) to stand in for a
        # heavier model: real detectors cost seconds per image on a CPU.
        features = sum(self.backbone(batch) for _ in range(self.cost)) / self.cost
        objectness = torch.sigmoid(F.interpolate(features, size=mask.shape[-2:], mode="nearest"))
        return _label_components(mask[:, 0]), objectness[:, 0]


def _label_components(mask: torch.Tensor, max_iterations: int = 1024) -> torch.Tensor:
    """8-connected component labels by repeated 3x3 max-pool propagation of pixel indices."""
    height, width = mask.shape[-2:]
    index = torch.arange(1, height * width + 1, device=mask.device, dtype=torch.float32).view(1, height, width)
    labels = torch.where(mask, index, torch.zeros((), device=mask.device))
    for _ in range(max_iterations):
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def _boxes(labels: torch.Tensor, min_area_px: int) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (h,w) -> (boxes (N,4) x1,y1,x2,y2 in label-map pixels, component ids (N,))."""
    ys, xs = torch.nonzero(labels > 0, as_tuple=True)
    if ys.numel() == 0:
        return torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.long)
    ids, inverse = torch.unique(labels[ys, xs], return_inverse=True)
    count = ids.numel()
    def reduce(values: torch.Tensor, how: str, start: float) -> torch.Tensor:
        out = torch.full((count,), start, dtype=torch.float32, device=labels.device)
        return out.scatter_reduce(0, inverse, values.float(), reduce=how)
    boxes = torch.stack([reduce(xs, "amin", 1e9), reduce(ys, "amin", 1e9),
                         reduce(xs, "amax", -1.0) + 1, reduce(ys, "amax", -1.0) + 1], dim=1)
    keep = torch.bincount(inverse, minlength=count) >= min_area_px
    return boxes[keep].cpu(), ids[keep].cpu()


class ColourClassifier(nn.Module):
    """Labels a crop by the colour of its dark pixels (fixed prototypes) plus a conv feature stack."""

    PROTOTYPES = {  # RGB in [0,1] of the synthetic specimens' pigments
        "umber": (0.30, 0.20, 0.12), "slate": (0.18, 0.20, 0.26), "olive": (0.25, 0.27, 0.12),
        "wine": (0.32, 0.10, 0.14), "soot": (0.10, 0.10, 0.10), "rust": (0.40, 0.18, 0.08),
    }

    def __init__(self, temperature: float = 60.0) -> None:
        super().__init__()
        self.labels = tuple(self.PROTOTYPES)
        self.register_buffer("prototypes", torch.tensor(list(self.PROTOTYPES.values())))
        self.temperature = temperature
        generator = torch.Generator().manual_seed(11)
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(128, 256, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, len(self.labels)),
        )
        for parameter in self.features.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.02

    @torch.no_grad()
    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """crops: float (N,3,s,s) in [0,1] -> logits (N, classes)."""
        darkness = 1.0 - crops.mean(dim=1, keepdim=True)
        weight = (darkness > 0.45).float()
        mean_rgb = (crops * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)).clamp(min=1.0)
        distance = torch.cdist(mean_rgb, self.prototypes)
        return -self.temperature * distance + self.features(crops)


class ReferencePipeline(Pipeline):
    slug = "synthetic-moths"
    name = "Synthetic moths (reference)"
    description = "Built-in reference detector + classifier; needs no downloaded weights."
    detector = AlgorithmReference(name="Synthetic moths (reference) detector", key="synthetic-specimen-detector")
    classifier = AlgorithmReference(name="Synthetic moths (reference) classifier", key="synthetic-colour-classifier")

    def __init__(self, device: torch.device, *, cost: int = 1, **kwargs: object) -> None:
        super().__init__(device, **kwargs)  # type: ignore[arg-type]
        self.detector_model = SpecimenDetector(cost=cost).to(device).eval()
        self.classifier_model = ColourClassifier().to(device).eval()
        self.labels = self.classifier_model.labels

    def config(self) -> dict:
        config = super().config()
        config["algorithms"].append({
            "name": self.classifier.name, "key": self.classifier.key, "task_type": "classification",
            "category_map": {"labels": list(self.labels), "data": [
                {"index": i, "label": label} for i, label in enumerate(self.labels)]},
        })
        return config

    def model_input(self, width: int, height: int) -> ModelInput:
        """The detector's ``DETECT_SIZE``; on CPU the image is resized as uint8 before the float
        conversion (no full-size float copy), on CUDA converted first, on the device."""
        return ModelInput(DETECT_SIZE[0] * DETECT_SIZE[1], 0 if self.device.type == "cpu" else 1)

    def infer(self, images: Sequence[torch.Tensor]) -> list[list[Detection]]:
        found: list[list[tuple[float, float, float, float, float]]] = []
        for start in range(0, len(images), self.localization_batch_size):
            found.extend(self._detect(images[start:start + self.localization_batch_size]))
        crops, owners = [], []
        for index, (image, boxes) in enumerate(zip(images, found)):
            for box in boxes:
                crops.append(self._crop(image, box[:4]))
                owners.append(index)
        logits = self._classify(crops)
        results: list[list[Detection]] = [[] for _ in images]
        for row, (owner, box) in enumerate(zip(owners, (b for boxes in found for b in boxes))):
            results[owner].append(self._detection(box, logits[row] if logits is not None else None))
        return results

    def _detect(self, images: Sequence[torch.Tensor]) -> list[list[tuple[float, float, float, float, float]]]:
        batch = torch.stack([_to_device_resized(image, DETECT_SIZE, self.device) for image in images])
        labels, objectness = self.detector_model(batch)
        label_h, label_w = labels.shape[-2:]
        min_area_px = max(1, int(self.detector_model.min_area_fraction * label_h * label_w))
        out = []
        for image, label_map, score_map in zip(images, labels, objectness):
            boxes, ids = _boxes(label_map, min_area_px)
            scale_x = image.shape[2] / label_w
            scale_y = image.shape[1] / label_h
            scores = [float(score_map[label_map == i].mean()) for i in ids.tolist()]
            out.append([(float(b[0]) * scale_x, float(b[1]) * scale_y, float(b[2]) * scale_x,
                         float(b[3]) * scale_y, s) for b, s in zip(boxes, scores)])
        return out

    def _crop(self, image: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        region = image[:, max(0, y1):max(y1 + 1, y2), max(0, x1):max(x1 + 1, x2)]
        return _to_device_resized(region, (CROP_SIZE, CROP_SIZE), self.device)

    def _classify(self, crops: list[torch.Tensor]) -> Optional[torch.Tensor]:
        if not crops:
            return None
        chunks = [self.classifier_model(torch.stack(crops[i:i + self.classification_batch_size]))
                  for i in range(0, len(crops), self.classification_batch_size)]
        return torch.cat(chunks).cpu()

    def _detection(self, box: tuple, logits: Optional[torch.Tensor]) -> Detection:
        if logits is None:
            return Detection(*box[:4], score=box[4])
        scores = torch.softmax(logits, dim=0)
        best = int(scores.argmax())
        if float(scores[best]) < self.classification_threshold:
            return Detection(*box[:4], score=box[4])
        classification = Classification(self.classifier, self.labels[best],
                                        scores=tuple(round(float(s), 6) for s in scores),
                                        logits=tuple(round(float(v), 4) for v in logits))
        return Detection(*box[:4], score=box[4], classifications=(classification,))
