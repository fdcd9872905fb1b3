"""A user's own TorchScript detector (``AMI_PIPELINE_TORCHSCRIPT_PATH``)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch

from worker.pipelines.base import Detection, Pipeline, unit_float
from worker.schema import AlgorithmReference


class TorchScriptPipeline(Pipeline):
    """A user's TorchScript model: ``forward(List[Tensor float (3,H,W) in [0,1]]) -> List[Dict]``
    with ``boxes`` (N,4 x1,y1,x2,y2 in the input's pixels), ``scores`` (N) and optional ``labels`` (N),
    the torchvision detection convention. Images are passed at full resolution."""

    name = "TorchScript"
    detector = AlgorithmReference(name="TorchScript detector", key="torchscript-detector")

    def __init__(self, device: torch.device, path: Path, slug: str = "torchscript", **kwargs: object) -> None:
        super().__init__(device, **kwargs)  # type: ignore[arg-type]
        self.slug = slug
        self.path = path
        with warnings.catch_warnings():
            # torch >= 2.13 deprecates TorchScript in favour of torch.export, but deployed
            # models are TorchScript files; loading them is still supported.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=DeprecationWarning)
            self.model = torch.jit.load(str(path), map_location=device).eval()

    @torch.no_grad()
    def infer(self, images: Sequence[torch.Tensor]) -> list[list[Detection]]:
        out: list[list[Detection]] = []
        for start in range(0, len(images), self.localization_batch_size):
            chunk = [unit_float(image.to(self.device)) for image in images[start:start + self.localization_batch_size]]
            for prediction in self.model(chunk):
                boxes = prediction["boxes"].cpu().tolist()
                scores = prediction["scores"].cpu().tolist()
                out.append([Detection(*box, score=score) for box, score in zip(boxes, scores)])
        return out
