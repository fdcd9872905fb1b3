"""Predicted peak memory of a job's process tree for one LoaderPlan, component by component.

The model follows the worker's ingest (``worker/ingest.py``): each loader worker (or the main
process when ``num_workers == 0``) keeps up to ``min(download_threads, tasks_per_reserve)``
downloads in flight, decodes one image at a time into shared memory, assembles a batch, and may
run ``prefetch_factor`` batches ahead of the main process, keeping the buffers of the batch it
lent the main process for its next images; with pin_memory the main process holds a
pinned copy of every batch handed over; the main process holds the batch being inferred (and, on
CPU, its float copies and the model's activations, measured per pipeline where the probe carries
it: ``autotune/inference_memory.py``). Sizes use the LARGEST probed image. The probe's own sample
batch, inferred before any plan, can be a job's peak: ``MemoryEstimate.job_peak_bytes``.

Per-image and per-worker constants live in ``MemoryCalibration`` (``autotune/calibration.py``).
A per-pipeline ``CorrectionStore`` (``autotune/corrections.py``) learns how far the
prediction was off after each job; ``predict_peak(..., correction=)`` applies it to the total.

Given the plan's rates, the total is the expected peak: where the main process outpaces the
loader (``SHORT_QUEUE_SPEEDUP``), the queues stay short and each loader worker holds about one
batch (``short_queue_images``). ``bound_bytes`` keeps the peak with every queue full, which a stalled
main process reaches; the planner holds plans to it against the budget.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

from autotune.calibration import MemoryCalibration
from autotune.plan import LoaderPlan
from autotune.probe import Probe
from autotune.throughput_model import RateEstimate

MiB = 1024 * 1024
BYTES_PER_FLOAT32 = 4
# A download reads its body at most this much at a time (``worker.imaging``); a download in flight
# is priced at its body and one such read. The reads now land in the body itself, and what a
# download holds besides its body is its thread, its response and the socket's buffering:
# ``benchmarks/download_cost.py`` measured 1.87-1.89 MiB per download in flight for 1.41 MiB
# JPEGs (300 ms, 5 MB/s, 32 at once) and 23.4 MiB for 23.1 MiB ones (100 ms, 10 MB/s, 8 at once),
# against the model's 1.77 and 25.2 (with the calibration's 1.08 per body byte).
DOWNLOAD_READ_BYTES = 256 * 1024


COMPONENTS = (
    ("baseline_bytes", "baseline (model loaded)"),
    ("loader_workers_bytes", "loader worker processes"),
    ("inflight_downloads_bytes", "in-flight downloads"),
    ("decode_scratch_bytes", "decode scratch"),
    ("prefetch_queue_bytes", "batches assembling/queued"),
    ("pinned_bytes", "pinned copies"),
    ("inference_batch_bytes", "batch being inferred"),
    ("head_start_bytes", "head start (main process)"),
)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes by component; ``total_bytes`` = sum of components x ``correction``."""

    baseline_bytes: int
    loader_workers_bytes: int
    inflight_downloads_bytes: int
    decode_scratch_bytes: int
    prefetch_queue_bytes: int
    pinned_bytes: int
    inference_batch_bytes: int
    total_bytes: int
    correction: float = 1.0
    probe_batch_bytes: int = 0
    # The peak when the main process falls behind and every queue fills to the loader workers'
    # credit (x ``correction``): what plans are held to against the budget. ``total_bytes``, the
    # expected peak, is below it where the main process outpaces the loader (``predict_peak``).
    bound_bytes: int = 0
    # The probe's head start (``worker/head_start.py``): its compressed images held by the main
    # process and the batch of them it decodes, while the loader's queues fill.
    head_start_bytes: int = 0

    def __post_init__(self) -> None:
        if self.bound_bytes < self.total_bytes:
            object.__setattr__(self, "bound_bytes", self.total_bytes)

    @property
    def raw_total_bytes(self) -> int:
        """The sum of components before the correction: the plan's own peak."""
        return sum(bytes_ for _, bytes_ in self.components())

    @property
    def raw_job_peak_bytes(self) -> int:
        """The job's peak before the correction: the plan's, or the probe's batch where that was
        higher (what ``CorrectionStore.update`` compares with the job's observed peak)."""
        return max(self.raw_total_bytes, self.probe_batch_bytes)

    @property
    def job_peak_bytes(self) -> int:
        """The job's predicted peak: ``total_bytes``, or the corrected probe batch where higher.
        The probe's batch ran before the plan, so plans are chosen on ``total_bytes``; a job
        whose plan is smaller than the probe's batch still peaked there."""
        return max(self.total_bytes, int(round(self.probe_batch_bytes * self.correction)))

    def components(self) -> tuple[tuple[str, int], ...]:
        """(label, bytes) in table order."""
        return tuple((label, int(getattr(self, name))) for name, label in COMPONENTS)

    def table(self) -> str:
        """Fixed-width text: component, MiB, share of the uncorrected sum; then the total."""
        raw = max(1, self.raw_total_bytes)
        lines = [f"{'component':<28}{'MiB':>10}{'share':>8}"]
        for label, bytes_ in self.components():
            lines.append(f"{label:<28}{bytes_ / MiB:>10.1f}{bytes_ / raw:>8.1%}")
        lines.append(f"{f'total (x{self.correction:.2f} correction)':<28}{self.total_bytes / MiB:>10.1f}{'':>8}")
        if self.bound_bytes > self.total_bytes:
            lines.append(f"{'bound (every queue full)':<28}{self.bound_bytes / MiB:>10.1f}{'':>8}")
        if self.probe_batch_bytes > self.raw_total_bytes:
            lines.append(f"{'job peak (probe batch)':<28}{self.job_peak_bytes / MiB:>10.1f}{'':>8}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def compare_table(a: MemoryEstimate, b: MemoryEstimate, names: Sequence[str] = ("a", "b")) -> str:
    """Two estimates side by side: component, then MiB and share under each name."""
    name_a, name_b = names
    raw_a, raw_b = max(1, a.raw_total_bytes), max(1, b.raw_total_bytes)
    header = f"{'component':<28}{name_a + ' MiB':>16}{'share':>8}{name_b + ' MiB':>16}{'share':>8}"
    lines = [header]
    for (label, bytes_a), (_, bytes_b) in zip(a.components(), b.components()):
        lines.append(
            f"{label:<28}{bytes_a / MiB:>16.1f}{bytes_a / raw_a:>8.1%}{bytes_b / MiB:>16.1f}{bytes_b / raw_b:>8.1%}"
        )
    lines.append(f"{'total (corrected)':<28}{a.total_bytes / MiB:>16.1f}{'':>8}{b.total_bytes / MiB:>16.1f}{'':>8}")
    if a.bound_bytes > a.total_bytes or b.bound_bytes > b.total_bytes:
        lines.append(f"{'bound (every queue full)':<28}{a.bound_bytes / MiB:>16.1f}{'':>8}{b.bound_bytes / MiB:>16.1f}{'':>8}")
    return "\n".join(lines)


def predict_peak(
    plan: LoaderPlan, probe: Probe, calibration: MemoryCalibration, correction: float = 1.0,
    rate: Optional[RateEstimate] = None,
) -> MemoryEstimate:
    """Predicted peak of the process tree for ``plan`` on ``probe``'s images.

    ``num_workers == 0`` loads in the main process: no worker processes, no queue (the batch
    being assembled becomes the batch inferred). Queue and pinned terms count the DataLoader's
    ``prefetch_factor`` batches per worker plus ``collate_copy_factor`` batches being assembled;
    with loader workers the queue term also counts, per worker, the batch it lent the main
    process (its buffer pool keeps it: the batch being inferred is one of those); every
    batch-sized term is linear in ``batch_size``. float32 plans make tensors 4x larger and
    add the conversion's scratch per lane.
    pin_memory without CUDA costs nothing (torch skips pinning without an accelerator).

    That is ``bound_bytes``: every queue full. With ``rate`` (the plan's ``predict_rate``) and a
    main process at least ``SHORT_QUEUE_SPEEDUP`` times as fast as the loader, the queues stay
    short and ``total_bytes`` counts what each loader worker then holds (``short_queue_images``).
    """
    bound = _predict_peak(plan, probe, calibration, correction)
    return bound if rate is None else expected_peak(bound, plan, probe, calibration, rate)


def expected_peak(bound: MemoryEstimate, plan: LoaderPlan, probe: Probe, calibration: MemoryCalibration,
                  rate: RateEstimate) -> MemoryEstimate:
    """``predict_peak(plan, probe, calibration, correction, rate)`` from its full-queue ``bound``
    (``predict_peak`` without a rate): the planner checks the bound against the budget before it
    prices the rate."""
    if not short_queue(plan, rate):
        return bound
    expected = _predict_peak(plan, probe, calibration, bound.correction, short_queue_images(plan, rate))
    return replace(expected, bound_bytes=bound.total_bytes)


# The main process outpacing the loader by this factor keeps the loader workers' queues short.
# Measured short at 1.16-1.59: large images, reference pipeline, 2 cores, the CPU the bound and the
# loader the stage held back (4-14 shared images at the peak where full queues hold 10-24). The
# margin above 1 is for the rates' own error: a main process slower than the loader fills them.
SHORT_QUEUE_SPEEDUP = 1.1


def short_queue(plan: LoaderPlan, rate: RateEstimate) -> bool:
    """Whether the main process takes batches at least ``SHORT_QUEUE_SPEEDUP`` times as fast as
    the loader workers make them (inference and result posts both), so they do not queue."""
    return (plan.num_workers > 0 and rate.bottleneck not in ("inference", "post")
            and rate.inference_images_per_s >= SHORT_QUEUE_SPEEDUP * rate.loader_images_per_s)


def short_queue_images(plan: LoaderPlan, rate: RateEstimate) -> int:
    """Decoded images a loader worker holds while the main process keeps up: its buffers are
    reused once the main process has released them (``worker.ingest.SharedImageBuffers``), so it
    holds the batch it is filling, plus one image decoded before the main process released the
    batch it took last, plus the images it decodes while the main process holds that batch
    (its share of the inference time per batch). Measured on 2 lanes, null pipeline, small
    images: b + 1 per lane at batch 4, 8 and 16 (90, 162 and 306 MiB of shared images), b + 1.5 on
    a 300 ms link; this counts b + 2 there."""
    lanes = max(1, plan.num_workers)
    held_share = (plan.batch_size * rate.loader_images_per_s / rate.inference_images_per_s / lanes
                  if rate.inference_images_per_s > 0 else plan.batch_size)
    return plan.batch_size + 1 + max(1, math.ceil(held_share))


def _predict_peak(plan: LoaderPlan, probe: Probe, calibration: MemoryCalibration, correction: float,
                  short_images: Optional[int] = None) -> MemoryEstimate:
    """Every queue full, or with ``short_images`` (``short_queue_images``) what each loader worker
    holds while the main process keeps up."""
    workers = plan.num_workers
    lanes = max(1, workers)
    tensor_bytes = probe.decoded_bytes_per_image * (BYTES_PER_FLOAT32 if plan.tensor_dtype == "float32" else 1)
    batch_bytes = tensor_bytes * plan.batch_size
    connections = plan.downloads_per_lane
    queued_batches = workers * plan.prefetch_factor
    credit_images = (plan.prefetch_factor + calibration.collate_copy_factor) * plan.batch_size
    held_images = credit_images + plan.batch_size  # the most a worker holds: its credit and the batch it lent
    if short_images is None and workers > 0 and plan.tensor_dtype != "float32":
        # Each worker's buffer pool keeps the batch it lent the main process besides its credit
        # (``worker.ingest.SharedImageBuffers``): released, those buffers stay as its spares, so
        # every worker holds them, not only the one whose batch is being inferred. Measured: 2
        # workers at batch 2, prefetch 2 behind a slower main process keep 12 images' buffers.
        queue_bytes = workers * held_images * tensor_bytes
        inferred_bytes = 0.0
    elif short_images is None:  # in the main process, or float32 (a fresh segment per image)
        queue_bytes = workers * credit_images * tensor_bytes
        inferred_bytes = batch_bytes
    else:
        # The batch being inferred is one a loader worker filled: its images are in that worker's
        # count, which is at most ``held_images`` (measured: 6 images per worker at batch 4,
        # prefetch 1, a credit of 4).
        queue_bytes = workers * min(short_images, held_images) * tensor_bytes
        inferred_bytes = 0.0
    components = (
        probe.baseline_bytes,
        workers * probe.worker_process_bytes,
        lanes * connections * (probe.max_jpeg_bytes * calibration.download_buffer_factor + DOWNLOAD_READ_BYTES),
        lanes * probe.decoded_bytes_per_image * (calibration.decode_scratch_factor + _conversion_scratch(plan)),
        queue_bytes,
        (queued_batches + 1) * batch_bytes * calibration.pinned_copy_factor if plan.pin_memory and probe.cuda else 0,
        inferred_bytes + _host_inference_bytes(plan, probe, calibration),
    )
    ints = tuple(int(round(value)) for value in components)
    head_start = head_start_bytes(plan, probe)
    if short_images is not None:
        # The main process outpaces the loader: its head start is over about when the lanes' first
        # batches arrive, so the head start's phase (its images, the queues still empty) and the
        # steady one (short queues, no head start) peak apart; only what the head start holds
        # beyond the queues' images adds to the larger. Measured (null pipeline, 2-3 lanes, small
        # and large images, loopback and far links): the peak with a head start within -13% to +9%
        # of this, and 19-21% under the two added. With the queues full (the bound; a main process
        # slower than the loader) both are held at once.
        head_start = max(0, head_start - int(round(queue_bytes)))
    return MemoryEstimate(*ints, total_bytes=int(round((sum(ints) + head_start) * correction)), correction=correction,
                          probe_batch_bytes=probe_batch_bytes(probe, calibration), head_start_bytes=head_start)


# Threads of the main process decoding the head start's images: one per core, at most this many.
HEAD_START_MAX_DECODERS = 4


def head_start_decoders(cpu_count: int) -> int:
    return max(1, min(cpu_count, HEAD_START_MAX_DECODERS))


def head_start_bytes(plan: LoaderPlan, probe: Probe) -> int:
    """The head start's compressed bytes (at most its budget) and its decoded images in the main
    process (uint8, private: a batch, and one more per decoding thread, at most its images), held
    while the loader's queues fill; 0 without one."""
    if probe.head_start_bytes <= 0:
        return 0
    decoded = min(max(1, probe.head_start_images), plan.batch_size + head_start_decoders(probe.cpu_count))
    return int(probe.head_start_bytes + decoded * probe.decoded_bytes_per_image)


def _conversion_scratch(plan: LoaderPlan) -> float:
    """Decoded-image units a lane holds while converting to float32 (ADC's legacy ingest).

    ``worker/ingest.py`` keeps the uint8 decode (1) and the private float copy (4) alive while
    ``share_memory_()`` copies the float into shared memory; the shared copy is the queued tensor.
    """
    return 1.0 + BYTES_PER_FLOAT32 if plan.tensor_dtype == "float32" else 0.0


def _host_inference_bytes(plan: LoaderPlan, probe: Probe, calibration: MemoryCalibration) -> float:
    """On CPU the float copies and activations are host memory; on CUDA they live on the device."""
    if probe.cuda:
        return 0.0
    return inference_call_bytes(forward_images(plan.batch_size, probe), probe, calibration)


def forward_images(batch_size: int, probe: Probe) -> int:
    """Images in one forward call: pipelines split an ingest batch into forward batches of
    ``probe.forward_batch_size`` (AMI_LOCALIZATION_BATCH_SIZE for the built-in ones)."""
    return batch_size if probe.forward_batch_size <= 0 else min(batch_size, probe.forward_batch_size)


def inference_call_bytes(images: int, probe: Probe, calibration: MemoryCalibration) -> float:
    """Host bytes above steady state while ``images`` of the largest sampled size are inferred.

    Measured for this pipeline where the probe carries it (a fixed cost per call plus, per image,
    its float copies and its pixels at the model's input: ``autotune/inference_memory.py``);
    otherwise the calibration's figure per input pixel of the reference pipeline.
    """
    if probe.inference_bytes_per_input_pixel > 0 or probe.inference_fixed_bytes > 0:
        return probe.inference_fixed_bytes + images * probe.inference_bytes_per_image()
    return images * calibration.model_input_pixels * calibration.inference_bytes_per_input_pixel


def probe_batch_bytes(probe: Probe, calibration: MemoryCalibration) -> int:
    """The job's earlier peak, while the probe's own sample goes through the loop as one batch
    (before any plan): the baseline, the sample's decoded images, and its forward call."""
    images = probe.sample_count
    inference = 0.0 if probe.cuda else inference_call_bytes(forward_images(images, probe), probe, calibration)
    return int(round(probe.baseline_bytes + images * probe.decoded_bytes_per_image + inference))
