"""Predicted steady-state images/s of a LoaderPlan: the loader against the inference.

The loader model follows ``worker/ingest.py``. Each loader worker (one "lane"; the main process
when ``num_workers == 0``) streams its reserved images through ``c = min(download_threads,
tasks_per_reserve)`` connections and ONE decoder, and makes its next reservation, on a thread of its own, as the current
one's last download starts, so the stream never drains: the c downloads then in flight keep the
decoder busy for c steps while the reserve's round trip runs. A reservation of R images so takes

    R x stream_s + max(0, round_trip - c x stream_s)

where ``stream_s`` is ~max(download_s / c, decode_s), one download is ``latency + bytes /
bandwidth`` for the median image, and the max is priced as a two-station line with c bodies of
buffer (``buffered_rate``, see "Coupling"): with one connection barely faster than the decoder,
the decoder waits on downloads. (Reserving only once a lane had drained would idle it for a
round trip and a whole download per reservation: 1.3 s on a 300 ms, 2 MB/s link, which only
reservations of 128 tasks per lane amortise, more than a 200-task job can spread over lanes.) Decoding lanes beyond
``cpu_count`` share cores (decode_s grows by lanes / cpu_count). Inference of a batch of b takes
``overhead x ceil(b / forward_batch_size) + per_image x b`` (pipelines split ingest batches into
forward batches); pin_memory on CUDA replaces the pageable host->device copy in
``per_image`` by the pinned one. Result posts run on their own threads, one per batch and
``max_pending_posts`` at a time, each an API round trip: ``post_rate`` caps the pipeline (batch 1
against a 300 ms server posts at most 17 images/s, which the null pipeline measured: 15).

Handing batches over: the main process takes each batch a loader worker hands it (the queue, a
shared-memory descriptor per image) and posts its results; the lane spends its share handing it
over. ``*HANDOFF_CPU_S_PER_*`` plus the post the probe times are core-seconds that count against
the CPU like the loading's. With ``prefetch_factor`` 1 a lane asks for its next batch only once
the main process has taken the last, so it also idles for that turnaround each batch
(``handoff_wait_s``); deeper prefetch hides it.

Contention, kept simple: with ``num_workers == 0`` the main process alternates loading and
inferring (rates add as times: 1 / (1/loader + 1/inference)), and its download threads' receiving
and the API exchanges take their turns on its interpreter lock too (a null job on a 300 ms link
planned at 36 images/s on one process, 22 measured). On CPU (no CUDA) the loader
workers and the inference share the cores, and the kernel shares them fairly between runnable
threads. Each image costs decode_s core-seconds in a loader worker and c(t) = b(t) x i
core-seconds of inference, where t is ``plan.inference_threads``, i the inference wall seconds
per image at t threads (``Probe.inference_s``) and b(t) the threads busy during it, measured by
the probe (``Probe.inference_cpu_s_per_image``): OpenMP threads that reach a barrier first spin
or sleep, per ``OMP_WAIT_POLICY`` (the worker defaults it to PASSIVE), so b is not assumed.
Loading costs ``Probe.loader_cpu_s_per_image`` (l): the decode, receiving the body, and what an
image server on this host spends on it, plus the API exchanges (``Probe.api_cpu_s_per_image``:
a reserve per ``tasks_per_reserve`` images and a result post per batch, each costing the
client's CPU and, with the server on this host, the server's). So no plan beats

    cpu_count / (l + c(t))  images/s, with c(t) the inference core-seconds per image,

next to the loader's own limits (network, reservations, lanes / decode_s) and inference's
(1 / i). When that CPU bound is the limit, the stage whose threads need less than a fair share
(per thread: r x c(t) / t for inference, r x l / lanes for a loading lane) gets what it needs
and the other stage is the bottleneck: the queue between them stays short when the loader is the
one held back, and fills when inference is. One thread is slower alone but leaves the other
cores to the decoders, which wins when decoding is the larger share of the CPU work.

Coupling: the loader and the inference are joined by a queue of ``num_workers x prefetch_factor``
batches (plus the batch each worker is filling). Neither stage is steady (a reservation's round
trip stalls a lane, downloads vary, the OS shares two cores), so the consumer sometimes waits on
an empty queue and the producer on a full one. ``buffered_rate`` prices that with the classic
two-station tandem line with a finite buffer: the pipeline rate is below ``min(loader,
inference)`` and approaches it as the queue deepens, which is the tf.data autotuner's shape (add
buffer until the consumer no longer waits). Exponential service times (squared coefficient of
variation 1) are the pessimistic end; decoding same-sized images and running a fixed model are
steadier than that, and queue lengths scale with the stages' variability ((ca^2 + cs^2) / 2,
Kingman), so a buffer of k batches is priced as an exponential one of k / ``STAGE_SCV``. With
STAGE_SCV = 1 the model bought prefetch 4 where the measured queue never held more than two
batches. With ``num_workers == 0`` there is no queue: loading and inference alternate (see above).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from autotune.plan import LoaderPlan
from autotune.probe import Probe

log = logging.getLogger(__name__)

# A finite stand-in for "no limit" (a zero-cost step), so every value stays JSON-safe.
UNLIMITED_PER_S = 1e9
# Squared coefficient of variation of the loader's and the inference's times per batch (1 would
# be exponential); see "Coupling" above.
STAGE_SCV = 0.5
LARGEST_BATCH = 64  # the inference bound's batch: the planner's largest
# CPU per batch a loader worker hands the main process, besides the result post the probe times
# (``Probe.api_exchange_cpu_s``). The main process takes the batch off the queue, maps each
# image's shared-memory buffer (a descriptor passed per image) and keeps the batch's books; the
# lane assembles, pickles and sends the batch and waits on its credit. perf on 2 cores, null
# pipeline, 2048x1536 images, batch 2 against batch 8: the main process took 2.25 and 0.87
# core-ms per image (3.7 ms a batch, 1.7 of them the post the probe measured, and 0.4 ms an
# image; a bare DataLoader moving such images took 0.3 ms an image), the lanes besides decoding
# 5.2 and 4.1 core-ms per image (2.8 ms a batch).
MAIN_HANDOFF_CPU_S_PER_BATCH = 0.002
LANE_HANDOFF_CPU_S_PER_BATCH = 0.0028
HANDOFF_CPU_S_PER_IMAGE = 0.0004
BOTTLENECKS = ("reserve", "download", "decode", "inference", "cpu", "main_process", "post")
# What bounds a plan, in an operator's words: the download bottleneck is latency-bound when a
# request's wait is most of a download, bandwidth-bound when the body's transfer is.
REGIMES = ("latency-bound", "bandwidth-bound", "decode-bound", "inference-bound", "cpu-bound",
           "reserve-bound", "main-process-bound", "post-bound")


@dataclass(frozen=True)
class RateEstimate:
    """Predicted images/s by stage; ``pipeline_images_per_s = min(loader, inference)``.

    ``download`` and ``decode`` are ceilings of that stage alone; ``loader`` combines them with
    reservation round trips. ``bottleneck`` is one of ``BOTTLENECKS``.
    """

    download_images_per_s: float
    decode_images_per_s: float
    loader_images_per_s: float
    inference_images_per_s: float
    pipeline_images_per_s: float
    bottleneck: str
    regime: str = ""  # one of REGIMES: the bottleneck in an operator's words

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"{self.pipeline_images_per_s:.2f} images/s, {self.regime or self.bottleneck} (bottleneck {self.bottleneck}: "
            f"download {self.download_images_per_s:.1f}, decode {self.decode_images_per_s:.1f}, "
            f"loader {self.loader_images_per_s:.1f}, inference {self.inference_images_per_s:.1f})"
        )


def predict_rate(plan: LoaderPlan, probe: Probe) -> RateEstimate:
    """Predicted steady-state rates of ``plan`` on ``probe``'s job; see the module docstring."""
    lanes = max(1, plan.num_workers)
    connections = plan.downloads_per_lane
    download_s = probe.download_s_per_image()
    # A lane's decoder shares its process with the lane's download threads (their Python receives
    # the bodies) and the batch handoff: one lane on a 300 ms link, planned at 41 images/s from the
    # decode alone, measured 32. (With no loader workers the main process's own turn is below.)
    lane_cpu_s = (probe.download_cpu_s_per_image + LANE_HANDOFF_CPU_S_PER_BATCH / max(1, plan.batch_size)
                  if plan.num_workers > 0 else 0.0)
    decode_s = (probe.decode_s_per_image + lane_cpu_s) * max(1.0, lanes / probe.cpu_count)
    # Within a lane the downloads (c connections, c bodies ahead) feed one decoder: a tandem line
    # like the loader and the inference, so one connection barely faster than the decoder stalls it.
    stream_s = 1.0 / buffered_rate(_per_s(connections, download_s), _per_s(1, decode_s), connections, STAGE_SCV)
    reserve = plan.tasks_per_reserve
    streaming_s = reserve * stream_s
    # The next reserve goes out (on its own thread) as the reservation's last download starts:
    # the c downloads then in flight keep the decoder busy for c steps; a longer round trip stalls.
    stall_s = max(0.0, probe.api_round_trip_s - connections * stream_s)
    # With prefetch_factor 1 a lane asks for its next batch only once the main process has taken
    # this one: it idles for the main process's turnaround, each batch.
    handoff_s = reserve / plan.batch_size * handoff_wait_s(plan, probe) if plan.prefetch_factor <= 1 else 0.0
    loader = _per_s(lanes * reserve, streaming_s + stall_s + handoff_s)
    download = _per_s(lanes * connections, download_s)
    decode = _per_s(min(lanes, probe.cpu_count), probe.decode_s_per_image)
    full_inference = _per_s(plan.batch_size, inference_batch_s(plan, probe))
    if plan.num_workers == 0:
        # One process does it all: its download threads' Python (receiving bodies) and the API
        # exchanges hold the interpreter lock beside the decodes and the inference.
        own_s = probe.download_cpu_s_per_image + probe.api_cpu_s_per_image(plan.tasks_per_reserve, plan.batch_size)
        inference = 1.0 / (1.0 / loader + own_s + 1.0 / full_inference)
        bottleneck = "main_process"
    elif not probe.cuda:
        loader, inference, cpu_bound = _cpu_shared(loader, full_inference, plan, probe)
        if cpu_bound and handoff_s > 0:
            # The CPU bound assumes every core busy; a lane waiting on the handoff leaves its core
            # idle for that share of its cycle (nothing else on the host is runnable enough to fill it).
            busy = (streaming_s + stall_s) / (streaming_s + stall_s + handoff_s)
            loader, inference = loader * busy, inference * busy
        bottleneck = "cpu" if cpu_bound else "inference"
    else:
        inference, bottleneck = full_inference, "inference"
    if plan.num_workers > 0:
        pipeline = buffered_rate(loader, inference, plan.num_workers * (plan.prefetch_factor + 1), STAGE_SCV)
    else:
        pipeline = min(loader, inference)
    if plan.num_workers > 0 and loader < inference and bottleneck != "cpu":
        bottleneck = _loader_bottleneck(stall_s, streaming_s, download_s / connections, decode_s)
    posting = post_rate(plan, probe)
    if posting < pipeline:
        pipeline, bottleneck = posting, "post"
    return RateEstimate(download, decode, loader, inference, pipeline, bottleneck, regime(bottleneck, probe))


def handoff_cpu_s_per_image(plan: LoaderPlan) -> float:
    """Core-seconds per image the main process spends taking batches from loader workers (0 when
    it loads them itself) and the lanes spend handing them over, besides the result posts:
    ``*HANDOFF_CPU_S_PER_*``."""
    if plan.num_workers == 0:
        return 0.0
    per_batch_s = MAIN_HANDOFF_CPU_S_PER_BATCH + LANE_HANDOFF_CPU_S_PER_BATCH
    return per_batch_s / max(1, plan.batch_size) + HANDOFF_CPU_S_PER_IMAGE


def handoff_wait_s(plan: LoaderPlan, probe: Probe) -> float:
    """Seconds a lane with prefetch_factor 1 waits per batch for the main process to take it and
    ask for the next: the main process's CPU for that batch (its handoff and its result post) at
    the share of a core it gets beside the decoding lanes. Measured on 2 cores at batch 8: 52.8
    images/s at prefetch 1, 56.9 at prefetch 2, a wait of ~20 ms per batch."""
    if plan.num_workers == 0:
        return 0.0
    batch = max(1, plan.batch_size)
    cpu_s = MAIN_HANDOFF_CPU_S_PER_BATCH + batch * HANDOFF_CPU_S_PER_IMAGE + probe.api_exchange_cpu_s
    share = min(1.0, probe.cpu_count / (plan.num_workers + 1))
    return cpu_s / share


def post_rate(plan: LoaderPlan, probe: Probe) -> float:
    """Images/s the result posts allow: one post per batch, ``max_pending_posts`` in flight, each
    a round trip (a far server's latency): batch 1 on a 300 ms link posts at most 5 / 0.3 s."""
    return _per_s(probe.max_pending_posts * plan.batch_size, probe.api_round_trip_s)


def regime(bottleneck: str, probe: Probe) -> str:
    """The bottleneck as one of ``REGIMES``: a download bottleneck is latency-bound when the
    request's latency is at least the body's transfer time, bandwidth-bound otherwise."""
    if bottleneck == "download":
        transfer_s = probe.median_jpeg_bytes / probe.download_bytes_per_s
        return "latency-bound" if probe.download_latency_s >= transfer_s else "bandwidth-bound"
    return {"decode": "decode-bound", "inference": "inference-bound", "cpu": "cpu-bound",
            "reserve": "reserve-bound", "main_process": "main-process-bound",
            "post": "post-bound"}.get(bottleneck, bottleneck)


@dataclass(frozen=True)
class Bounds:
    """What no plan can beat on this job, each stage alone: the CPU decoding (every core decoding,
    nothing else), the link at ``link_connections`` connections (Little's law: connections /
    seconds per download) and the model (its per-image cost, the per-batch overhead amortised)."""

    decode_images_per_s: float
    link_images_per_s: float
    link_connections: int
    inference_images_per_s: float

    def lines(self, probe: Probe) -> list[str]:
        download_s = probe.download_s_per_image()
        return [
            f"  decode     {self.decode_images_per_s:8.1f} images/s  ({probe.cpu_count} cores x "
            f"{_per_s(1, probe.decode_s_per_image):.1f} decodes/s per core)",
            f"  link       {self.link_images_per_s:8.1f} images/s  ({self.link_connections} connections / "
            f"{download_s:.3f} s per download: {probe.download_latency_s:.3f} s latency + "
            f"{probe.median_jpeg_bytes / max(1.0, probe.download_bytes_per_s):.3f} s transfer)",
            f"  inference  {self.inference_images_per_s:8.1f} images/s  (the model alone at batch {LARGEST_BATCH}: "
            f"{probe.inference_per_image_s:.4f} s per image plus its per-batch overhead)",
        ]


def bounds(probe: Probe, connections: int) -> Bounds:
    """``Bounds`` of ``probe``'s job with at most ``connections`` downloads in flight."""
    return Bounds(
        decode_images_per_s=_per_s(probe.cpu_count, probe.decode_s_per_image),
        link_images_per_s=_per_s(connections, probe.download_s_per_image()),
        link_connections=connections,
        inference_images_per_s=_per_s(LARGEST_BATCH, probe.inference_s(LARGEST_BATCH)),
    )


def connections_in_flight(plan: LoaderPlan) -> int:
    """Downloads a plan keeps in flight: ``LoaderPlan.downloads_per_lane`` in each lane."""
    return max(1, plan.num_workers) * plan.downloads_per_lane


def buffered_rate(producer_per_s: float, consumer_per_s: float, buffer_batches: int, scv: float = 1.0) -> float:
    """Throughput of a producer and a consumer joined by a queue of ``buffer_batches`` (>= 1).

    Two-station tandem line with exponential service and blocking: with r = producer / consumer
    and n = buffer + 1, throughput = producer x (1 - r^n) / (1 - r^(n+1)), or producer x n / (n+1)
    when r = 1. Never above ``min(producer, consumer)``; tends to it as the buffer grows. With
    steadier stages (``scv`` < 1, the squared coefficient of variation of their times) n is
    taken as (buffer + 1) / scv.
    """
    if scv <= 0:
        raise ValueError(f"buffered_rate needs scv > 0, got {scv}")
    low, high = sorted((producer_per_s, consumer_per_s))
    if low <= 0:
        return 0.0
    if high >= UNLIMITED_PER_S:
        return low
    ratio = low / high  # symmetric in the two stages: compute with the ratio <= 1
    n = min((max(1, buffer_batches) + 1) / scv, 400.0)
    if ratio > 1 - 1e-9:
        return low * n / (n + 1)
    return low * (1 - ratio ** n) / (1 - ratio ** (n + 1))


def inference_batch_s(plan: LoaderPlan, probe: Probe) -> float:
    """Seconds per batch; with pin_memory on CUDA the pinned copy replaces the pageable one."""
    per_image_s = probe.inference_per_image_s
    if plan.pin_memory and probe.cuda and probe.pinned_host_to_device_bytes_per_s > 0:
        saved_s = transfer_s_per_image(plan, probe) - _tensor_bytes(plan, probe) / probe.pinned_host_to_device_bytes_per_s
        per_image_s = max(0.0, per_image_s - saved_s)
    saved_s = (probe.inference_per_image_s - per_image_s) * plan.batch_size
    return probe.inference_s(plan.batch_size, plan.inference_threads) - saved_s


def inference_threads(plan: LoaderPlan, probe: Probe) -> int:
    """The plan's intra-op threads, or the probe's (the process default) when the plan leaves it."""
    return plan.inference_threads or probe.inference_threads


def transfer_s_per_image(plan: LoaderPlan, probe: Probe) -> float:
    """Pageable host->device seconds for the median image's tensor (0 without CUDA or a rate)."""
    if not probe.cuda or probe.host_to_device_bytes_per_s <= 0:
        return 0.0
    return _tensor_bytes(plan, probe) / probe.host_to_device_bytes_per_s


def transfer_share(plan: LoaderPlan, probe: Probe) -> float:
    """Fraction of a batch's (unpinned) inference seconds spent on the pageable host->device copy."""
    batch_s = probe.inference_s(plan.batch_size)
    copy_s = transfer_s_per_image(plan, probe) * plan.batch_size
    if copy_s <= 0:
        return 0.0
    return min(1.0, copy_s / batch_s) if batch_s > 0 else 1.0


def _cpu_shared(loader: float, full_inference: float, plan: LoaderPlan,
                probe: Probe) -> tuple[float, float, bool]:
    """(loader, inference, cpu_bound): the two stages' rates when they share the CPU fairly.

    See the module docstring. The stage that is held back runs at the pipeline's rate r; the
    other runs at what it gets while the held-back stage keeps its threads busy (at least r),
    which is what the queue between them sees. ``cpu_bound``: r is the CPU bound.
    """
    cores, lanes = probe.cpu_count, max(1, plan.num_workers)
    threads = inference_threads(plan, probe)
    image_s = 1.0 / full_inference  # inference wall seconds per image at `threads`, CPU to itself
    load_core_s = (probe.loader_cpu_s_per_image() + probe.api_cpu_s_per_image(plan.tasks_per_reserve, plan.batch_size)
                   + handoff_cpu_s_per_image(plan))
    infer_core_s = probe.inference_cpu_s_per_image(threads, image_s)
    cpu_rate = cores / (load_core_s + infer_core_s)
    contended = contended_inference(full_inference, threads, cores, load_core_s)
    rate = min(loader, contended, cpu_rate)
    share = min(1.0, cores / (lanes + threads))  # each thread's core when all are runnable
    if rate < cpu_rate:  # not CPU bound: loading takes r x l core-seconds per second
        inference = min(contended, max(0.0, cores - rate * load_core_s) / infer_core_s)
        # While inference runs, its busy threads are runnable beside the lanes: a lane's fair
        # share of a core then bounds how fast the loader refills the queue.
        lane_share = min(1.0, cores / (lanes + infer_core_s / image_s))
        return min(loader, lanes * lane_share / load_core_s), max(rate, inference), False
    if rate * infer_core_s / threads <= rate * load_core_s / lanes:  # inference's threads need less: the loader waits
        return rate, max(rate, min(full_inference, share / image_s)), True
    return max(rate, min(loader, lanes * share / load_core_s)), rate, True


def contended_inference(inference_per_s: float, threads: int, cores: int, load_core_s: float) -> float:
    """Images/s of an inference running ``threads`` intra-op threads beside the loading, which keeps
    ``r x load_core_s`` threads runnable on average at the pipeline's rate r.

    Each parallel step of the model ends when its slowest thread does: with more runnable threads
    than cores the kernel gives each a fair share, ``cores / (threads + r x load_core_s)`` of a
    core, and the step waits on the thread that had least. So inference runs at
    ``inference_per_s x min(1, cores / (threads + r x load_core_s))``, and while it is the slower
    stage r is that rate: r (threads + r x load_core_s) = inference_per_s x cores. Reference
    pipeline, small images, 2 cores, 2 threads, 2 lanes: the probe timed 0.045 s per image alone
    (22 images/s), the job measured 0.063-0.072 s per image and 13.5-14.5 images/s; this gives
    14.3. With cores to spare for every runnable thread it is ``inference_per_s``.
    """
    if inference_per_s >= UNLIMITED_PER_S or load_core_s <= 0 or threads + inference_per_s * load_core_s <= cores:
        return inference_per_s
    return (math.sqrt(threads * threads + 4.0 * load_core_s * inference_per_s * cores) - threads) / (2.0 * load_core_s)


def _loader_bottleneck(stall_s: float, streaming_s: float, download_step_s: float, decode_s: float) -> str:
    if stall_s >= streaming_s:  # a lane waits on reserves longer than it streams
        return "reserve"
    return "download" if download_step_s >= decode_s else "decode"


def _tensor_bytes(plan: LoaderPlan, probe: Probe) -> int:
    return probe.median_decoded_bytes * (4 if plan.tensor_dtype == "float32" else 1)


def _per_s(count: float, seconds: float) -> float:
    return min(UNLIMITED_PER_S, count / seconds) if seconds > 0 else UNLIMITED_PER_S
