"""The memory model's components, its calibration file and the per-pipeline correction store."""
from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest

from autotune import calibration as calibration_module, corrections
from autotune.calibration import MemoryCalibration, load_calibration, save_calibration
from autotune.corrections import CorrectionStore
from autotune.memory_model import DOWNLOAD_READ_BYTES, compare_table, predict_peak
from autotune.plan import LoaderPlan

MiB = 1024 * 1024
GiB = 1024 * MiB
BATCH_TERMS = ("prefetch_queue_bytes", "pinned_bytes", "inference_batch_bytes")
FIXED_TERMS = ("baseline_bytes", "loader_workers_bytes", "inflight_downloads_bytes", "decode_scratch_bytes")


def plan(**changes) -> LoaderPlan:
    values = dict(tasks_per_reserve=8, batch_size=4, num_workers=2, prefetch_factor=2,
                  pin_memory=True, download_threads=4)
    values.update(changes)
    return LoaderPlan(**values)


def test_components_add_up_to_the_total(make_probe, calibration):
    estimate = predict_peak(plan(), make_probe(cuda=True), calibration, correction=1.25)
    parts = [getattr(estimate, name) for name in FIXED_TERMS + BATCH_TERMS]
    assert estimate.raw_total_bytes == sum(parts)
    assert estimate.total_bytes == round(sum(parts) * 1.25)
    assert estimate.correction == 1.25


def test_components_by_hand(make_probe, calibration):
    probe = make_probe(cuda=True)
    image = probe.decoded_bytes_per_image
    e = predict_peak(plan(), probe, calibration)
    assert e.baseline_bytes == probe.baseline_bytes
    assert e.loader_workers_bytes == 2 * probe.worker_process_bytes
    # each download in flight: its body (x the calibration's factor, 2 here) and one read under way
    assert e.inflight_downloads_bytes == 2 * 4 * (probe.max_jpeg_bytes * 2 + DOWNLOAD_READ_BYTES)
    assert e.decode_scratch_bytes == 2 * image
    # per worker: its credit (prefetch 2 + the fixture's collate copy 1) and the batch it lent
    assert e.prefetch_queue_bytes == 2 * (2 + 1 + 1) * 4 * image
    assert e.pinned_bytes == (2 * 2 + 1) * 4 * image
    # the batch being inferred is one of the workers' lent batches; CUDA: float copy and
    # activations live on the device
    assert e.inference_batch_bytes == 0


def test_every_loader_worker_keeps_the_batch_it_lent(make_probe, calibration):
    """With every queue full, each loader worker's buffer pool holds its credit and the batch it
    lent the main process (tests/worker/test_ingest.py measures 2 x (2 + 1) x 2 buffers for two
    workers at batch 2, prefetch 2): the shared images the model counts, queue and batch being
    inferred together, are W x (credit + b). One worker: the same as its credit plus the batch
    inferred. In the main process (no workers) or float32 (no pool), the batch inferred once."""
    from dataclasses import replace

    probe = make_probe(cuda=True)
    image = probe.decoded_bytes_per_image
    exact = replace(calibration, collate_copy_factor=0.0)  # the committed calibration's
    for workers in (1, 2, 3):
        e = predict_peak(plan(num_workers=workers, batch_size=2, pin_memory=False), probe, exact)
        assert e.prefetch_queue_bytes + e.inference_batch_bytes == workers * (2 + 1) * 2 * image
    main = predict_peak(plan(num_workers=0, batch_size=2, pin_memory=False), probe, exact)
    assert main.prefetch_queue_bytes + main.inference_batch_bytes == 2 * image
    f32 = predict_peak(plan(num_workers=2, batch_size=2, pin_memory=False, tensor_dtype="float32"), probe, exact)
    assert f32.prefetch_queue_bytes + f32.inference_batch_bytes == 4 * (2 * 2 * 2 + 2) * image


def test_batch_terms_scale_linearly_with_batch(make_probe, calibration):
    for probe in (make_probe(), make_probe(cuda=True)):
        small = predict_peak(plan(batch_size=4), probe, calibration)
        large = predict_peak(plan(batch_size=8), probe, calibration)
        for name in BATCH_TERMS:
            assert getattr(large, name) == 2 * getattr(small, name), name
        for name in FIXED_TERMS:
            assert getattr(large, name) == getattr(small, name), name


def test_each_prefetch_step_adds_one_batch_per_worker(make_probe, calibration):
    probe = make_probe(cuda=True)
    batch_bytes = 4 * probe.decoded_bytes_per_image
    by_prefetch = [predict_peak(plan(prefetch_factor=p, num_workers=3), probe, calibration) for p in (1, 2, 3, 4)]
    for before, after in zip(by_prefetch, by_prefetch[1:]):
        assert after.prefetch_queue_bytes - before.prefetch_queue_bytes == 3 * batch_bytes
        assert after.pinned_bytes - before.pinned_bytes == 3 * batch_bytes
        assert after.inference_batch_bytes == before.inference_batch_bytes


def test_no_workers_means_no_processes_and_no_queue(make_probe, calibration):
    e = predict_peak(plan(num_workers=0, prefetch_factor=4), make_probe(), calibration)
    assert e.loader_workers_bytes == 0
    assert e.prefetch_queue_bytes == 0
    assert e.decode_scratch_bytes == make_probe().decoded_bytes_per_image  # the main process decodes


def test_pin_memory_costs_nothing_without_cuda(make_probe, calibration):
    assert predict_peak(plan(pin_memory=True), make_probe(), calibration).pinned_bytes == 0
    assert predict_peak(plan(pin_memory=True), make_probe(cuda=True), calibration).pinned_bytes > 0


def test_cpu_inference_holds_float_copy_and_activations(make_probe, calibration):
    cpu = predict_peak(plan(), make_probe(), calibration)
    gpu = predict_peak(plan(), make_probe(cuda=True), calibration)
    extra = cpu.inference_batch_bytes - gpu.inference_batch_bytes
    assert extra == 4 * calibration.model_input_pixels * calibration.inference_bytes_per_input_pixel


def test_float32_tensors_are_four_times_larger(make_probe, calibration):
    """Per image 4x; float32 images are fresh segments (no buffer pool), so a worker holds its
    credit and the main process the batch inferred, where uint8 pools also keep each worker's
    lent batch (``test_every_loader_worker_keeps_the_batch_it_lent``)."""
    probe = make_probe(cuda=True)
    image = probe.decoded_bytes_per_image
    u8 = predict_peak(plan(), probe, calibration)
    f32 = predict_peak(plan(tensor_dtype="float32"), probe, calibration)
    assert f32.pinned_bytes == 4 * u8.pinned_bytes
    assert f32.prefetch_queue_bytes == 4 * 2 * (2 + 1) * 4 * image
    assert f32.inference_batch_bytes == 4 * 4 * image


def test_adc_defaults_on_large_images_blow_past_the_reported_oom(make_probe, calibration, large_images):
    # The failure story: 24 MB 4096x3072 JPEGs, float32, 24 per fetch, prefetch 4, pinned, 4 workers,
    # OOM-killed on a 68 GB host. The model must predict more than that.
    adc = LoaderPlan(24, 24, 4, 4, True, 8, tensor_dtype="float32")
    estimate = predict_peak(adc, make_probe(cuda=True, **large_images), calibration)
    assert estimate.total_bytes > 68e9
    assert estimate.prefetch_queue_bytes / 4 > 15 * GiB  # per loader worker, before pinned copies


def test_table_lists_components_mib_and_share(make_probe, calibration):
    estimate = predict_peak(plan(), make_probe(cuda=True), calibration)
    table = estimate.table()
    lines = table.splitlines()
    assert len(lines) == 1 + 8 + 1  # the components (head start 0 here) between header and total
    assert len({len(line.rstrip()) for line in lines[1:-1]}) == 1  # fixed width
    assert f"{estimate.baseline_bytes / MiB:.1f}" in lines[1]
    assert f"{estimate.total_bytes / MiB:.1f}" in lines[-1]
    shares = [float(line.split()[-1].rstrip("%")) for line in lines[1:-1]]
    assert sum(shares) == pytest.approx(100.0, abs=0.5)


def test_compare_table_shows_both_side_by_side(make_probe, calibration):
    probe = make_probe(cuda=True)
    a = predict_peak(plan(), probe, calibration)
    b = predict_peak(plan(batch_size=24, prefetch_factor=4), probe, calibration)
    text = compare_table(a, b, ("recommended", "current"))
    assert "recommended MiB" in text.splitlines()[0] and "current MiB" in text.splitlines()[0]
    last = text.splitlines()[-1]
    assert f"{a.total_bytes / MiB:.1f}" in last and f"{b.total_bytes / MiB:.1f}" in last
    assert "bound" not in text  # every queue full is the prediction itself: no second figure


def test_tables_show_the_bound_where_the_queues_stay_short(make_probe, calibration):
    from autotune.throughput_model import predict_rate

    probe = make_probe(cuda=True, inference_per_image_s=0.0002, inference_overhead_s=0.0)
    chosen = plan(pin_memory=False)
    expected = predict_peak(chosen, probe, calibration, rate=predict_rate(chosen, probe))
    assert expected.bound_bytes > expected.total_bytes
    assert expected.table().splitlines()[-1].split()[-1] == f"{expected.bound_bytes / MiB:.1f}"
    last = compare_table(expected, predict_peak(chosen, probe, calibration)).splitlines()[-1]
    assert last.startswith("bound") and last.split()[-2] == last.split()[-1] == f"{expected.bound_bytes / MiB:.1f}"


def test_committed_calibration_keys_are_the_dataclass_fields():
    data = json.loads(calibration_module.DEFAULT_CALIBRATION_PATH.read_text())
    assert set(data) == {f.name for f in fields(MemoryCalibration)}
    assert {"measured_by", "measured_on"} <= set(data)
    calibration = load_calibration()
    assert calibration.worker_process_bytes > 0 and calibration.model_input_pixels > 0


def test_calibration_round_trip_and_strict_keys(tmp_path, calibration):
    path = save_calibration(calibration, tmp_path / "calibration.json")
    assert load_calibration(path) == calibration
    data = calibration.as_dict()
    with pytest.raises(ValueError, match="missing \\['worker_process_bytes'\\]"):
        MemoryCalibration.from_dict({k: v for k, v in data.items() if k != "worker_process_bytes"})
    with pytest.raises(ValueError, match="unknown \\['surprise'\\]"):
        MemoryCalibration.from_dict({**data, "surprise": 1})


def test_correction_store_defaults_then_learns_by_ema(tmp_path):
    store = CorrectionStore(tmp_path / "c.json", alpha=0.3)
    assert store.get("moths") == 1.0
    assert store.update("moths", predicted_bytes=1000, observed_bytes=1200) == pytest.approx(1.2)  # first job sets it
    assert store.update("moths", predicted_bytes=1000, observed_bytes=800) == pytest.approx(0.7 * 1.2 + 0.3 * 0.8)
    assert store.get("moths") == pytest.approx(1.08)
    assert store.jobs("moths") == 2
    assert store.get("other") == 1.0


def test_correction_store_clamps(tmp_path):
    store = CorrectionStore(tmp_path / "c.json")
    assert store.update("a", 100, 1000) == 3.0
    assert store.update("b", 1000, 100) == 0.5
    for _ in range(5):
        store.update("a", 100, 10_000)
    assert store.get("a") == 3.0


def test_correction_store_persists_atomically(tmp_path):
    path = tmp_path / "nested" / "corrections.json"
    CorrectionStore(path).update("moths", 1000, 1500)
    assert CorrectionStore(path).get("moths") == pytest.approx(1.5)
    assert json.loads(path.read_text()) == {"pipelines": {"moths": {"correction": 1.5, "jobs": 1}}}
    assert [p.name for p in path.parent.iterdir()] == ["corrections.json"]  # no temporary left


def test_correction_store_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "corrections.json"
    store = CorrectionStore(path)
    store.update("moths", 1000, 1500)
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    from autotune import files
    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.update("moths", 1000, 500)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["corrections.json"]


def test_correction_store_survives_a_corrupt_file_and_ignores_bad_inputs(tmp_path):
    path = tmp_path / "corrections.json"
    path.write_text("{not json")
    store = CorrectionStore(path)
    assert store.get("moths") == 1.0
    assert store.update("moths", 0, 100) == 1.0
    assert store.update("moths", 1000, 2000) == pytest.approx(2.0)
    assert CorrectionStore(path).get("moths") == pytest.approx(2.0)


def test_default_correction_path_is_under_user_data():
    assert corrections.default_correction_path(Path("/data/AMI")) == Path("/data/AMI/autotune/memory_corrections.json")


def test_calibration_refuses_negative_or_non_numeric_constants(calibration):
    with pytest.raises(ValueError, match="decode_scratch_factor"):
        MemoryCalibration.from_dict({**calibration.as_dict(), "decode_scratch_factor": -1.0})
    with pytest.raises(ValueError, match="worker_process_bytes"):
        MemoryCalibration.from_dict({**calibration.as_dict(), "worker_process_bytes": "300 MiB"})


def test_a_main_process_that_keeps_up_leaves_each_worker_its_batch_and_two_images(make_probe, calibration):
    """Measured (null pipeline, 2 loader workers, small images): b + 1 shared images per worker at
    batch 4, 8 and 16, b + 1.5 on a far link; the model counts b + 2 and no separate inferred
    batch (it is one of the workers' own). Inference-bound rates keep every queue full."""
    from autotune.memory_model import short_queue
    from autotune.throughput_model import predict_rate

    probe = make_probe(cuda=True, inference_per_image_s=0.0002, inference_overhead_s=0.0)
    image = probe.decoded_bytes_per_image
    for batch in (4, 8, 16):
        chosen = plan(batch_size=batch, tasks_per_reserve=batch, pin_memory=False)
        rate = predict_rate(chosen, probe)
        assert short_queue(chosen, rate)
        expected = predict_peak(chosen, probe, calibration, rate=rate)
        bound = predict_peak(chosen, probe, calibration)
        assert expected.prefetch_queue_bytes == 2 * (batch + 2) * image
        assert expected.inference_batch_bytes == 0
        assert expected.bound_bytes == bound.total_bytes == bound.bound_bytes
        # every queue full: the credit (the fixture's collate copy: 1) and the lent batch per worker
        assert bound.prefetch_queue_bytes == 2 * (2 + 1 + 1) * batch * image
        assert expected.total_bytes < expected.bound_bytes
    slow = make_probe()  # 0.1 s per image on CPU: inference-bound
    chosen = plan(pin_memory=False)
    rate = predict_rate(chosen, slow)
    assert not short_queue(chosen, rate)
    assert predict_peak(chosen, slow, calibration, rate=rate) == predict_peak(chosen, slow, calibration)
    # inference at 4x the loader's pace: a worker also decodes while the main process holds its
    # last batch, b x (loader / inference) / workers images more: 8 x 0.26 / 2 -> 2
    probe = make_probe(cuda=True, inference_per_image_s=0.002, inference_overhead_s=0.0)
    chosen = plan(batch_size=8, tasks_per_reserve=8, pin_memory=False)
    rate = predict_rate(chosen, probe)
    assert 3.5 < rate.inference_images_per_s / rate.loader_images_per_s < 4.5
    assert predict_peak(chosen, probe, calibration, rate=rate).prefetch_queue_bytes == 2 * (8 + 1 + 2) * image
    # a batch of 1 at prefetch 2: b + 2 = 3 images, under the credit and the lent batch (3 + 1)
    chosen = plan(batch_size=1, tasks_per_reserve=1, prefetch_factor=2, pin_memory=False)
    rate = predict_rate(chosen, make_probe(cuda=True, inference_per_image_s=0.0002, inference_overhead_s=0.0))
    estimate = predict_peak(chosen, make_probe(cuda=True, inference_per_image_s=0.0002, inference_overhead_s=0.0),
                            calibration, rate=rate)
    assert estimate.prefetch_queue_bytes == 2 * (2 + 1) * image and estimate.total_bytes < estimate.bound_bytes


def test_a_main_process_somewhat_faster_than_a_cpu_bound_loader_keeps_short_queues(make_probe, large_images,
                                                                                     calibration):
    """Large images, the reference pipeline on 2 cores: the CPU bounds the job and the loader is the
    stage held back (the plan lines said loader 4.9-5.6 images/s, inference 5.7-8.9). Measured at
    the peak (benchmark run of 2026-12-02, 60 and 240 tasks): 4-5 shared images at batch 1,
    prefetch 4 (the full queues hold 10), 12 at batch 4, prefetch 1 (16 full) and 13-14 at batch 4,
    prefetch 2 (24 full), as the short-queue count has it: b + 1 + what a lane decodes while its
    batch is inferred. A main process slower than the loader still fills the queues."""
    from autotune.memory_model import short_queue
    from autotune.throughput_model import predict_rate

    probe = make_probe(**{**large_images, "decode_s_per_image": 0.24, "inference_per_image_s": 0.07,
                          "inference_overhead_s": 0.02})
    image = probe.decoded_bytes_per_image
    chosen = plan(tasks_per_reserve=4, batch_size=4, prefetch_factor=2, download_threads=2, pin_memory=False)
    rate = predict_rate(chosen, probe)
    assert rate.bottleneck == "cpu" and 1.1 < rate.inference_images_per_s / rate.loader_images_per_s < 1.6
    assert short_queue(chosen, rate)
    expected = predict_peak(chosen, probe, calibration, rate=rate)
    assert expected.prefetch_queue_bytes == 2 * (4 + 1 + 2) * image
    assert expected.bound_bytes == predict_peak(chosen, probe, calibration).total_bytes > expected.total_bytes
    # prefetch 1, the committed calibration's collate copy (0): a credit of 4 images, yet 6 per
    # worker were measured (12 in all): a worker decodes its credit while the main process holds
    # the batch it lent, so the batch counts besides the credit, as in the bound
    one_ahead = plan(tasks_per_reserve=4, batch_size=4, prefetch_factor=1, download_threads=2, pin_memory=False)
    rate = predict_rate(one_ahead, probe)
    assert short_queue(one_ahead, rate)
    uncopied = replace(calibration, collate_copy_factor=0.0)
    assert predict_peak(one_ahead, probe, uncopied, rate=rate).prefetch_queue_bytes == 2 * (4 + 1 + 2) * image
    # the loader ahead (decoding twice as fast): the queues fill, the expected peak is the bound
    quick = make_probe(**{**large_images, "decode_s_per_image": 0.12, "inference_per_image_s": 0.07,
                          "inference_overhead_s": 0.02})
    rate = predict_rate(chosen, quick)
    assert rate.loader_images_per_s > rate.inference_images_per_s
    assert not short_queue(chosen, rate)
    assert predict_peak(chosen, quick, calibration, rate=rate) == predict_peak(chosen, quick, calibration)


def test_the_head_start_adds_its_bytes_a_batch_and_an_image_per_decoder_to_the_peak(make_probe, calibration):
    probe = make_probe()
    assert probe.cpu_count <= 4  # one decoder per core, at most 4
    many = dict(head_start_images=64)
    assert predict_peak(plan(), make_probe(cpu_count=64, head_start_bytes=MiB, **many), calibration).head_start_bytes == (
        MiB + (plan().batch_size + 4) * probe.decoded_bytes_per_image)
    # two large images: at most two decoded
    assert predict_peak(plan(), make_probe(head_start_bytes=MiB, head_start_images=2), calibration).head_start_bytes == (
        MiB + 2 * probe.decoded_bytes_per_image)
    without = predict_peak(plan(), probe, calibration)
    with_head_start = predict_peak(plan(), make_probe(head_start_bytes=40 * MiB, **many), calibration)
    assert without.head_start_bytes == 0
    decoded = (plan().batch_size + probe.cpu_count) * probe.decoded_bytes_per_image
    assert with_head_start.head_start_bytes == 40 * MiB + decoded
    assert with_head_start.total_bytes - without.total_bytes == 40 * MiB + decoded
    assert with_head_start.bound_bytes - without.bound_bytes == 40 * MiB + decoded
    assert "head start" in with_head_start.table()


def test_with_short_queues_the_head_start_adds_only_what_it_holds_beyond_the_queues(make_probe, calibration):
    """A main process that outpaces the loader is done with its head start about when the lanes'
    first batches arrive: the two phases peak apart (measured: 19-21% under the sum)."""
    from autotune.throughput_model import predict_rate

    fast = dict(cuda=True, inference_per_image_s=0.0002, inference_overhead_s=0.0)
    chosen = plan(batch_size=8, tasks_per_reserve=8, pin_memory=False)
    plain = make_probe(**fast)
    rate = predict_rate(chosen, plain)
    queue = predict_peak(chosen, plain, calibration, rate=rate).prefetch_queue_bytes
    decoded = (8 + plain.cpu_count) * plain.decoded_bytes_per_image
    for held in (MiB, queue):  # within the queues' images: nothing added; beyond them: the rest
        probe = make_probe(**fast, head_start_bytes=held, head_start_images=64)
        expected = predict_peak(chosen, probe, calibration, rate=rate)
        bound = predict_peak(chosen, probe, calibration)
        assert expected.head_start_bytes == max(0, held + decoded - queue)
        assert bound.head_start_bytes == held + decoded  # every queue full: both at once
