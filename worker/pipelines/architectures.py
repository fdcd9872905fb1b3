"""ADC's model architectures, built offline (random initialisation, no pretrained download), and
strict checkpoint loading with ``torch.load(weights_only=True)``.

- Detector: torchvision FasterRCNN-ResNet50-FPN as ADC builds it. ADC leaves torchvision's default
  ImageNet backbone on, which makes the backbone use ``FrozenBatchNorm2d`` (and downloads the
  backbone at construction). Here the backbone is built with ``FrozenBatchNorm2d`` and no weights:
  the same modules and state-dict keys, so ADC's checkpoint loads strictly and eval outputs are
  bit-identical (tests/worker/pipelines/test_architectures.py builds ADC's call with the download
  replaced and compares).
- ``resnet50``: torchvision resnet50 with ``fc = Linear(2048, N)``. ADC builds its 2024 species
  models with timm's ``resnet50``; timm's state dict has the same keys and shapes and the forward
  pass is the same, so torchvision's model loads those checkpoints strictly (proved by a test).
- ``turing_resnet50``: ADC's Turing wrapper (``backbone`` Sequential, ``classifier`` without bias).
- ``convnext_tiny``: timm ``convnext_tiny.fb_in22k`` (ADC's deprecated alias ``convnext_tiny_in22k``).
"""
from __future__ import annotations

import logging
import math
import pickle
import zipfile
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from worker.pipelines.catalog import ArchitectureKind

log = logging.getLogger(__name__)

DETECTOR_BOXES_PER_IMAGE = 500  # ADC's box_detections_per_img

CheckpointProblem = Literal["missing", "unreadable", "needs_pickle", "not_a_state_dict", "mismatch"]


class CheckpointError(RuntimeError):
    """A weights file that cannot be used; ``str()`` is one line naming the file and the fix."""

    def __init__(self, problem: CheckpointProblem, path: Path, detail: str) -> None:
        self.problem = problem
        self.path = path
        super().__init__(f"{path}: {detail}")


class TuringResNet50(nn.Module):
    """ADC's Turing species classifier: resnet50 without avgpool/fc as ``backbone``, then
    average pool and a bias-free ``classifier`` (keys ``backbone.0.*`` ... ``backbone.7.*``)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        import torchvision

        resnet = torchvision.models.resnet50(weights=None)
        self.backbone = nn.Sequential(*list(resnet.children())[:-2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(resnet.fc.in_features, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.backbone(x)), 1))


DETECTOR_MIN_SIZE_PX = 800  # torchvision's FasterRCNN defaults, as ADC builds it
DETECTOR_MAX_SIZE_PX = 1333
DETECTOR_SIZE_DIVISIBLE_PX = 32  # the transform pads the batch to multiples of this


def detector_input_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the tensor the detector's backbone sees for a ``width x height`` image:
    scaled so the short side is 800 px unless the long side would pass 1333, then padded to
    multiples of 32 (``GeneralizedRCNNTransform``)."""
    scale = min(DETECTOR_MIN_SIZE_PX / max(1, min(width, height)), DETECTOR_MAX_SIZE_PX / max(1, max(width, height)))
    step = DETECTOR_SIZE_DIVISIBLE_PX
    return tuple(-(-math.floor(side * scale) // step) * step for side in (width, height))  # type: ignore[return-value]


def build_detector() -> nn.Module:
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    # torchvision's fasterrcnn_resnet50_fpn with a pretrained backbone: FrozenBatchNorm2d and 3
    # trainable layers (trainability does not matter at inference; it is kept for equal modules).
    backbone = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    return FasterRCNN(_resnet_fpn_extractor(backbone, 3), num_classes=2, min_size=DETECTOR_MIN_SIZE_PX,
                      max_size=DETECTOR_MAX_SIZE_PX, box_detections_per_img=DETECTOR_BOXES_PER_IMAGE)


def build_classifier(architecture: ArchitectureKind, num_classes: int) -> nn.Module:
    if architecture == "resnet50":
        import torchvision

        model = torchvision.models.resnet50(weights=None)
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model
    if architecture == "turing_resnet50":
        return TuringResNet50(num_classes)
    if architecture == "convnext_tiny":
        import timm

        return timm.create_model("convnext_tiny.fb_in22k", pretrained=False, num_classes=num_classes)
    raise ValueError(f"{architecture!r} is not a classifier architecture")


def build_model(architecture: ArchitectureKind, num_classes: int = 0) -> nn.Module:
    """A randomly initialised model of ``architecture``; nothing is downloaded."""
    if architecture == "fasterrcnn_resnet50_fpn":
        return build_detector()
    return build_classifier(architecture, num_classes)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """ADC's checkpoint formats: a state dict, or a dict whose truthy ``model_state_dict`` is one.

    Loaded with ``weights_only=True`` onto the CPU: a file that needs pickle code execution is
    refused. Raises ``CheckpointError`` with one line.
    """
    if not path.is_file():
        raise CheckpointError("missing", path, "weights file is missing; run `worker models fetch`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            "needs_pickle", path, "checkpoint needs pickle code execution, which is refused "
            "(torch.load weights_only=True); re-save it with torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            "unreadable", path, f"weights file is unreadable ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:120]}); delete it and run `worker models fetch`") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError("not_a_state_dict", path, f"checkpoint is a {type(checkpoint).__name__}, not a state dict")
    nested = checkpoint.get("model_state_dict")
    state = nested if nested else checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("not_a_state_dict", path, "checkpoint holds no state dict of tensors")
    return state


def load_model(architecture: ArchitectureKind, path: Path, device: torch.device, num_classes: int = 0) -> nn.Module:
    """Build ``architecture``, load ``path`` strictly, move to ``device``, eval mode.

    The modules are built on the meta device and take the checkpoint's tensors as they are
    (``assign=True``): no random initialisation of weights the checkpoint replaces anyway."""
    state = read_state_dict(path)
    with torch.device("meta"):
        model = build_model(architecture, num_classes)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        first = " ".join(str(error).split())[:240]
        raise CheckpointError("mismatch", path, f"does not fit {architecture} with {num_classes} classes: {first}") from None
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # a tensor the state dict does not hold (none in ADC's architectures): build it for real
        model = build_model(architecture, num_classes)
        model.load_state_dict(state, strict=True)
    log.debug("loaded %s (%d tensors) from %s", architecture, len(state), path)
    # float32 as ADC's models are: load_state_dict without assign casts a half checkpoint into them
    return model.float().to(device).eval()


def check_checkpoint_file(path: Path) -> None:
    """Cheap start-up check that ``path`` is a whole checkpoint archive (not truncated).

    torch's zip format keeps its directory at the end of the file, so a truncated download fails
    here without reading the tensors. Raises ``CheckpointError``.
    """
    if not path.is_file():
        raise CheckpointError("missing", path, "weights file is missing; run `worker models fetch`")
    if not zipfile.is_zipfile(path):
        read_state_dict(path)  # torch's legacy (pre-1.6) format has no directory: load it whole
