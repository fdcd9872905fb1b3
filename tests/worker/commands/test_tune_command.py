"""``worker tune`` as operators run it: a real subprocess against the real local server."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TOKEN, worker_env

PIPELINE = "synthetic-moths"
ENV_NAMES = ("AMI_ANTENNA_API_BATCH_SIZE", "AMI_ANTENNA_API_DATALOADER_NUM_WORKERS",
             "AMI_ANTENNA_API_DATALOADER_PREFETCH_FACTOR", "AMI_ANTENNA_API_DATALOADER_PIN_MEMORY",
             "AMI_ANTENNA_API_DATALOADER_DOWNLOAD_THREADS", "OMP_NUM_THREADS")


def tune(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", "--env-file", "/dev/null", "tune", *args],
                          env=env, capture_output=True, text=True, timeout=150, cwd=cwd)


@pytest.mark.timeout(180)
def test_tune_images_prints_tables_and_env_lines_and_writes_them(antenna, tiny_images, tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    for image in tiny_images[:4]:
        shutil.copy(image.path, folder / image.path.name)
    env_file = tmp_path / "tuned.env"
    env = worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES=PIPELINE)
    done = tune(env, tmp_path, "--images", str(folder), "--write-env", str(env_file))

    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "probe of 4 images" in out and "640x480" in out
    assert "recommended MiB" in out and "current MiB" in out  # the side-by-side memory table
    assert "batches assembling/queued" in out and "total (corrected)" in out
    assert len(re.findall(r"images/s, [a-z-]+-bound \(bottleneck", out)) >= 2  # recommended and current rates
    # the bounds, each stage alone, and which one limits the recommended plan
    assert "Bounds (each stage alone; no plan beats the lowest)" in out
    assert re.search(r"decode +[0-9.]+ images/s +\(\d+ cores x", out)
    assert re.search(r"link +[0-9.]+ images/s +\(\d+ connections / ", out)
    assert re.search(r"the recommended plan is [a-z-]+-bound: [0-9.]+ images/s predicted", out)
    assert "Current settings" in out
    written = env_file.read_text().splitlines()
    assert [line.split("=")[0] for line in written] == list(ENV_NAMES)
    for line in written:
        assert line in out
    assert "No task was reserved" in out
    assert antenna.reservations == []  # sample images: nothing reserved
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.timeout(180)
def test_tune_job_strands_nothing_and_says_so(antenna, tiny_images, tmp_path):
    job_id = antenna.add_job(tiny_images[:10], PIPELINE)
    env = worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES=PIPELINE, AMI_AUTOTUNE_PROBE_TASKS="3",
                     AMI_LOG_LEVEL="DEBUG")
    done = tune(env, tmp_path, "--job", str(job_id))

    assert done.returncode == 0, done.stderr[-2000:]
    report = antenna.report(job_id)
    assert (report.results_ok, report.results_error, report.reserved, report.lost) == (3, 0, 0, 0)
    assert report.pending == 7  # the rest is left for real workers
    assert f"job {job_id}" in done.stdout
    assert "3 tasks were reserved for the probe; 3 results were posted" in done.stdout
    assert "no task stranded" in done.stdout
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.timeout(180)
def test_tune_flags_current_settings_over_the_budget(antenna, large_images, tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    shutil.copy(large_images[0].path, folder / large_images[0].path.name)
    # 2 GiB of memory: ADC-sized batches of 36 MiB images (24 x (1 + 4 workers x prefetch 4)) cannot fit.
    # and one knob pinned: the plan `worker run` would use is the planner's choice around that pin
    env = worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES=PIPELINE, AMI_MAX_MEMORY_BYTES=str(2 * 1024**3),
                     AMI_MEMORY_RESERVE_BYTES=str(256 * 1024**2), AMI_ANTENNA_API_DATALOADER_DOWNLOAD_THREADS="3")
    done = tune(env, tmp_path, "--images", str(folder))

    assert done.returncode == 0, done.stderr[-2000:]
    assert "Current settings EXCEED the budget by" in done.stdout
    assert "batches assembling/queued" in done.stdout.split("EXCEED", 1)[1]
    assert "AMI_ANTENNA_API_DATALOADER_PREFETCH_FACTOR" in done.stdout.split("EXCEED", 1)[1]
    at_run = re.search(r"^with your pins (tasks_per_reserve=.*)\n +[0-9.]+ images/s.*; predicted peak ([0-9,]+) MiB$",
                       done.stdout, re.MULTILINE)
    assert at_run, done.stdout
    assert "download_threads=3 " in at_run.group(1) and "source=autotune" in at_run.group(1)
    assert int(at_run.group(2).replace(",", "")) <= (2048 - 256) * 0.85  # the budget the current settings exceed


@pytest.mark.timeout(180)
def test_tune_job_with_the_results_api_down_reports_and_spools_instead_of_crashing(antenna, tiny_images, tmp_path):
    """Failed before: the flush deadline raised TimeoutError out of `worker tune` (exit 1, a traceback)."""
    from worker.posting import Spool

    job_id = antenna.add_job(tiny_images[:6], PIPELINE)
    antenna.set_faults("result", [503] * 100)
    env = worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES=PIPELINE, AMI_AUTOTUNE_PROBE_TASKS="3",
                     AMI_SHUTDOWN_GRACE_S="0.5", AMI_ANTENNA_API_MAX_ATTEMPTS="10")
    done = tune(env, tmp_path, "--job", str(job_id))

    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "result posts still pending" in done.stderr
    spooled = [Spool.read(path) for path in Spool(tmp_path / "user-data" / "spool").files()]
    assert sum(len(items) for _, items in spooled) == 3 and antenna.report(job_id).results_ok == 0


def _one_line_exit_2(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("worker")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    return errors[0]


@pytest.mark.timeout(180)
def test_tune_refuses_a_job_of_a_pipeline_this_worker_does_not_offer(antenna, tiny_images, tmp_path):
    """Before: 3 tasks reserved and their results posted under the first offered pipeline (a real
    server's save of those fails, and each task lost one of its two deliveries)."""
    other = antenna.add_job(tiny_images[:6], "synthetic-moths")
    antenna.set_job_page_cap(1)  # and behind a page of another job: the listing's pages are followed
    antenna.add_job(tiny_images[6:8], "null")
    env = worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES="null")
    line = _one_line_exit_2(tune(env, tmp_path, "--job", str(other)))
    assert f"--job {other} is a job of pipeline 'synthetic-moths'" in line and "AMI_ANTENNA_PIPELINES" in line
    assert antenna.reservations == [] and antenna.result_posts == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("args", [
    ("--probe-tasks", "-5"), ("--probe-tasks", "0"), ("--probe-tasks", "33"),  # before: exit 3, the default, the job
    ("--write-env", "/proc/no-such/tuned.env"),  # before: a traceback after the probe had reserved and posted
])
def test_tune_bad_options_are_one_line_exit_2_before_anything_is_reserved(antenna, tiny_images, tmp_path, args):
    antenna.add_job(tiny_images[:6], PIPELINE)
    env = worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES=PIPELINE)
    line = _one_line_exit_2(tune(env, tmp_path, *args))
    assert args[0] in line
    assert antenna.reservations == [] and antenna.result_posts == []


@pytest.mark.timeout(180)
def test_tune_images_with_an_unknown_pipeline_is_one_line_exit_2(tiny_images, antenna, tmp_path):
    env = worker_env(antenna, tmp_path, AMI_ANTENNA_PIPELINES=PIPELINE)
    line = _one_line_exit_2(tune(env, tmp_path, "--images", str(tiny_images[0].path), "--pipeline", "nosuch"))
    assert "--pipeline" in line and "'nosuch'" in line
