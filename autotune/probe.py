"""The measured facts of one job, from a small sample of its images and a few timed batches.

A ``Probe`` is what the models read: image sizes (the largest for memory, the median for rates),
how the network serves one connection (latency plus bytes/s), decode seconds per image, the
inference cost split into a per-batch overhead and a per-image cost, and the machine (baseline
memory with the model loaded, CPU count, CUDA). Build one with ``Probe.from_samples``.
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from autotune.calibration import MemoryCalibration, load_calibration
from autotune.inference_memory import InferenceMemory

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# A per-connection rate we cannot tell from "unbounded" (1 TB/s): keeps the value finite for JSON.
UNBOUNDED_BYTES_PER_S = 1e12
# Another process on this host is charged at most this many times our receiving CPU per sampled
# image (``Probe.from_samples``, ``external_cpu_s``): sending costs about what receiving does
# (``benchmarks/server_cost.py``: the local server 1.4 ms per small image on loopback, 2.3 on a
# 300 ms, 5 MB/s link; a loader lane's receiving 1.4 and 2.4). The probe's own receiving, on
# fresh connections, is already the higher (2.7-2.9 and 3.6-3.8 ms), and the rest of the host's
# CPU in the probe's window includes whatever else runs there (docs/benchmarks.md, "What the
# probe charges per image for a server on this host").
EXTERNAL_PER_RECEIVE = 1.0
# Sizes must differ by this ratio before a latency + bytes/bandwidth line is fitted through them.
MIN_SIZE_SPREAD_FOR_FIT = 1.5
# Typical host->device copy rates (PCIe 3/4 x16) used when CUDA is present but the copy was not timed.
ASSUMED_PAGEABLE_H2D_BYTES_PER_S = 6e9
ASSUMED_PINNED_H2D_BYTES_PER_S = 12e9


@dataclass(frozen=True)
class ImageSample:
    """One probed image: compressed size, decoded size, and how long each step took.

    ``download_s`` is the whole GET (first byte to last); ``first_byte_s``, when the caller
    measured it, is the time to the first byte and lets latency and bandwidth separate even when
    every sampled image has the same size. ``download_cpu_s``, when measured, is the CPU time the
    downloading thread spent (receiving and copying the body).
    """

    jpeg_bytes: int
    width: int
    height: int
    download_s: float
    decode_s: float
    first_byte_s: Optional[float] = None
    download_cpu_s: Optional[float] = None

    @property
    def decoded_bytes(self) -> int:
        """uint8 CHW bytes: width x height x 3."""
        return self.width * self.height * 3


@dataclass(frozen=True)
class InferenceSample:
    """Wall seconds for one batch of ``batch_size`` host uint8 images through the pipeline.

    Includes the (pageable) host->device copy and float conversion, as the worker will run it.
    ``threads``: torch's intra-op threads during the timing; 0 means the process default.
    ``cpu_s``: the process's CPU seconds over the same batch (all its threads); 0 if not measured.
    """

    batch_size: int
    seconds: float
    threads: int = 0
    cpu_s: float = 0.0


@dataclass(frozen=True)
class Probe:
    """Measured facts of a job sample; all sizes in bytes, all times in seconds.

    ``decoded_bytes_per_image`` is the uint8 size of the LARGEST sampled image (memory is sized
    conservatively); rates use the median image. ``worker_process_bytes`` comes from the
    calibration unless it was measured. ``notes`` say how each derived number was obtained.
    ``model_input_pixels`` and ``float_copy_bytes_per_image``: the largest sampled image as the
    pipeline's model sees it; ``inference_fixed_bytes`` and ``inference_bytes_per_input_pixel``:
    the pipeline's measured host memory per forward call (0 and 0.0: not measured, the
    calibration's reference figure applies).
    """

    sample_count: int
    median_jpeg_bytes: int
    max_jpeg_bytes: int
    median_width: int
    max_width: int
    median_height: int
    max_height: int
    decoded_bytes_per_image: int
    median_decoded_bytes: int
    download_latency_s: float
    download_bytes_per_s: float
    decode_s_per_image: float
    inference_overhead_s: float
    inference_per_image_s: float
    baseline_bytes: int
    worker_process_bytes: int
    cpu_count: int
    cuda: bool
    reservation_timeout_s: float = 300.0
    api_round_trip_s: float = 0.0
    max_pending_posts: int = 5  # result posts in flight at once (AMI_ANTENNA_MAX_PENDING_POSTS)
    # The fastest sampled decode per pixel, at the median image's pixels: what a core can do when
    # nothing else disturbs it (noise only adds CPU time). 0: not measured (use decode_s_per_image).
    decode_floor_s_per_image: float = 0.0
    host_to_device_bytes_per_s: float = 0.0
    pinned_host_to_device_bytes_per_s: float = 0.0
    forward_batch_size: int = 0
    inference_threads: int = 1
    single_thread_inference_s: float = 0.0
    single_thread_batch_size: int = 1
    download_cpu_s_per_image: float = 0.0
    external_cpu_s_per_image: float = 0.0
    api_exchange_cpu_s: float = 0.0
    inference_busy_threads: float = 0.0
    max_timed_batch: int = 0
    model_input_pixels: int = 0
    float_copy_bytes_per_image: int = 0
    inference_fixed_bytes: int = 0
    inference_bytes_per_input_pixel: float = 0.0
    # Compressed bytes of the head start's images the main process may hold as the plan starts
    # (``worker/head_start.py``); 0: no head start.
    head_start_bytes: int = 0
    head_start_images: int = 0
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.sample_count < 1:
            raise ValueError("Probe needs at least one image sample")
        if self.cpu_count < 1:
            raise ValueError(f"Probe.cpu_count must be >= 1, got {self.cpu_count}")
        if self.download_bytes_per_s <= 0:
            raise ValueError(f"Probe.download_bytes_per_s must be > 0, got {self.download_bytes_per_s}")
        if self.inference_threads < 1:
            raise ValueError(f"Probe.inference_threads must be >= 1, got {self.inference_threads}")
        if self.max_pending_posts < 1:
            raise ValueError(f"Probe.max_pending_posts must be >= 1, got {self.max_pending_posts}")
        for name in ("download_latency_s", "decode_s_per_image", "inference_overhead_s",
                     "inference_per_image_s", "api_round_trip_s", "reservation_timeout_s",
                     "single_thread_inference_s", "download_cpu_s_per_image", "external_cpu_s_per_image",
                     "api_exchange_cpu_s", "inference_busy_threads", "model_input_pixels",
                     "float_copy_bytes_per_image", "inference_fixed_bytes", "inference_bytes_per_input_pixel",
                     "head_start_bytes", "head_start_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"Probe.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_samples(
        cls,
        images: Sequence[ImageSample],
        inference: Sequence[InferenceSample],
        *,
        baseline_bytes: int,
        cpu_count: int,
        cuda: bool,
        reservation_timeout_s: float = 300.0,
        max_pending_posts: int = 5,
        worker_process_bytes: Optional[int] = None,
        download_latency_s: Optional[float] = None,
        api_round_trip_s: Optional[float] = None,
        host_to_device_bytes_per_s: Optional[float] = None,
        pinned_host_to_device_bytes_per_s: Optional[float] = None,
        calibration: Optional[MemoryCalibration] = None,
        forward_batch_size: int = 0,
        inference_threads: int = 1,
        external_cpu_s: Optional[float] = None,
        api_exchange_cpu_s: Optional[float] = None,
        inference_overhead_floor_s: float = 0.0,
        inference_memory: Optional[InferenceMemory] = None,
        model_input_pixels: int = 0,
        float_copy_bytes_per_image: int = 0,
    ) -> "Probe":
        """Summarise samples into a Probe.

        ``download_latency_s``: a separately timed small request; otherwise latency comes from
        ``first_byte_s`` or a fit over differing sizes (see ``fit_download``). ``api_round_trip_s``
        (one reserve POST) defaults to the download latency. Host->device rates default to typical
        PCIe values when ``cuda`` and to 0 without CUDA. ``worker_process_bytes`` defaults to the
        calibration's (``calibration`` defaults to ``autotune/calibration.json``).
        ``inference_threads``: torch's intra-op threads of the samples timed at the default
        (``threads`` 0 or equal to it); a sample timed at one thread (when that is fewer) gives
        ``single_thread_inference_s`` (seconds per image, the fastest such sample) and its batch
        size, and is left out of the cost fit.
        ``external_cpu_s``: CPU seconds the rest of the host spent while the sample downloaded
        (an image server on this host, say), spread over the sampled images and bounded at
        ``EXTERNAL_PER_RECEIVE`` times this process's receiving CPU per image: sending an image
        costs about what receiving it does, and anything else the host ran in that window (a
        monitoring agent, another tenant) is time-bound, not per image. On a 300 ms, 2 MB/s link
        the window is a second for three images, and the unbounded share (0.08 core-s per image
        against 0.005 on a fast link) priced a CPU bound of 8.2 images/s where 10.4 was measured.
        ``api_exchange_cpu_s``: core-seconds this host spends on one API exchange (a reserve or a
        result post: the client's CPU, and the server's when it runs on this host); 0 if unmeasured.
        ``inference_overhead_floor_s``: the pipeline's per-batch cost measured apart from the
        sample (the worker times it at start, repeated, on a synthetic image): the sample's fit
        separates it from a few timings of a few images, and timing noise of a few percent can
        zero it, which makes batch 1 look as fast as any. The fit never goes below it.
        ``inference_memory``: the pipeline's measured memory per forward call (host bytes on CPU;
        see ``autotune/inference_memory.py``); ``model_input_pixels`` and
        ``float_copy_bytes_per_image``: the LARGEST sampled image at the model's input and the
        float copies the pipeline keeps of it at its own size (the pipeline declares both).
        Unmeasured (None), the memory model falls back on the calibration's reference figure.
        """
        if not images:
            raise ValueError("Probe.from_samples needs at least one ImageSample")
        if not inference:
            raise ValueError("Probe.from_samples needs at least one InferenceSample")
        notes: list[str] = []
        latency_s, bytes_per_s, how = fit_download(images, download_latency_s)
        notes.append(how)
        inference_threads = max(1, int(inference_threads))
        at_default = [sample for sample in inference if sample.threads in (0, inference_threads)]
        if not at_default:
            raise ValueError("Probe.from_samples needs an InferenceSample at the default thread count")
        single = sorted((sample.seconds / sample.batch_size, -sample.batch_size) for sample in inference
                        if sample.threads == 1 and inference_threads > 1)
        overhead_s, per_image_s = fit_inference(at_default)
        if overhead_s < inference_overhead_floor_s:
            notes.append(f"per-batch inference cost {overhead_s:.4f} s from the sample, below the "
                         f"{inference_overhead_floor_s:.4f} s measured at start: the floor is used")
            overhead_s, per_image_s = fit_inference(at_default, inference_overhead_floor_s)
        timed_cpu = [sample for sample in at_default if sample.cpu_s > 0 and sample.seconds > 0]
        busy_threads = 0.0
        if timed_cpu:
            busy = sum(sample.cpu_s for sample in timed_cpu) / sum(sample.seconds for sample in timed_cpu)
            busy_threads = min(float(inference_threads), max(1.0, busy))
        else:
            notes.append("inference CPU not measured: every intra-op thread taken as busy")
        if inference_threads > 1 and not single:
            notes.append(f"inference timed at {inference_threads} threads only: the planner keeps that count")
        if len({sample.batch_size for sample in at_default}) < 2 and inference_overhead_floor_s <= 0:
            notes.append("inference timed at one batch size: per-batch overhead taken as 0")
        if inference_memory is None:
            notes.append("inference memory not measured: the calibration's reference-pipeline figure per input pixel")
        if worker_process_bytes is None:
            worker_process_bytes = (calibration or load_calibration()).worker_process_bytes
            notes.append("worker_process_bytes from calibration")
        pageable, pinned = _transfer_rates(cuda, host_to_device_bytes_per_s, pinned_host_to_device_bytes_per_s, notes)
        receiving = [image.download_cpu_s for image in images if image.download_cpu_s is not None]
        receive_cpu_s = statistics.median(receiving) if receiving else 0.0
        external_per_image_s = max(0.0, float(external_cpu_s or 0.0)) / len(images)
        if receive_cpu_s > 0 and external_per_image_s > EXTERNAL_PER_RECEIVE * receive_cpu_s:
            notes.append(f"host CPU besides this process while the sample downloaded: {external_per_image_s:.4f} core-s "
                         f"per image, bounded at {EXTERNAL_PER_RECEIVE:g} x receiving ({receive_cpu_s:.4f}); the rest "
                         "is taken as other work on the host, not the images'")
            external_per_image_s = EXTERNAL_PER_RECEIVE * receive_cpu_s
        widths = [image.width for image in images]
        heights = [image.height for image in images]
        return cls(
            sample_count=len(images),
            median_jpeg_bytes=_median_int([image.jpeg_bytes for image in images]),
            max_jpeg_bytes=max(image.jpeg_bytes for image in images),
            median_width=_median_int(widths),
            max_width=max(widths),
            median_height=_median_int(heights),
            max_height=max(heights),
            decoded_bytes_per_image=max(image.decoded_bytes for image in images),
            median_decoded_bytes=_median_int([image.decoded_bytes for image in images]),
            download_latency_s=latency_s,
            download_bytes_per_s=bytes_per_s,
            decode_s_per_image=statistics.median(image.decode_s for image in images),
            decode_floor_s_per_image=min(image.decode_s / max(1, image.width * image.height) for image in images)
            * statistics.median(image.width * image.height for image in images),
            inference_overhead_s=overhead_s,
            inference_per_image_s=per_image_s,
            baseline_bytes=int(baseline_bytes),
            worker_process_bytes=int(worker_process_bytes),
            cpu_count=int(cpu_count),
            cuda=bool(cuda),
            reservation_timeout_s=float(reservation_timeout_s),
            max_pending_posts=int(max_pending_posts),
            api_round_trip_s=latency_s if api_round_trip_s is None else float(api_round_trip_s),
            host_to_device_bytes_per_s=pageable,
            pinned_host_to_device_bytes_per_s=pinned,
            forward_batch_size=max(0, int(forward_batch_size)),
            inference_threads=inference_threads,
            single_thread_inference_s=single[0][0] if single else 0.0,
            single_thread_batch_size=-single[0][1] if single else 1,
            download_cpu_s_per_image=receive_cpu_s,
            external_cpu_s_per_image=external_per_image_s,
            api_exchange_cpu_s=max(0.0, float(api_exchange_cpu_s or 0.0)),
            inference_busy_threads=busy_threads,
            max_timed_batch=max(sample.batch_size for sample in at_default),
            model_input_pixels=max(0, int(model_input_pixels)),
            float_copy_bytes_per_image=max(0, int(float_copy_bytes_per_image)),
            inference_fixed_bytes=inference_memory.fixed_bytes if inference_memory else 0,
            inference_bytes_per_input_pixel=inference_memory.bytes_per_input_pixel if inference_memory else 0.0,
            notes=tuple(notes),
        )

    def inference_bytes_per_image(self) -> float:
        """Measured memory one more image adds to a forward call, for the largest sampled image
        (its float copies plus its model input pixels); 0 when not measured."""
        return self.float_copy_bytes_per_image + self.model_input_pixels * self.inference_bytes_per_input_pixel

    def download_s_per_image(self) -> float:
        """Seconds one connection takes for the median image: latency + bytes / bandwidth."""
        return self.download_latency_s + self.median_jpeg_bytes / self.download_bytes_per_s

    def inference_s(self, batch_size: int, threads: int = 0) -> float:
        """Predicted seconds for one batch: overhead per forward batch + per_image x batch_size.

        The pipeline splits an ingest batch into forward batches of ``forward_batch_size``
        images, so the per-batch overhead is paid once per forward batch: ingest batches beyond
        the forward batch buy no speed. ``threads`` other than ``inference_threads`` (0 means
        it) scale that time by Amdahl's law with ``serial_fraction``.
        """
        forwards = 1 if self.forward_batch_size <= 0 else -(-batch_size // self.forward_batch_size)
        seconds = self.inference_overhead_s * forwards + self.inference_per_image_s * batch_size
        if threads <= 0 or threads == self.inference_threads:
            return seconds
        serial = self.serial_fraction()
        return seconds * _amdahl(serial, threads) / _amdahl(serial, self.inference_threads)

    def loader_cpu_s_per_image(self) -> float:
        """Core-seconds one image costs the host before inference: decode, receiving the body,
        and what other processes on this host spent serving it (0 when the server is remote)."""
        return self.decode_s_per_image + self.download_cpu_s_per_image + self.external_cpu_s_per_image

    def api_cpu_s_per_image(self, tasks_per_reserve: int, batch_size: int) -> float:
        """Core-seconds of API exchanges per image: one reserve per ``tasks_per_reserve`` images
        and one result post per batch of ``batch_size``."""
        return self.api_exchange_cpu_s * (1.0 / max(1, tasks_per_reserve) + 1.0 / max(1, batch_size))

    def inference_cpu_s_per_image(self, threads: int, wall_s_per_image: float) -> float:
        """Core-seconds inference spends per image at ``threads`` (0: the default) taking
        ``wall_s_per_image``.

        ``inference_busy_threads`` is measured: the process's CPU seconds over the wall seconds of
        the default-thread samples. Whether idle OpenMP threads spin or sleep at a barrier
        (``OMP_WAIT_POLICY``) decides whether it is near ``inference_threads`` or near 1, so it is
        measured, not assumed. Between one thread (busy 1) and the default it is interpolated
        linearly; unmeasured, every thread counts as busy for the whole forward pass.
        """
        threads = threads or self.inference_threads
        if threads <= 1:
            return wall_s_per_image
        default = self.inference_threads
        if self.inference_busy_threads <= 0:
            busy = float(threads)
        elif default <= 1:
            busy = 1.0
        else:
            busy = 1.0 + (self.inference_busy_threads - 1.0) * (threads - 1) / (default - 1)
        return min(float(threads), max(1.0, busy)) * wall_s_per_image

    def serial_fraction(self) -> float:
        """Amdahl's serial share of inference, from the same batch at one thread and at the default.

        time(t) = time(1) x (serial + (1 - serial) / t). 1.0 (threads buy nothing) when only the
        default was timed or it is one thread; clamped to [0, 1] against timing noise.
        """
        threads = self.inference_threads
        if threads <= 1 or self.single_thread_inference_s <= 0:
            return 1.0
        batch = self.single_thread_batch_size
        ratio = self.inference_s(batch) / (self.single_thread_inference_s * batch)
        return min(1.0, max(0.0, (ratio - 1.0 / threads) / (1.0 - 1.0 / threads)))

    def as_dict(self) -> dict[str, object]:
        """JSON-ready (notes become a list)."""
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data

    def describe(self) -> str:
        """Multi-line text with the numbers, for logs and ``worker tune``."""
        lines = [
            f"probe of {self.sample_count} images "
            f"({'CUDA' if self.cuda else 'CPU'}, {self.cpu_count} CPUs, reservation timeout {self.reservation_timeout_s:.0f} s)",
            f"  jpeg bytes      median {self.median_jpeg_bytes / MiB:.2f} MiB, max {self.max_jpeg_bytes / MiB:.2f} MiB",
            f"  image size      median {self.median_width}x{self.median_height}, max {self.max_width}x{self.max_height}; "
            f"decoded uint8 {self.decoded_bytes_per_image / MiB:.1f} MiB (largest)",
            f"  download        latency {self.download_latency_s:.3f} s + {self.download_bytes_per_s / MiB:.2f} MiB/s "
            f"per connection = {self.download_s_per_image():.3f} s per median image; API round trip {self.api_round_trip_s:.3f} s, "
            f"{self.api_exchange_cpu_s:.4f} core-s on this host per exchange (reserve or result post)",
            f"  decode          {self.decode_s_per_image:.4f} s per image (median, one core)",
            f"  loading CPU     {self.loader_cpu_s_per_image():.4f} core-s per image: decode + "
            f"{self.download_cpu_s_per_image:.4f} receiving + {self.external_cpu_s_per_image:.4f} elsewhere on this host",
            f"  inference       {self.inference_overhead_s:.4f} s per batch + {self.inference_per_image_s:.4f} s per image "
            f"at {self.inference_threads} thread{'s' if self.inference_threads > 1 else ''}"
            + (f"; {self.single_thread_inference_s:.4f} s per image at 1 thread in a batch of "
               f"{self.single_thread_batch_size} (serial share {self.serial_fraction():.0%})"
               if self.single_thread_inference_s > 0 else ""),
            f"  memory          baseline {self.baseline_bytes / MiB:.0f} MiB (model loaded), "
            f"{self.worker_process_bytes / MiB:.0f} MiB per loader worker process",
        ]
        if self.inference_bytes_per_input_pixel > 0:
            lines.append(
                f"  inference mem   {self.inference_fixed_bytes / MiB:.0f} MiB per forward call + "
                f"{self.inference_bytes_per_image() / MiB:.0f} MiB per image ({self.model_input_pixels:,} px at the model's "
                f"input x {self.inference_bytes_per_input_pixel:.1f} B + {self.float_copy_bytes_per_image / MiB:.0f} MiB float copies)")
        if self.cuda:
            lines.append(
                f"  host->device    {self.host_to_device_bytes_per_s / 1e9:.1f} GB/s pageable, "
                f"{self.pinned_host_to_device_bytes_per_s / 1e9:.1f} GB/s pinned"
            )
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares ``y = intercept + slope x`` with both clamped to >= 0 (a constrained refit).

    If the free fit gives a negative slope, the slope is 0 and the intercept the mean of ``ys``;
    a negative intercept gives a line through the origin. Needs >= 2 distinct ``xs``.
    """
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("fit_line needs at least two distinct x values")
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    intercept = mean_y - slope * mean_x
    if slope < 0:
        return max(0.0, mean_y), 0.0
    if intercept < 0:
        return 0.0, max(0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs))
    return intercept, slope


def fit_inference(samples: Sequence[InferenceSample], overhead_floor_s: float = 0.0) -> tuple[float, float]:
    """(overhead_s, per_image_s) from ``seconds = overhead + per_image x batch_size``.

    With one distinct batch size the overhead cannot be separated: it is 0 and every second is
    charged per image (pessimistic for large batches' benefit). ``overhead_floor_s``: a per-batch
    cost known from elsewhere (``Probe.from_samples``); a fit below it is redone with the overhead
    fixed at the floor (least squares for the per-image cost alone).
    """
    xs = [float(sample.batch_size) for sample in samples]
    ys = [float(sample.seconds) for sample in samples]
    if len(set(xs)) < 2:
        overhead_s, per_image_s = 0.0, max(0.0, sum(ys) / sum(xs))
    else:
        overhead_s, per_image_s = fit_line(xs, ys)
    floor_s = max(0.0, overhead_floor_s)
    if overhead_s >= floor_s:
        return overhead_s, per_image_s
    per_image_s = sum(x * (y - floor_s) for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return floor_s, max(0.0, per_image_s)


def fit_download(
    images: Sequence[ImageSample], latency_s: Optional[float] = None
) -> tuple[float, float, str]:
    """(latency_s, bytes_per_s per connection, how) from image download timings.

    In order of preference: a given latency; the median ``first_byte_s``; a line fit over sizes
    that differ by >= 1.5x; else latency 0 with all time charged to bandwidth (the same time for
    the median image, so rates are unaffected; only larger images are then over-estimated).
    """
    first_bytes = [image.first_byte_s for image in images if image.first_byte_s is not None]
    if latency_s is not None:
        return latency_s, _bandwidth(images, latency_s), "download latency from a separate small request"
    if first_bytes:
        latency = statistics.median(first_bytes)
        return latency, _bandwidth(images, latency), "download latency = median time to first byte"
    sizes = [image.jpeg_bytes for image in images]
    if len(images) >= 2 and min(sizes) > 0 and max(sizes) / min(sizes) >= MIN_SIZE_SPREAD_FOR_FIT:
        intercept, slope = fit_line([float(s) for s in sizes], [image.download_s for image in images])
        bandwidth = 1.0 / slope if slope > 0 else UNBOUNDED_BYTES_PER_S
        return intercept, min(bandwidth, UNBOUNDED_BYTES_PER_S), "download latency and bandwidth fitted over sizes"
    return 0.0, _bandwidth(images, 0.0), "download latency not separable (similar sizes): all time charged to bandwidth"


def _bandwidth(images: Sequence[ImageSample], latency_s: float) -> float:
    transfer_s = sum(max(0.0, image.download_s - latency_s) for image in images)
    total_bytes = sum(image.jpeg_bytes for image in images)
    if transfer_s <= 0:
        return UNBOUNDED_BYTES_PER_S
    return min(UNBOUNDED_BYTES_PER_S, max(1.0, total_bytes / transfer_s))


def _transfer_rates(
    cuda: bool, pageable: Optional[float], pinned: Optional[float], notes: list[str]
) -> tuple[float, float]:
    if not cuda:
        return 0.0, 0.0
    if pageable is None or pinned is None:
        notes.append("host->device rates not timed: typical PCIe values assumed")
    return (
        ASSUMED_PAGEABLE_H2D_BYTES_PER_S if pageable is None else float(pageable),
        ASSUMED_PINNED_H2D_BYTES_PER_S if pinned is None else float(pinned),
    )


def _amdahl(serial: float, threads: int) -> float:
    return serial + (1.0 - serial) / max(1, threads)


def _median_int(values: Sequence[int]) -> int:
    return int(round(statistics.median(values)))
