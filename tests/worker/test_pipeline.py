"""Pipelines: detector accuracy on generated specimens, contract-valid results, batch splitting."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from tests.conftest import data_cache
from worker.imaging import decode
from worker.pipelines import NullPipeline, Pipeline, ReferencePipeline, TorchScriptPipeline
from worker.pipelines import run_batch as run_typed_batch
from worker.results import Failure
from worker.schema import ResultItem, Task
from worker.testing.synthetic import generate_preset

CPU = torch.device("cpu")


@dataclass
class Item:
    task: Task
    image: Optional[torch.Tensor]
    error: Optional[Failure] = None


def run_batch(pipeline, items) -> list[tuple[Task, dict]]:
    """``(task, the result's wire JSON)`` per item, as the poster will send it."""
    return [(result.task, result.result.model_dump(mode="json")) for result in run_typed_batch(pipeline, items)]


def items_for(images) -> list[Item]:
    return [Item(Task(id=f"t{i}", image_id=img.image_id, image_url=f"http://img/{i}", reply_subject=f"$JS.ACK.{i}"),
                 decode(img.path.read_bytes(), max_pixels=10**9).tensor) for i, img in enumerate(images)]


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.timeout(240)
def test_reference_detector_finds_generated_specimens_and_results_follow_the_contract(tiny_images):
    small = generate_preset(data_cache(), "small", 4, seed=9)
    images = list(tiny_images[:16]) + small
    pipeline = ReferencePipeline(CPU, localization_batch_size=4, classification_batch_size=8)
    outcomes = run_batch(pipeline, items_for(images))
    found = total = 0
    for image, (task, result) in zip(images, outcomes):
        ResultItem.model_validate({"reply_subject": task.reply_subject, "result": result})
        assert result["source_images"] == [{"id": image.image_id, "url": task.image_url}]
        boxes = [(d["bbox"]["x1"], d["bbox"]["y1"], d["bbox"]["x2"], d["bbox"]["y2"]) for d in result["detections"]]
        for truth in image.boxes:
            total += 1
            found += max((iou(truth, box) for box in boxes), default=0.0) >= 0.5
        for det in result["detections"]:
            assert 0 <= det["bbox"]["x1"] < det["bbox"]["x2"] <= image.width
            assert 0 <= det["bbox"]["y1"] < det["bbox"]["y2"] <= image.height
            for c in det["classifications"]:
                assert c["classification"] in pipeline.labels and abs(sum(c["scores"]) - 1) < 1e-3
    assert total >= 50
    assert found / total >= 0.9, f"{found}/{total} specimens found at IoU >= 0.5"



def test_float_images_in_0_1_find_the_specimens_their_uint8_pixels_show(tiny_images):
    """The benchmark-only float32 ingest (AMI_BENCHMARK_PLAN_JSON, ADC's loader) hands float [0,1]
    images: the reference pipeline finds in them what it finds in their uint8 pixels, so the
    benchmark's ADC configuration runs the same workload as the others."""
    images = [item.image for item in items_for(tiny_images[:4])]
    pipeline = ReferencePipeline(CPU)
    expected = pipeline.infer(images)
    floats = [image.float().div(255.0) for image in images]
    before = [image.clone() for image in floats]
    found = pipeline.infer(floats)
    assert sum(len(r) for r in expected) >= 4
    for wanted, got in zip(expected, found):
        assert len(got) == len(wanted)
        for a, b in zip(wanted, got):
            assert iou((a.x1, a.y1, a.x2, a.y2), (b.x1, b.y1, b.x2, b.y2)) > 0.8
    assert all(torch.equal(image, copy) for image, copy in zip(floats, before))


def test_null_pipeline_and_error_items_pass_through(tiny_images):
    items = items_for(tiny_images[:3])
    items[1].image, items[1].error = None, Failure("not_found", "download failed: HTTP 404")
    assert [r.failure for r in run_typed_batch(NullPipeline(CPU), items)] == [None, items[1].error, None]
    outcomes = run_batch(NullPipeline(CPU), items)
    assert outcomes[0][1]["detections"] == [] and outcomes[2][1]["pipeline"] == "null"
    assert outcomes[1][1] == {"error": "download failed: HTTP 404", "image_id": items[1].task.image_id}
    for task, result in outcomes:
        ResultItem.model_validate({"reply_subject": task.reply_subject, "result": result})


class FakeCudaOutOfMemoryPipeline(Pipeline):
    """A FAKE standing in for a GPU (none here): raises CUDA's OOM error above 2 images per call,
    and a plain error for one poisoned image, as a real model on a full card would."""

    slug = "fake-oom"

    def __init__(self, poisoned: torch.Tensor) -> None:
        super().__init__(CPU)
        self.poisoned = poisoned
        self.calls: list[int] = []

    def infer(self, images):
        self.calls.append(len(images))
        if len(images) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(image is self.poisoned for image in images):
            raise RuntimeError("bad kernel input")
        return [[] for _ in images]


def test_out_of_memory_splits_the_batch_and_only_the_failing_image_fails(tiny_images):
    items = items_for(tiny_images[:8])
    pipeline = FakeCudaOutOfMemoryPipeline(poisoned=items[5].image)
    outcomes = run_batch(pipeline, items)
    failed = [task.image_id for task, result in outcomes if "error" in result]
    assert failed == [items[5].task.image_id]
    assert "inference failed: RuntimeError: bad kernel input" in outcomes[5][1]["error"]
    assert run_typed_batch(FakeCudaOutOfMemoryPipeline(poisoned=items[5].image), items)[5].failure.reason == "inference"
    assert pipeline.calls[0] == 8 and max(pipeline.calls[1:]) <= 4


class TinyDetector(torch.nn.Module):
    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out: list[dict[str, torch.Tensor]] = []
        for image in images:
            h, w = image.shape[1], image.shape[2]
            out.append({"boxes": torch.tensor([[0.0, 0.0, float(w) / 2, float(h) / 2]]),
                        "scores": torch.tensor([float(image.mean())])})
        return out


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_pipeline_loads_a_users_model(tmp_path, tiny_images):
    path = tmp_path / "model.pt"
    torch.jit.script(TinyDetector()).save(str(path))
    pipeline = TorchScriptPipeline(CPU, path, slug="my-model")
    outcomes = run_batch(pipeline, items_for(tiny_images[:2]))
    det = outcomes[0][1]["detections"][0]
    assert det["bbox"] == {"x1": 0.0, "y1": 0.0, "x2": 320.0, "y2": 240.0}
    assert outcomes[0][1]["pipeline"] == "my-model" and pipeline.config()["slug"] == "my-model"


class _TimedCalls(Pipeline):
    """A pipeline of known cost: each call sleeps 0.06 s plus 0.01 s per image (the batch split
    into forward calls of ``localization_batch_size``, as the real pipelines do)."""

    slug = "timed-calls"

    def __init__(self, **batching) -> None:
        super().__init__(CPU, **batching)
        self.calls: list[int] = []

    def infer(self, images):
        import time
        for start in range(0, len(images), self.localization_batch_size):
            chunk = images[start:start + self.localization_batch_size]
            self.calls.append(len(chunk))
            time.sleep(0.06 + 0.01 * len(chunk))
        return [[] for _ in images]


def test_batch_overhead_is_measured_once_from_one_image_against_one_forward_batch():
    from worker.pipelines import OVERHEAD_REPEATS, batch_overhead_s

    pipeline = _TimedCalls()
    overhead_s = batch_overhead_s(pipeline)
    # sleeps only add time; the median of the pairs keeps scheduling noise to a few ms
    assert overhead_s == pytest.approx(0.06, abs=0.02)
    # the warm-up call, then (1, 4) per repeat: a batch of 4 is one forward call
    assert pipeline.calls == [1] + [1, 4] * OVERHEAD_REPEATS
    assert batch_overhead_s(pipeline) == overhead_s  # cached: no more calls
    assert len(pipeline.calls) == 1 + 2 * OVERHEAD_REPEATS


def test_batch_overhead_is_zero_without_timing_pairs_when_every_image_is_its_own_forward_call():
    """No (1, b) timing pairs for a pipeline whose every image is its own forward call (a detector
    of seconds per image would spend minutes on them): the warmed pipeline gets one call, the one
    whose peak memory prices an image for the memory model (``inference_peaks``)."""
    from worker.pipelines import batch_overhead_s
    from worker.pipelines.base import inference_peaks, warm_up

    pipeline = _TimedCalls(localization_batch_size=1)
    warm_up(pipeline)  # the worker warms every pipeline at start-up, before autotune measures
    pipeline.calls.clear()
    assert batch_overhead_s(pipeline) == 0.0
    assert pipeline.calls == [1]
    assert [images for images, _ in inference_peaks(pipeline)] == [1]
    assert pipeline.calls == [1]  # cached
