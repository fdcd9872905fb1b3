"""Choose the LoaderPlan with the highest predicted rate whose predicted peak fits the budget.

A grid over batch_size, num_workers, prefetch_factor, download_threads, tasks_per_reserve,
pin_memory and (on CPU, when the probe timed one thread) inference_threads; each candidate is
priced by ``predict_peak`` and ``predict_rate``. Among those that
fit, every plan within 2% of the best rate is a tie and the smallest peak wins (then fewer
workers, tasks per reserve nearest the batch size, fewer reserved tasks, fewer download threads,
shallower prefetch, smaller batch; then more inference threads where the probe measured how many
are busy, fewer where it did not: threads assumed busy at every barrier are priced as such,
measured ones are priced as measured and a free core makes the forward pass shorter). Fields the
operator pinned are kept as given. If nothing fits, the minimal plan comes back with
``fits=False`` and a reason saying by how much it is over.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import Iterator, Mapping, Optional, Sequence

from autotune.calibration import MemoryCalibration
from autotune.memory_model import MemoryEstimate, expected_peak, predict_peak
from autotune.plan import MINIMAL_PLAN, LoaderPlan
from autotune.probe import Probe
from autotune.throughput_model import RateEstimate, connections_in_flight, predict_rate, transfer_share

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
PREFETCH_FACTORS = (1, 2, 4)
DOWNLOAD_THREADS = (1, 2, 4, 8, 16, 32, 64)
TASKS_PER_RESERVE = (1, 2, 4, 8, 16, 32, 64, 128)
# Plans within 2% of the best predicted rate are ties (the smallest peak wins). The probe's noise
# moves every plan's rate together (one probe prices them all); what separates plans is the
# model's structure (API exchanges per image, lanes beside busy inference threads), worth a few
# percent. With 5% those differences were all ties and the smallest plan won: batch 1, one lane.
TIE_TOLERANCE = 0.02
# Inference under this share of the loading's CPU per image cannot make a batch lose (_batch_choices).
MINOR_INFERENCE_SHARE = 0.1
PLAN_FIELDS = (
    "tasks_per_reserve", "batch_size", "num_workers", "prefetch_factor",
    "pin_memory", "download_threads", "tensor_dtype", "inference_threads",
)


def budget_bytes(effective_limit_bytes: int, reserve_bytes: int = GiB, safety_factor: float = 0.85) -> int:
    """``(limit - reserve) x safety``, never below 0. Defaults: reserve 1 GiB, safety 0.85."""
    return max(0, int((effective_limit_bytes - reserve_bytes) * safety_factor))


def max_tasks_per_reserve(
    worker_images_per_s: float,
    reservation_timeout_s: float,
    timeout_margin: float = 0.5,
    queue_wait_s: float = 0.0,
) -> int:
    """Most tasks one loader worker may reserve at once and still see done in time.

    A worker holds its reserved tasks until it has yielded them (at ``worker_images_per_s``) and
    each then waits ``queue_wait_s`` to be inferred, all inside ``timeout_margin x
    reservation_timeout_s``. Returns 0 when not even one task fits (callers still need 1).
    """
    usable_s = reservation_timeout_s * timeout_margin - queue_wait_s
    if usable_s <= 0 or worker_images_per_s <= 0:
        return 0
    return int(math.floor(usable_s * worker_images_per_s + 1e-9))


def queue_wait_s(plan: LoaderPlan, rate: RateEstimate) -> float:
    """Seconds a yielded image waits to be inferred: its batch fills, then the queue ahead drains.

    Filling takes ``batch_size`` images at one worker's rate; ahead of it are up to
    ``num_workers x prefetch_factor`` queued batches plus the one being inferred.
    """
    pipeline = rate.pipeline_images_per_s
    if pipeline <= 0:
        return math.inf
    worker = pipeline / max(1, plan.num_workers)
    ahead_batches = plan.num_workers * plan.prefetch_factor + 1
    return plan.batch_size / worker + ahead_batches * plan.batch_size / pipeline


@dataclass(frozen=True)
class PlanConstraints:
    """What the plan must respect. ``pinned``: LoaderPlan fields the operator set explicitly.

    ``max_workers`` defaults to ``min(8, cpu_count x 2)``. ``timeout_margin``: use at most this
    fraction of the reservation timeout. ``min_transfer_share_for_pin``: pin_memory only when the
    pageable host->device copy is at least this share of a batch's inference time.
    """

    budget_bytes: int
    reservation_timeout_s: float
    cuda: bool
    cpu_count: int
    pinned: Mapping[str, object] = field(default_factory=dict)
    max_workers: Optional[int] = None
    timeout_margin: float = 0.5
    min_transfer_share_for_pin: float = 0.1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.pinned) - set(PLAN_FIELDS))
        if unknown:
            raise ValueError(f"PlanConstraints.pinned has unknown LoaderPlan fields {unknown}; known: {PLAN_FIELDS}")
        object.__setattr__(self, "pinned", MappingProxyType(dict(self.pinned)))
        if self.max_workers is None:
            object.__setattr__(self, "max_workers", min(8, self.cpu_count * 2))
        if self.cpu_count < 1 or self.max_workers < 0:
            raise ValueError(f"PlanConstraints needs cpu_count >= 1 and max_workers >= 0, got "
                             f"{self.cpu_count} and {self.max_workers}")
        if not 0 < self.timeout_margin <= 1:
            raise ValueError(f"PlanConstraints.timeout_margin must be in (0, 1], got {self.timeout_margin}")

    def as_dict(self) -> dict[str, object]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "pinned": dict(self.pinned)}

    @classmethod
    def from_probe(cls, probe: Probe, budget_bytes: int, **options: object) -> "PlanConstraints":
        """Constraints with the probe's timeout, CUDA and CPU count."""
        return cls(budget_bytes=budget_bytes, reservation_timeout_s=probe.reservation_timeout_s,
                   cuda=probe.cuda, cpu_count=probe.cpu_count, **options)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PlanOption:
    """One priced plan: for the advisory's alternatives and ``worker tune``."""

    plan: LoaderPlan
    predicted_peak_bytes: int
    predicted_images_per_s: float


@dataclass(frozen=True)
class PlanDecision:
    """The chosen plan and the numbers behind it."""

    plan: LoaderPlan
    memory: MemoryEstimate
    rate: RateEstimate
    candidates_considered: int
    fits: bool
    reasons: tuple[str, ...]
    budget_bytes: int

    def log_line(self) -> str:
        """One line: the plan, its predicted peak against the budget, its rate, the search size."""
        share = self.memory.bound_bytes / self.budget_bytes if self.budget_bytes > 0 else math.inf
        verdict = "fits" if self.fits else "OVER BUDGET"
        bound = (f" (bound {self.memory.bound_bytes / MiB:.0f} MiB, every queue full)"
                 if self.memory.bound_bytes > self.memory.total_bytes else "")
        return (
            f"autotune plan: {self.plan.describe()} | predicted peak {self.memory.total_bytes / MiB:.0f} MiB{bound} "
            f"of budget {self.budget_bytes / MiB:.0f} MiB ({share:.0%}, {verdict}, correction "
            f"x{self.memory.correction:.2f})"
            + (f" | job peak {self.memory.job_peak_bytes / MiB:.0f} MiB (the probe's batch)"
               if self.memory.job_peak_bytes > self.memory.total_bytes else "")
            + f" | {self.rate.describe()} | {self.candidates_considered} candidates"
            + "".join(f" | {reason}" for reason in self.reasons if reason.startswith("pinned"))
        )

    def option(self) -> PlanOption:
        return PlanOption(self.plan, self.memory.total_bytes, self.rate.pipeline_images_per_s)

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["reasons"] = list(self.reasons)
        return data


@dataclass(frozen=True)
class _Priced:
    plan: LoaderPlan
    memory: MemoryEstimate
    rate: Optional[RateEstimate]  # None when over budget (not worth pricing)


def choose_plan(
    probe: Probe, constraints: PlanConstraints, calibration: MemoryCalibration, correction: float = 1.0
) -> PlanDecision:
    """The fastest predicted plan that fits ``constraints.budget_bytes``; see the module docstring.

    ``correction`` (from ``CorrectionStore.get``) multiplies every predicted peak. Nothing is
    logged above DEBUG: the caller logs ``decision.log_line()`` once.
    """
    priced, count = _price_grid(probe, constraints, calibration, correction, budget=constraints.budget_bytes)
    feasible = [p for p in priced if p.rate is not None]
    if not feasible:
        return _minimal_decision(probe, constraints, calibration, correction, count)
    best_rate = max(p.rate.pipeline_images_per_s for p in feasible)
    window = [p for p in feasible if p.rate.pipeline_images_per_s >= (1.0 - TIE_TOLERANCE) * best_rate]
    chosen = min(window, key=partial(_tie_key, more_threads=probe.inference_busy_threads > 0, probe=probe))
    plan = chosen.plan.with_changes(source="autotune")
    reasons = _reasons(plan, chosen.memory, chosen.rate, probe, constraints, len(window), best_rate)
    decision = PlanDecision(plan, chosen.memory, chosen.rate, count, True, reasons, constraints.budget_bytes)
    log.debug("%s", decision.log_line())  # the caller logs log_line() once, at INFO
    return decision


def price_plan(
    plan: LoaderPlan, probe: Probe, constraints: PlanConstraints, calibration: MemoryCalibration,
    correction: float = 1.0,
) -> PlanDecision:
    """Price one given plan (e.g. the current settings, for ``worker tune``) against the constraints.

    ``fits`` says whether its predicted peak is within budget; reasons say by how much it is over
    and whether its ``tasks_per_reserve`` is more than the reservation timeout allows.
    """
    rate = predict_rate(plan, probe)
    memory = predict_peak(plan, probe, calibration, correction, rate)
    over = memory.bound_bytes - constraints.budget_bytes
    reasons = [
        f"predicted peak {memory.bound_bytes / MiB:.0f} MiB with every queue full "
        + (f"is over the budget {constraints.budget_bytes / MiB:.0f} MiB by {over / MiB:.0f} MiB" if over > 0
           else f"<= budget {constraints.budget_bytes / MiB:.0f} MiB"),
        f"{rate.pipeline_images_per_s:.2f} images/s, bottleneck {rate.bottleneck}",
    ]
    allowed = _reserve_allowance(plan, rate, constraints)
    if not within_allowance(plan, allowed):
        reasons.append(f"tasks_per_reserve {plan.tasks_per_reserve} holds up to {plan.held_tasks} tasks per loader "
                       f"worker, over the {allowed} the reservation timeout allows")
    return PlanDecision(plan, memory, rate, 1, over <= 0, tuple(reasons), constraints.budget_bytes)


def plan_options(
    probe: Probe, constraints: PlanConstraints, calibration: MemoryCalibration, correction: float = 1.0
) -> tuple[PlanOption, ...]:
    """The memory/rate Pareto front of the grid, budget ignored, smallest peak first.

    Each option is the fastest plan at or below its peak: what the advisory sizes against an
    observed peak. Timeout and pinned fields still apply.
    """
    priced, _ = _price_grid(probe, constraints, calibration, correction, budget=None)
    front: list[PlanOption] = []
    for item in sorted(priced, key=lambda p: (p.memory.total_bytes, -p.rate.pipeline_images_per_s, _tie_key(p))):
        rate = item.rate.pipeline_images_per_s
        if not front or rate > front[-1].predicted_images_per_s * (1.0 + TIE_TOLERANCE):
            front.append(PlanOption(item.plan.with_changes(source="autotune"), item.memory.total_bytes, rate))
    return tuple(front)


def _price_grid(
    probe: Probe, constraints: PlanConstraints, calibration: MemoryCalibration, correction: float,
    budget: Optional[int],
) -> tuple[list[_Priced], int]:
    """Price every grid plan; drop those over the timeout allowance. Rates only for those in budget.

    Also dropped: reserving fewer tasks than a batch where the allowance covers a whole batch.
    Filling a batch then takes several reserves per lane, each a request the Antenna server
    serves, for a few compressed bodies less in flight; with a short timeout it is the way to
    keep a batch, and stays.
    """
    priced: list[_Priced] = []
    count = 0
    reserve_pinned = "tasks_per_reserve" in constraints.pinned
    either_pinned = reserve_pinned or "batch_size" in constraints.pinned
    for plan in _grid(probe, constraints):
        count += 1
        bound = predict_peak(plan, probe, calibration, correction)  # every queue full
        if budget is not None and bound.bound_bytes > budget:
            priced.append(_Priced(plan, bound, None))
            continue
        rate = predict_rate(plan, probe)
        memory = expected_peak(bound, plan, probe, calibration, rate)
        allowance = _reserve_allowance(plan, rate, constraints)
        if not reserve_pinned and not within_allowance(plan, allowance):
            continue
        if not either_pinned and plan.tasks_per_reserve < plan.batch_size <= allowance:
            continue
        priced.append(_Priced(plan, memory, rate))
    return priced, count


def within_allowance(plan: LoaderPlan, allowance: int) -> bool:
    """Whether a loader worker's held tasks (``LoaderPlan.held_tasks``) fit the timeout's allowance.
    One task per reserve always does: a worker cannot reserve fewer (it then holds two, one in
    flight, inside the timeout's margin)."""
    return plan.tasks_per_reserve == 1 or plan.held_tasks <= allowance


def _reserve_allowance(plan: LoaderPlan, rate: RateEstimate, constraints: PlanConstraints) -> int:
    worker_rate = rate.pipeline_images_per_s / max(1, plan.num_workers)
    allowed = max_tasks_per_reserve(
        worker_rate, constraints.reservation_timeout_s, constraints.timeout_margin, queue_wait_s(plan, rate)
    )
    return max(1, allowed)  # one task at a time is the floor: a worker cannot reserve fewer


def _grid(probe: Probe, constraints: PlanConstraints) -> Iterator[LoaderPlan]:
    """Grid plans, pinned fields fixed. Skips equivalents: more threads than reserved tasks (only
    the smallest such thread count), prefetch > 1 without workers, pin where it cannot help.

    Also skips reserving more than a lane's connections or one batch, whichever is more. Past that a
    reservation's tasks wait for a download slot; the next reserve goes out as the last of them
    starts, so what more buys is fewer API exchanges, which the model prices (at 0.005 core-s each,
    reserving 32 instead of 8 saves an image 0.4 ms). What it costs is the job's tail, which the
    steady-state model does not see: each lane's last reservation is worked off alone once the
    others have drained. A null job of 240 large images on a 100 ms link ran its last 19 images on
    one lane of two at half the rate (6 s of its 66) with 32 per reserve and 8 connections.
    """
    values = _grid_values(constraints, probe)
    pinned = constraints.pinned
    for workers in values["num_workers"]:
        prefetches = values["prefetch_factor"] if workers > 0 or "prefetch_factor" in pinned else (1,)
        for prefetch in prefetches:
            for batch in values["batch_size"]:
                for reserve in values["tasks_per_reserve"]:
                    for threads in _thread_choices(values["download_threads"], reserve, batch, pinned):
                        for pin in values["pin_memory"]:
                            for inference_threads in values["inference_threads"]:
                                plan = LoaderPlan(reserve, batch, workers, prefetch, pin, threads,
                                                  values["tensor_dtype"][0], "autotune", inference_threads)
                                if pin and "pin_memory" not in pinned and not _pin_helps(plan, probe, constraints):
                                    continue
                                yield plan


def _grid_values(constraints: PlanConstraints, probe: Probe) -> dict[str, tuple]:
    values: dict[str, tuple] = {
        "batch_size": _batch_choices(probe),
        "num_workers": tuple(range(constraints.max_workers + 1)),
        "prefetch_factor": PREFETCH_FACTORS,
        "download_threads": DOWNLOAD_THREADS,
        "tasks_per_reserve": TASKS_PER_RESERVE,
        "pin_memory": (False, True) if constraints.cuda else (False,),
        "tensor_dtype": ("uint8",),
        "inference_threads": _inference_thread_choices(probe, constraints),
    }
    for name, value in constraints.pinned.items():
        values[name] = (value,)
    return values


def _batch_choices(probe: Probe) -> tuple[int, ...]:
    """Every batch size on CUDA; on CPU none past the largest batch the probe timed, rounded up to
    the next candidate, unless inference is a small part of an image's cost.

    The cost fit (per-batch overhead + per-image cost) is measured on the probe's batches only.
    On CPU a bigger batch buys little but that overhead, while its per-image cost grows with its
    working set (``benchmarks/ingest_cpu.py batches`` and the grid in docs/benchmarks.md measure
    it), so extrapolating the overhead's amortisation would buy exactly the batches that lose.
    Where inference costs under ``MINOR_INFERENCE_SHARE`` of the loading's CPU per image (the null
    pipeline, a tiny model), its working set cannot decide, and a bigger batch does buy something
    real: fewer handoffs and result posts per image (one null job: 50 images/s at batch 4, 57 at 8).
    """
    if probe.cuda or probe.max_timed_batch <= 0:
        return BATCH_SIZES
    timed = probe.max_timed_batch
    if probe.inference_s(timed) / timed < MINOR_INFERENCE_SHARE * probe.loader_cpu_s_per_image():
        return BATCH_SIZES
    ceiling = next((size for size in BATCH_SIZES if size >= timed), BATCH_SIZES[-1])
    return tuple(size for size in BATCH_SIZES if size <= ceiling)


def _inference_thread_choices(probe: Probe, constraints: PlanConstraints) -> tuple[int, ...]:
    """One thread or the process default: both were timed by the probe. On CUDA the default only
    (the CPU threads feed the device), and the default only when one thread was not timed."""
    default = probe.inference_threads
    if constraints.cuda or probe.cuda or default <= 1 or probe.single_thread_inference_s <= 0:
        return (default,)
    return (1, default)


def _thread_choices(threads: Sequence[int], reserve: int, batch: int, pinned: Mapping[str, object]) -> Sequence[int]:
    """Threads beyond the reserved tasks never run: keep only the smallest count >= ``reserve``.

    And at least two once a lane reserves two or more tasks. A download from a server sharing
    this host's busy CPU takes longer than the probe's idle one, and with one connection the
    lane's decoder then waits: in the small benchmark job one connection per lane did 8.3-9.8
    images/s where four or sixteen did 9.9-11.5 (same batch and threads), for one more
    compressed body in flight per lane.

    Unless the operator pins ``tasks_per_reserve``, no count under ``reserve`` that is also under
    ``batch``: a reservation larger than both the connections and a batch only lengthens the
    job's tail (see ``_grid``).
    """
    if "download_threads" in pinned:
        choices = list(threads)
    else:
        floor = min(2, reserve)
        choices = [t for t in threads if floor <= t < reserve] + [t for t in threads if t >= reserve][:1]
    if "tasks_per_reserve" in pinned:
        return choices
    return [t for t in choices if reserve <= max(batch, t)]


def _pin_helps(plan: LoaderPlan, probe: Probe, constraints: PlanConstraints) -> bool:
    """CUDA, and the pageable copy is a meaningful share of the batch's inference time."""
    return constraints.cuda and probe.cuda and transfer_share(plan, probe) >= constraints.min_transfer_share_for_pin


def downloads_needed(rate: RateEstimate, probe: Probe) -> float:
    """Little's law at the plan's own ceiling: downloads in flight to feed its decoders (or the
    model, when slower) at full speed = that rate x seconds per download. The decoders' ceiling
    is taken at the fastest sampled decode (``Probe.decode_floor_s_per_image``): the link is
    provisioned for what the cores can do undisturbed, the rate predicted with the median."""
    return decode_ceiling(rate, probe) * probe.download_s_per_image()


def decode_ceiling(rate: RateEstimate, probe: Probe) -> float:
    """The plan's decoders at the fastest sampled decode, or the model's rate where lower."""
    floor_s = probe.decode_floor_s_per_image
    speedup = probe.decode_s_per_image / floor_s if 0 < floor_s < probe.decode_s_per_image else 1.0
    return min(rate.decode_images_per_s * speedup, rate.inference_images_per_s)


def _tie_key(item: _Priced, more_threads: bool = False, probe: Optional[Probe] = None) -> tuple:
    plan = item.plan
    # Among ties, first the plans whose downloads in flight could feed their decoders at full
    # speed (Little's law): when the model says the CPU is the bound, connections add nothing to
    # the predicted rate, yet the probe's CPU figure is a three-image sample (it moved 30% between
    # runs of one job), and a plan provisioned only for it left a far link's lanes waiting on
    # downloads (null pipeline, 300 ms link: 33 images/s at 32 in flight, 42 at 96). Compressed
    # bodies are cheap next to decoded images; memory still decides among the rest.
    short = probe is not None and connections_in_flight(plan) < downloads_needed(item.rate, probe)
    # Reserving what one batch needs: each reserve is a request the Antenna server serves for
    # every worker of a fleet, and a reserve per image costs more than the model's round trip.
    reserve_off_batch = abs(math.log2(plan.tasks_per_reserve) - math.log2(plan.batch_size))
    return (short, item.memory.total_bytes, plan.num_workers, reserve_off_batch, plan.tasks_per_reserve,
            plan.download_threads, plan.prefetch_factor, plan.batch_size, plan.pin_memory,
            -plan.inference_threads if more_threads else plan.inference_threads)


def _minimal_decision(
    probe: Probe, constraints: PlanConstraints, calibration: MemoryCalibration, correction: float, count: int
) -> PlanDecision:
    plan = MINIMAL_PLAN.with_changes(**constraints.pinned, source="minimal")
    rate = predict_rate(plan, probe)
    memory = predict_peak(plan, probe, calibration, correction, rate)
    over = memory.bound_bytes - constraints.budget_bytes
    reasons = [
        f"nothing fits: the minimal plan's predicted peak {memory.bound_bytes / MiB:.0f} MiB is over the "
        f"budget {constraints.budget_bytes / MiB:.0f} MiB by {over / MiB:.0f} MiB"
        + (f" ({over / constraints.budget_bytes:.0%})" if constraints.budget_bytes > 0 else ""),
        f"baseline alone (model loaded) is {probe.baseline_bytes / MiB:.0f} MiB; one decoded image "
        f"{probe.decoded_bytes_per_image / MiB:.1f} MiB",
    ]
    reasons.extend(_pinned_reasons(constraints))
    decision = PlanDecision(plan, memory, rate, count, False, tuple(reasons), constraints.budget_bytes)
    log.debug("%s", decision.log_line())
    return decision


def _reasons(
    plan: LoaderPlan, memory: MemoryEstimate, rate: RateEstimate, probe: Probe,
    constraints: PlanConstraints, ties: int, best_rate: float,
) -> tuple[str, ...]:
    reasons = [
        f"highest predicted rate that fits: {rate.pipeline_images_per_s:.2f} images/s, bottleneck {rate.bottleneck}",
        f"predicted peak {memory.total_bytes / MiB:.0f} MiB, {memory.bound_bytes / MiB:.0f} MiB with every queue full "
        f"<= budget {constraints.budget_bytes / MiB:.0f} MiB",
    ]
    if ties > 1:
        reasons.append(f"smallest peak among {ties} plans within {TIE_TOLERANCE:.0%} of the best {best_rate:.2f} images/s")
    reasons.append(_pin_reason(plan, probe, constraints))
    reasons.append(_downloads_reason(plan, rate, probe))
    reasons.append(_threads_reason(plan, rate, probe, constraints))
    if plan.num_workers > 0 and "prefetch_factor" not in constraints.pinned:
        reasons.append(f"prefetch_factor {plan.prefetch_factor}: a deeper queue would gain under "
                       f"{TIE_TOLERANCE:.0%} for its memory" if plan.prefetch_factor < max(PREFETCH_FACTORS)
                       else f"prefetch_factor {plan.prefetch_factor}: the deepest queue considered")
    allowed = _reserve_allowance(plan, rate, constraints)
    reasons.append(
        f"tasks_per_reserve {plan.tasks_per_reserve}, up to {plan.held_tasks} held per loader worker (timeout allows "
        f"{allowed}: {constraints.timeout_margin:.0%} of {constraints.reservation_timeout_s:.0f} s at "
        f"{rate.pipeline_images_per_s / max(1, plan.num_workers):.2f} images/s per loader worker)"
    )
    if not within_allowance(plan, allowed):
        reasons.append("WARNING: pinned tasks_per_reserve exceeds what the reservation timeout allows")
    reasons.extend(_pinned_reasons(constraints))
    return tuple(reasons)


def _pin_reason(plan: LoaderPlan, probe: Probe, constraints: PlanConstraints) -> str:
    if "pin_memory" in constraints.pinned:
        return f"pin_memory={plan.pin_memory} as pinned by the operator"
    if not (constraints.cuda and probe.cuda):
        return "pin_memory off: no CUDA"
    share = transfer_share(plan, probe)
    if share < constraints.min_transfer_share_for_pin:
        return f"pin_memory off: host->device copy is {share:.0%} of inference time (< {constraints.min_transfer_share_for_pin:.0%})"
    return f"pin_memory {'on' if plan.pin_memory else 'off (did not pay for its memory)'}: copy is {share:.0%} of inference time"


def _downloads_reason(plan: LoaderPlan, rate: RateEstimate, probe: Probe) -> str:
    """Little's law: images/s x seconds per download = downloads in flight the plan needs."""
    download_s = probe.download_s_per_image()
    ceiling = decode_ceiling(rate, probe)
    in_flight = connections_in_flight(plan)
    return (f"downloads in flight {in_flight} ({max(1, plan.num_workers)} lane(s) x "
            f"{plan.downloads_per_lane}): Little's law, the lanes' ceiling "
            f"{ceiling:.1f} images/s x {download_s:.3f} s per download needs {ceiling * download_s:.1f}; "
            f"compressed bytes in flight up to {in_flight * probe.max_jpeg_bytes / MiB:.0f} MiB")


def _threads_reason(plan: LoaderPlan, rate: RateEstimate, probe: Probe, constraints: PlanConstraints) -> str:
    if "inference_threads" in constraints.pinned:
        return f"inference_threads={plan.inference_threads} as pinned by the operator (OMP_NUM_THREADS)"
    if len(_inference_thread_choices(probe, constraints)) == 1:
        return f"inference_threads {plan.inference_threads}: the only count timed" + (" (CUDA)" if probe.cuda else "")
    loading = rate.pipeline_images_per_s * probe.loader_cpu_s_per_image()
    return (f"inference_threads {plan.inference_threads}: loading takes {loading:.1f} of {probe.cpu_count} cores "
            f"at {rate.pipeline_images_per_s:.2f} images/s; one thread {probe.single_thread_inference_s:.4f} s per "
            f"image vs {probe.inference_s(1) :.4f} s at {probe.inference_threads}")


def _pinned_reasons(constraints: PlanConstraints) -> list[str]:
    if not constraints.pinned:
        return []
    fields_ = ", ".join(f"{name}={value}" for name, value in sorted(constraints.pinned.items()))
    return [f"pinned by the operator, kept as given: {fields_}"]
