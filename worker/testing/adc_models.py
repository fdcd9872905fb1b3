"""Stand-ins for ADC's model files, and a loopback mirror to serve them.

``write_models`` writes, for the chosen pipelines, a randomly initialised checkpoint of each model's
real architecture in ADC's layout (``<root>/moths/classification/<file>`` ...) and a generated labels
file, so ``AMI_MODELS_BASE_URL`` can point at ``<root>`` (``file://``) or at a ``ModelMirror``
serving it. Three weights are set rather than random, so every run exercises every stage:

- the detector's proposals are its anchors and its box head scores every box 0.95 and stretches
  it past the image, so after clipping and NMS there is one detection per image, the whole image
  (a random detector
  finds nothing above ADC's 0.80 threshold, and a detector that passes hundreds of random boxes
  costs minutes per image in crops on a CPU);
- the moth/non-moth model says ``moth`` for every crop, so the species model runs.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Mapping, Optional
from urllib.parse import unquote

import torch

from worker.pipelines.architectures import build_classifier, build_detector
from worker.pipelines.catalog import ADC_MODELS_BASE_URL, BINARY, MOTH_LABEL, NONMOTH_LABEL, ModelSpec, all_models

DEFAULT_CLASSES = 4


def relative_path(url: str) -> str:
    """``moths/classification/<file>``: the URL's path under ADC's prefix."""
    return url[len(ADC_MODELS_BASE_URL) + 1:]


def labels_for(spec: ModelSpec, num_classes: int) -> dict[str, int]:
    if spec.weights_url == BINARY.weights_url:
        return {MOTH_LABEL: 0, NONMOTH_LABEL: 1}
    return {f"{spec.key} class {i}": i for i in range(num_classes)}


def write_models(root: Path, slugs: Optional[Iterable[str]] = None, *, num_classes: Mapping[str, int] | int = DEFAULT_CLASSES,
                 nested: bool | Iterable[str] = False, seed: int = 0) -> list[Path]:
    """Write checkpoints and labels for ``slugs`` (default all ten) under ``root``; returns the files.

    ``num_classes`` per classifier key (or one count for all but the moth/non-moth model, which has
    two); ``nested`` (True, or the model keys to nest) wraps a state dict as
    ``{"model_state_dict": ...}``, ADC's other format. Existing weights files are kept."""
    nested_keys = None if isinstance(nested, bool) else frozenset(nested)
    torch.manual_seed(seed)
    written = []
    for spec in all_models(list(slugs) if slugs else None):
        weights = root / relative_path(spec.weights_url)
        if spec.labels_url:
            count = num_classes if isinstance(num_classes, int) else num_classes.get(spec.key, DEFAULT_CLASSES)
            labels = labels_for(spec, count)
            path = root / relative_path(spec.labels_url)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(labels))
            written.append(path)
        if not weights.exists():
            weights.parent.mkdir(parents=True, exist_ok=True)
            state = _state_dict(spec, len(labels) if spec.labels_url else 0)
            wrap = nested if nested_keys is None else spec.key in nested_keys
            torch.save({"model_state_dict": state, "note": "random init"} if wrap else state, weights)
        written.append(weights)
    return written


def _state_dict(spec: ModelSpec, num_classes: int) -> dict[str, torch.Tensor]:
    if spec.architecture == "fasterrcnn_resnet50_fpn":
        model = build_detector()
        predictor = model.roi_heads.box_predictor
        with torch.no_grad():
            model.rpn.head.bbox_pred.weight.zero_()  # proposals are the anchors themselves (>= 22 px)
            model.rpn.head.bbox_pred.bias.zero_()
            predictor.cls_score.weight.zero_()
            predictor.cls_score.bias.copy_(torch.tensor([0.0, 3.0]))  # softmax 0.953 for "object"
            predictor.bbox_pred.weight.zero_()
            # deltas (0, 0, 25, 25) / box coder weights (10, 10, 5, 5): width and height x e^4.1 (the
            # clamp), so every anchor-sized box covers the image after clipping and NMS keeps one
            predictor.bbox_pred.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 25.0, 25.0]))
        return model.state_dict()
    model = build_classifier(spec.architecture, num_classes)
    if spec.weights_url == BINARY.weights_url:
        with torch.no_grad():
            model.fc.weight.zero_()
            model.fc.bias.copy_(torch.tensor([4.0, 0.0]))  # index 0 is "moth"
    return model.state_dict()


@dataclass
class _Cut:
    after_bytes: Optional[int]  # None: send it all
    times: int
    delay_s: float = 0.0  # before the body


@dataclass
class MirrorStats:
    requests: dict[str, int] = field(default_factory=dict)


class ModelMirror:
    """A loopback HTTP server for a folder laid out like ADC's ami-models (``base_url`` = its root).

    Counts GET requests per path; ``cut(path, after_bytes, times)`` makes the next ``times``
    responses for ``path`` announce the full Content-Length and close after ``after_bytes``;
    ``slow(path, delay_s, times)`` makes them wait ``delay_s`` after the headers."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.stats = MirrorStats()
        self._cuts: dict[str, _Cut] = {}
        self._lock = threading.Lock()
        self._server = _MirrorServer(("127.0.0.1", 0), _MirrorHandler)
        self._server.mirror = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="model-mirror", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/ami-models"

    def start(self) -> "ModelMirror":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "ModelMirror":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def cut(self, relative: str, after_bytes: int, times: int = 1) -> None:
        with self._lock:
            self._cuts[relative] = _Cut(after_bytes, times)

    def slow(self, relative: str, delay_s: float, times: int = 1) -> None:
        with self._lock:
            self._cuts[relative] = _Cut(None, times, delay_s)

    def requests_for(self, relative: str) -> int:
        with self._lock:
            return self.stats.requests.get(relative, 0)

    def _take_cut(self, relative: str) -> Optional[_Cut]:
        with self._lock:
            self.stats.requests[relative] = self.stats.requests.get(relative, 0) + 1
            cut = self._cuts.get(relative)
            if cut is None or cut.times <= 0:
                return None
            cut.times -= 1
            return cut


class _MirrorServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # as the local Antenna: no SYN dropped while the accept thread waits


class _MirrorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass

    def do_GET(self) -> None:
        mirror: ModelMirror = self.server.mirror  # type: ignore[attr-defined]
        prefix = "/ami-models/"
        relative = unquote(self.path.split("?", 1)[0])[len(prefix):] if self.path.startswith(prefix) else ""
        path = (mirror.root / relative).resolve()
        cut = mirror._take_cut(relative)
        if not relative or mirror.root.resolve() not in path.parents or not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if cut is not None and cut.delay_s:
            self.wfile.flush()
            time.sleep(cut.delay_s)
        if cut is not None and cut.after_bytes is not None:
            self.wfile.write(data[:cut.after_bytes])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)
