"""A model's NaN or Inf output: the server's parser refuses a whole post for one such number, so
the worker turns that image's result into an error result and posts the rest as they are.

A real worker run against the real local server (which refuses NaN and Infinity as Antenna's does),
with a user's TorchScript model that answers NaN box coordinates for the brighter images."""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch

from worker.app import build_worker
from worker.imaging import decode

BRIGHT = 0.855  # between the tiny preset's image means (0.83-0.87), away from every one of them


class NaNOnBrightImages(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bright = BRIGHT

    def forward(self, images: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        out: List[Dict[str, torch.Tensor]] = []
        for image in images:
            height, width = float(image.shape[1]), float(image.shape[2])
            bottom = float("nan") if float(image.mean()) > self.bright else height / 2
            out.append({"boxes": torch.tensor([[0.0, 0.0, width / 2, bottom]]),
                        "scores": torch.tensor([0.9])})
        return out


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_non_finite_output_fails_its_image_alone_and_every_other_result_is_posted(
        antenna, settings_for, tiny_images, tmp_path):
    images = tiny_images[:12]
    bright = {image.image_id for image in images
              if float(decode(image.path.read_bytes(), max_pixels=10**9).tensor.float().div_(255.0).mean()) > BRIGHT}
    assert 3 <= len(bright) <= 9  # both kinds in the job, so a post mixes them
    model_path = tmp_path / "nan-model.pt"
    torch.jit.script(NaNOnBrightImages()).save(str(model_path))
    job_id = antenna.add_job(images, "torchscript")
    settings = settings_for(antenna, antenna_pipelines="torchscript", pipeline_torchscript_path=model_path,
                            antenna_api_batch_size=12, localization_batch_size=12)
    worker = build_worker(settings, burst=True)
    assert worker.run() == 0

    report = antenna.report(job_id)
    assert (report.results_ok, report.results_error, report.lost) == (12 - len(bright), len(bright), 0)
    errors = {item["result"]["image_id"]: item["result"]["error"]
              for post in antenna.result_posts for item in post["results"] if "error" in item["result"]}
    assert set(errors) == bright
    assert all("finite" in message and "y2" in message for message in errors.values())
    assert worker.poster.counters.spooled_items == 0 and not worker.poster.rejected_jobs
