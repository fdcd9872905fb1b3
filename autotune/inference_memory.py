"""What a forward pass needs in memory, measured per pipeline, and the model batch sizes it allows.

The worker measures a pipeline's peak memory above its steady state while it infers one image and
while it infers several (``MemoryReading``: host RSS on CPU, the caching allocator's peak on CUDA).
``fit_inference_memory`` turns two or more readings into a fixed cost per forward call and a cost
per image; the per-image cost is split into the float copies a pipeline keeps of each image at its
own size (``float_copy_bytes_per_image``, declared by the pipeline) and the rest, per pixel at the
model's input (a detector that resizes to 800 px costs the same for a 2048x1536 image as for a
1024x768 one). The memory model (``autotune/memory_model.py``) prices any image with that.

On CUDA the same fit, taken on the device, sizes each model's forward batch against the device
memory a worker may use (``plan_model_batch``, ``usable_device_bytes``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

MiB = 1024 * 1024


@dataclass(frozen=True)
class MemoryReading:
    """Peak bytes above the steady state while ``items`` images (or crops) went through one call."""

    items: int
    peak_increase_bytes: int

    def __post_init__(self) -> None:
        if self.items < 1 or self.peak_increase_bytes < 0:
            raise ValueError(f"MemoryReading needs items >= 1 and bytes >= 0, got {self.items}, {self.peak_increase_bytes}")


@dataclass(frozen=True)
class InferenceMemory:
    """A forward call's memory: ``fixed_bytes`` whatever its size, plus per item
    ``float_copy_bytes_per_item + input_pixels_per_item x bytes_per_input_pixel``.

    ``input_pixels_per_item`` and ``float_copy_bytes_per_item`` describe the measured item; prices
    for other images come from ``bytes_per_item`` with their own geometry.
    """

    fixed_bytes: int
    bytes_per_input_pixel: float
    input_pixels_per_item: int
    float_copy_bytes_per_item: int
    readings: int

    def bytes_per_item(self, input_pixels: Optional[int] = None, float_copy_bytes: Optional[int] = None) -> float:
        """One more image in the call: its float copies plus its pixels at the model's input
        (the measured item's geometry unless given)."""
        pixels = self.input_pixels_per_item if input_pixels is None else input_pixels
        copies = self.float_copy_bytes_per_item if float_copy_bytes is None else float_copy_bytes
        return copies + pixels * self.bytes_per_input_pixel

    def call_bytes(self, items: int, input_pixels: Optional[int] = None, float_copy_bytes: Optional[int] = None) -> float:
        """Peak bytes above steady state of one call of ``items`` images (0 for none)."""
        if items <= 0:
            return 0.0
        return self.fixed_bytes + items * self.bytes_per_item(input_pixels, float_copy_bytes)


def fit_inference_memory(readings: Sequence[MemoryReading], *, input_pixels_per_item: int,
                         float_copy_bytes_per_item: int = 0) -> Optional[InferenceMemory]:
    """Fixed and per-item cost from readings at different item counts; None without readings.

    Per item count the largest reading is kept (a reading is a peak: smaller ones are the same call
    caught after memory was already there). With two or more counts: least squares over those
    maxima, the slope clamped to >= 0 and the intercept to >= 0 (a negative intercept refits through
    the origin). With one count everything is per item (pessimistic for larger calls, exact for the
    measured one). The per-item cost less the declared float copies, divided by
    ``input_pixels_per_item``, is the cost per model input pixel (>= 0).
    """
    if not readings:
        return None
    largest: dict[int, int] = {}
    for reading in readings:
        largest[reading.items] = max(largest.get(reading.items, 0), reading.peak_increase_bytes)
    counts = sorted(largest)
    if len(counts) == 1:
        fixed, per_item = 0.0, largest[counts[0]] / counts[0]
    else:
        fixed, per_item = _line(counts, [float(largest[count]) for count in counts])
    per_pixel = max(0.0, per_item - float_copy_bytes_per_item) / max(1, input_pixels_per_item)
    return InferenceMemory(int(round(fixed)), per_pixel, int(input_pixels_per_item),
                           int(min(per_item, float_copy_bytes_per_item)), len(readings))


def _line(xs: Sequence[int], ys: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    if slope <= 0:
        return max(0.0, max(ys)), 0.0
    intercept = mean_y - slope * mean_x
    if intercept < 0:
        return 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return intercept, slope


def usable_device_bytes(free_bytes: int, total_bytes: int, fraction: float, held_bytes: int = 0) -> int:
    """Device bytes this worker's forward passes may take beyond what it already holds.

    ``fraction`` (AMI_GPU_MEMORY_FRACTION, 0 < x <= 1) is this worker's share of the whole card:
    ``fraction x total - held`` (``held``: what this process holds already, models included),
    never more than is free now (other processes' allocations count against the card, not us).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    share = int(fraction * total_bytes) - max(0, held_bytes)
    return max(0, min(free_bytes, share))


@dataclass(frozen=True)
class ModelBatchPlan:
    """A model's planned forward batch and why. ``items`` is never below 1: one item must run
    (an item that does not fit fails on its own, the OOM split's last step)."""

    items: int
    configured: int
    usable_bytes: int
    predicted_bytes: int
    reason: str


def plan_model_batch(memory: InferenceMemory, usable_bytes: int, configured: int, *,
                     headroom: float = 0.9, input_pixels: Optional[int] = None,
                     float_copy_bytes: Optional[int] = None) -> ModelBatchPlan:
    """The largest forward batch, at most ``configured`` (the operator's setting), whose predicted
    peak ``memory.call_bytes(items)`` fits ``headroom x usable_bytes``.

    ``headroom`` leaves room for the allocator's fragmentation (blocks are rounded and cached).
    """
    configured = max(1, configured)
    room = headroom * max(0, usable_bytes) - memory.fixed_bytes
    per_item = memory.bytes_per_item(input_pixels, float_copy_bytes)
    fits = configured if per_item <= 0 else int(max(0.0, room) // per_item)
    items = max(1, min(configured, fits))
    predicted = int(round(memory.call_bytes(items, input_pixels, float_copy_bytes)))
    if fits >= configured:
        reason = f"the configured {configured} fits ({predicted / MiB:.0f} of {usable_bytes / MiB:.0f} MiB usable)"
    elif fits >= 1:
        reason = (f"{items} of the configured {configured}: {per_item / MiB:.1f} MiB per item + "
                  f"{memory.fixed_bytes / MiB:.0f} MiB per call against {headroom:.0%} of {usable_bytes / MiB:.0f} MiB usable")
    else:
        reason = (f"not even one item fits {headroom:.0%} of {usable_bytes / MiB:.0f} MiB usable "
                  f"({predicted / MiB:.0f} MiB predicted): 1, left to the out-of-memory split")
    return ModelBatchPlan(items, configured, int(usable_bytes), predicted, reason)
