"""Check the project's CUDA claims on a CUDA host; print a Markdown table for docs/benchmarks.md.

    python benchmarks/gpu_check.py                       # cuda:0, quebec_vermont_moths_2023, 2,497 species
    python benchmarks/gpu_check.py --gpu-memory-fraction 0.25 --batch-sizes 1,2,4,8,16

Exit 0 with one line ``skipped: no CUDA device ...`` where torch sees no CUDA device; exit 1 if
any check fails; 0 otherwise. Every check calls the worker's own code: ``ingest.Batch.pin_memory``
(the DataLoader's pin-memory hook), ``ADCPipeline.infer`` built by ``pipelines.load_pipeline`` from
random-initialised ADC-format checkpoints (``worker.testing.adc_models``, fetched through a
``file://`` mirror; no network). The test detector finds one whole-image box per image and the
filter says ``moth`` for every crop, so each image costs one detector item and two classifier crops.

Checks:
  pinned      ``Batch.pin_memory`` gives page-locked tensors; ``.to(cuda, non_blocking=True)`` as
              ``ADCPipeline.infer`` calls it returns before the copy ends (the host runs on while
              the copy is in flight), and pinned copies are faster than pageable ones
  device-float the detector and the classifiers receive float32 tensors on the device while
              ``infer`` is given uint8 host images; the host's resident memory during ``infer``
              grows by less than a float32 copy of the batch
  throughput  images/s and peak device memory (``torch.cuda.max_memory_allocated``) of the whole
              pipeline, the detector model and the species classifier at each batch size
  planned     the model batch sizes the worker plans on CUDA (``plan_device_batches``: activation
              memory per image and per crop measured at start, at most the settings'
              AMI_LOCALIZATION_BATCH_SIZE / AMI_CLASSIFICATION_BATCH_SIZE, the defaults and 64/256)
              against the measured peak of a batch that size and the budget
              AMI_GPU_MEMORY_FRACTION x device memory
  oom-split   with ``torch.cuda.set_per_process_memory_fraction`` set so a detector chunk cannot
              fit, ``infer`` splits the chunk (ADCPipeline's out-of-memory path) and every image
              still gets its detection and both classifications
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MiB = 1024 * 1024
SLUG = "quebec_vermont_moths_2023"
SPECIES_CLASSES = 2497
IMAGE_SHAPE = (3, 1536, 2048)  # a trap camera's frame, uint8 CHW
BATCH_SIZES = (1, 2, 4, 8, 16)
Verdict = Literal["pass", "FAIL", "info"]


@dataclass(frozen=True)
class Row:
    check: str
    claim: str
    measured: str
    verdict: Verdict


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table, one row per check; ``|`` and newlines inside cells are escaped."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| check | claim | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {cell(r.check)} | {cell(r.claim)} | {cell(r.measured)} | "
              f"{'**FAIL**' if r.verdict == 'FAIL' else r.verdict} |" for r in rows]
    return "\n".join(lines) + "\n"


def no_cuda_line() -> Optional[str]:
    """The one line printed instead of the table where torch sees no CUDA device; None with one."""
    if torch.cuda.is_available():
        return None
    return (f"skipped: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
            "run on a CUDA host")


# ---------------------------------------------------------------- setup


def build_pipelines(device: torch.device, scratch: Path, classes: int) -> Callable[..., object]:
    """A factory ``(localization_batch_size, classification_batch_size) -> ADCPipeline`` on ``device``;
    the models are written once, fetched through a file:// mirror and shared by every pipeline."""
    from worker.pipelines import ADCOptions, load_pipeline
    from worker.pipelines.catalog import PIPELINES
    from worker.testing.adc_models import write_models

    mirror = scratch / "mirror"
    write_models(mirror, [SLUG], num_classes={PIPELINES[SLUG].classifier.key: classes})
    options = ADCOptions(models_dir=scratch / "models", base_url=mirror.as_uri())

    def make(localization: int, classification: int):
        pipeline = load_pipeline(SLUG, device, adc=options, localization_batch_size=localization,
                                 classification_batch_size=classification)
        pipeline.prepare()
        return pipeline

    return make


def host_images(count: int, *, pinned: bool) -> list[torch.Tensor]:
    """uint8 CHW images; pinned ones go through ``ingest.Batch.pin_memory`` as the DataLoader does."""
    from worker.ingest import Batch, LoadedImage

    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, IMAGE_SHAPE, dtype=torch.uint8, generator=generator) for _ in range(count)]
    if not pinned:
        return images
    batch = Batch([LoadedImage(task=None, image=image) for image in images])  # type: ignore[arg-type]
    return [item.image for item in batch.pin_memory().items]  # type: ignore[misc]


# ---------------------------------------------------------------- checks


@dataclass(frozen=True)
class Copy:
    host_call_s: float  # until the last ``.to`` call returned
    copy_s: float  # on the device, from CUDA events around the copies
    in_flight: bool  # the stream was still busy when the calls returned


def time_copies(images: Sequence[torch.Tensor], device: torch.device, *, non_blocking: bool) -> Copy:
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    started_s = time.perf_counter()
    _ = [i.to(device, non_blocking=non_blocking) for i in images]
    host_call_s = time.perf_counter() - started_s
    in_flight = not torch.cuda.current_stream(device).query()
    end.record()
    torch.cuda.synchronize(device)
    return Copy(host_call_s, start.elapsed_time(end) / 1000, in_flight)


def check_pinned(device: torch.device, count: int = 16) -> list[Row]:
    pageable, pinned = host_images(count, pinned=False), host_images(count, pinned=True)
    total_bytes = sum(i.numel() for i in pinned)
    all_pinned = all(i.is_pinned() for i in pinned)
    time_copies(pageable[:1], device, non_blocking=False)  # the first copies pay CUDA's lazy set-up
    time_copies(pinned[:1], device, non_blocking=True)
    slow = time_copies(pageable, device, non_blocking=False)
    fast = time_copies(pinned, device, non_blocking=True)  # as ADCPipeline.infer moves its images
    claim = "ingest pins host batches; non-blocking copies return while in flight; pinned beats pageable"
    measured = (f"{count} x {IMAGE_SHAPE[1]}x{IMAGE_SHAPE[2]} uint8 ({total_bytes / MiB:.0f} MiB): pinned "
                f"{all_pinned}; pageable {total_bytes / slow.copy_s / 1e9:.1f} GB/s, pinned {total_bytes / fast.copy_s / 1e9:.1f} GB/s; "
                f"pinned host call {fast.host_call_s * 1e3:.2f} ms vs copy {fast.copy_s * 1e3:.2f} ms, still copying "
                f"after the call: {fast.in_flight} (pageable: host call {slow.host_call_s * 1e3:.2f} ms)")
    ok = all_pinned and fast.in_flight and fast.copy_s < slow.copy_s
    return [Row("pinned", claim, measured, "pass" if ok else "FAIL")]


class InputRecorder:
    """Forward pre-hooks recording (dtype, device) of what each model receives."""

    def __init__(self) -> None:
        self.seen: dict[str, set[tuple[str, str]]] = {}
        self.handles: list = []

    def watch(self, name: str, module: torch.nn.Module) -> None:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            self.seen.setdefault(name, set()).update((str(t.dtype), str(t.device)) for t in tensors)

        self.handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class RssPeak:
    """Peak resident set size of this process, sampled every ``interval_s`` in a thread."""

    def __init__(self, interval_s: float = 0.002) -> None:
        import psutil

        self._process = psutil.Process()
        self.interval_s = interval_s
        self.before_bytes = self._process.memory_info().rss
        self.peak_bytes = self.before_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def check_device_float(make: Callable[..., object], device: torch.device, count: int = 8) -> list[Row]:
    pipeline = make(count, 20)
    models = pipeline.loaded_models()  # type: ignore[attr-defined]
    images = host_images(count, pinned=True)
    pipeline.infer(images)  # warm: allocator and kernels settle before the host is measured  # type: ignore[attr-defined]
    recorder = InputRecorder()
    recorder.watch("detector", models.detector)
    recorder.watch("moth/non-moth", models.binary.model)
    recorder.watch("species", models.classifier.model)
    try:
        with RssPeak() as rss:
            pipeline.infer(images)  # type: ignore[attr-defined]
    finally:
        recorder.remove()
    float_batch_bytes = sum(i.numel() * 4 for i in images)
    growth = rss.peak_bytes - rss.before_bytes
    expected = {("torch.float32", str(torch.device(device.type, torch.cuda.current_device())))}
    inputs_ok = all(seen == expected for seen in recorder.seen.values()) and len(recorder.seen) == 3
    given = {(str(i.dtype), str(i.device)) for i in images}
    return [
        Row("device-float", "uint8 host images in; every model gets float32 made on the device",
            f"infer given {sorted(given)}; " + "; ".join(f"{k} got {sorted(v)}" for k, v in recorder.seen.items()),
            "pass" if inputs_ok else "FAIL"),
        Row("device-float host", "no float copy of the batch on the host",
            f"RSS growth during infer of {count} images {growth / MiB:.0f} MiB vs a float32 batch {float_batch_bytes / MiB:.0f} MiB",
            "pass" if growth < float_batch_bytes / 2 else "FAIL"),
    ]


@dataclass(frozen=True)
class Measured:
    what: str
    batch: int
    items_per_s: float
    peak_bytes: int  # max_memory_allocated during the timed passes
    baseline_bytes: int  # memory_allocated before them (models and inputs)


def timed(what: str, batch: int, device: torch.device, run: Callable[[], object], repeats: int) -> Measured:
    run()  # warm-up at this size
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(repeats):
        started_s = time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started_s)
    return Measured(what, batch, batch / statistics.median(seconds), torch.cuda.max_memory_allocated(device), baseline)


def measure_batches(make: Callable[..., object], device: torch.device, sizes: Sequence[int], repeats: int) -> list[Measured]:
    out = []
    for size in sizes:
        out += measure_batch(make, device, size, repeats)
        torch.cuda.empty_cache()  # this size's inputs are gone: the next size starts from the models alone
    return out


def measure_batch(make: Callable[..., object], device: torch.device, size: int, repeats: int) -> list[Measured]:
    """The whole pipeline (detector and classifier batch ``size``), then each model alone."""
    pipeline = make(size, size)
    models = pipeline.loaded_models()  # type: ignore[attr-defined]
    pinned = host_images(size, pinned=True)
    out = [timed("pipeline", size, device, lambda: pipeline.infer(pinned), repeats)]  # type: ignore[attr-defined]
    on_device = [i.to(device) for i in pinned]
    side_px = models.classifier.spec.input_size_px
    crops = torch.rand(size, 3, side_px, side_px, device=device)
    with torch.no_grad():
        # the detector's input as ADCPipeline makes it: float [0, 1] converted on the device
        out.append(timed("detector", size, device, lambda: models.detector([i.float().div_(255.0) for i in on_device]), repeats))
        out.append(timed("species classifier", size, device, lambda: models.classifier.model(crops), repeats))
    return out


def throughput_rows(measured: Sequence[Measured]) -> list[Row]:
    rows = []
    for what in ("pipeline", "detector", "species classifier"):
        cells = [f"b{m.batch}: {m.items_per_s:.1f}/s, +{(m.peak_bytes - m.baseline_bytes) / MiB:.0f} MiB"
                 for m in measured if m.what == what]
        rows.append(Row(f"throughput {what}", "images/s (crops/s for the classifier) and peak above the models, per batch size",
                        "; ".join(cells), "info"))
    return rows


PLAN_CEILINGS = ((8, 20), (64, 256))  # (detector, classifier) settings: the defaults, and room to grow


def check_planned(make: Callable[..., object], device: torch.device, fraction: float,
                  measured: Sequence[Measured]) -> list[Row]:
    """The worker's own model-batch planner (``worker.probing.plan_device_batches``: device memory
    per image and per crop measured at start, against ``fraction`` x the card) at each ceiling in
    ``PLAN_CEILINGS``; then the pipeline runs a batch of the planned size and its measured peak is
    compared with the planned prediction and the budget."""
    from worker.pipelines.base import call_peak_bytes
    from worker.probing import inference_memory, plan_device_batches

    total = torch.cuda.get_device_properties(device).total_memory
    budget = int(fraction * total)
    rows = []
    for localization, classification in PLAN_CEILINGS:
        pipeline = make(localization, classification)
        planned = plan_device_batches(pipeline, fraction)  # type: ignore[arg-type]
        if planned is None:
            rows.append(Row("planned", f"model batches planned under {fraction:g} x device memory",
                            "nothing measured", "FAIL"))
            continue
        images = host_images(planned.localization.items, pinned=True)
        pipeline.infer(images)  # type: ignore[attr-defined]
        peak = call_peak_bytes(device, lambda: pipeline.infer(images))  # type: ignore[attr-defined]
        whole = torch.cuda.max_memory_allocated(device)
        height, width = IMAGE_SHAPE[1:]
        geometry = pipeline.model_input(width, height)  # type: ignore[attr-defined]
        memory = inference_memory(pipeline)  # type: ignore[arg-type]
        predicted = memory.call_bytes(len(images), geometry.pixels, geometry.float_copy_bytes(width, height)) if memory else 0
        classifier = planned.classification
        rows.append(Row(
            "planned", f"model batches planned from measured activation memory fit {fraction:g} x device memory",
            f"ceiling {localization}/{classification}: detector batch {planned.localization.items} "
            f"({planned.localization.reason}), classifier batch "
            f"{classifier.items if classifier else 'unplanned'}; {len(images)} images of {IMAGE_SHAPE[2]}x{IMAGE_SHAPE[1]}: "
            f"peak above the models {peak / MiB:,.0f} MiB vs predicted {predicted / MiB:,.0f} MiB at this image size; allocated peak {whole / MiB:,.0f} MiB vs "
            f"budget {fraction:g} x {total / MiB:,.0f} = {budget / MiB:,.0f} MiB",
            "pass" if whole <= budget else "FAIL"))
        torch.cuda.empty_cache()
    return rows


class SplitLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "ran out of device memory" in record.getMessage():
            self.messages.append(record.getMessage())


def check_oom_split(make: Callable[..., object], device: torch.device, measured: Sequence[Measured], count: int = 8) -> list[Row]:
    """Cap the allocator just above one detector item's need, run a chunk of ``count``, expect splits."""
    one = next(m for m in measured if m.what == "pipeline" and m.batch == 1)
    pipeline = make(count, count)
    images = host_images(count, pinned=True)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    handler = SplitLog()
    logging.getLogger("worker.pipelines.adc").addHandler(handler)
    outcome = "no out-of-memory error at any cap tried"
    ok = False
    try:
        for headroom in (3.0, 2.0, 1.5, 1.2):
            cap_bytes = int(torch.cuda.memory_allocated(device) + headroom * (one.peak_bytes - one.baseline_bytes))
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)
            torch.cuda.empty_cache()
            try:
                results = pipeline.infer(images)  # type: ignore[attr-defined]
            except torch.cuda.OutOfMemoryError:
                outcome = f"cap {cap_bytes / MiB:,.0f} MiB ({headroom:g} x one item's need): one image alone ran out of memory"
                break  # lower caps fail the same way
            complete = len(results) == count and all(len(r) == 1 and len(r[0].classifications) == 2 for r in results)
            if handler.messages:
                ok = complete
                outcome = (f"cap {cap_bytes / MiB:,.0f} MiB ({headroom:g} x one item's need): {len(handler.messages)} splits "
                           f"(first: {handler.messages[0]}); {sum(len(r) for r in results)}/{count} images with a "
                           f"detection and both classifications")
                break
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        logging.getLogger("worker.pipelines.adc").removeHandler(handler)
        torch.cuda.empty_cache()
    return [Row("oom-split", "an out-of-memory chunk is split and retried; every image still gets a result",
                outcome, "pass" if ok else "FAIL")]


# ---------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per batch size (median)")
    parser.add_argument("--classes", type=int, default=SPECIES_CLASSES, help="species classes of the test checkpoint")
    parser.add_argument("--gpu-memory-fraction", type=float, default=None,
                        help="the budget of the 'planned' check (default: AMI_GPU_MEMORY_FRACTION's default)")
    args = parser.parse_args(argv)
    skipped = no_cuda_line()
    if skipped is not None:
        print(skipped)
        return 0
    from worker.settings import Settings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fraction = args.gpu_memory_fraction or Settings.model_fields["gpu_memory_fraction"].default
    device = torch.device(args.device)
    torch.cuda.set_device(device)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        make = build_pipelines(device, Path(scratch), args.classes)
        rows = check_pinned(device)
        rows += check_device_float(make, device)
        measured = measure_batches(make, device, sorted(set(sizes) | {1}), args.repeats)
        rows += throughput_rows(measured)
        rows += check_planned(make, device, fraction, measured)
        rows += check_oom_split(make, device, measured)
    name = torch.cuda.get_device_name(device)
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {SLUG} ({args.classes:,} species), "
          f"{IMAGE_SHAPE[2]}x{IMAGE_SHAPE[1]} uint8 images\n")
    print(format_table(rows))
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
