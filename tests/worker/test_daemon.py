"""The daemon loop end to end against the real local server, in-process and as a subprocess."""
from __future__ import annotations

import gc
import logging
import os
import re
import subprocess
import sys
import time
from typing import Optional

import psutil
import pytest

from tests.conftest import TOKEN, worker_env
from worker.antenna import AntennaClient, JobRef
from worker.app import build_worker
from worker.testing.antenna_server import ImageSource

FAULTS = ("404", "corrupt", "truncated", "empty", "html", "reset", "bomb")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_burst_run_posts_a_result_for_every_task_including_each_failure_kind(
        antenna, settings_for, tiny_images, num_workers, caplog):
    images = tiny_images[:20]
    faults = {images[i * 2].image_id: kind for i, kind in enumerate(FAULTS)}
    job = antenna.add_job(images, "synthetic-moths", image_faults=faults)
    null_job = antenna.add_job(tiny_images[20:26], "null")
    antenna.set_faults("tasks", [503, 429, 503], retry_after_s=0.1)
    antenna.set_faults("result", [429, 503], retry_after_s=0.1)
    settings = settings_for(antenna, antenna_api_dataloader_num_workers=num_workers, antenna_api_batch_size=4,
                            max_image_pixels=50_000_000)
    worker = build_worker(settings, burst=True, middlewares=[])
    caplog.set_level(logging.INFO, logger="worker.daemon")
    assert worker.run() == 0
    # the job's line: counts, then what the job saw per loaded image (13 loaded, 20 tasks in 5 batches)
    assert re.search(rf"job {job}: 20 images \(13 ok, 7 failed\), [0-9.]+ images/s, 0 stranded; per image: "
                     r"download [0-9.]+ s, decode [0-9.]+ s, inference [0-9.]+ s over 5 batches", caplog.text)
    report = antenna.report(job)
    assert (report.results_ok, report.results_error, report.lost, report.complete) == (13, 7, 0, True)
    assert report.media_requests_with_auth == 0
    assert antenna.report(null_job).results_ok == 6
    errors = {item["result"]["image_id"]: item["result"]["error"]
              for post in antenna.result_posts for item in post["results"] if "error" in item["result"]}
    assert set(errors) == set(faults)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_task_row_with_a_broken_field_fails_only_its_own_image(antenna, settings_for, tiny_images,
                                                                 num_workers):
    """A row with a field null or not text is one error result, not a refused reserve: refused,
    every task of that reserve stayed held until its reservation timed out, and came back with the
    same row until its deliveries ran out. A malformed row is not fetched even where its URL works
    (a success result for no image id would not be saved, and the task would come back)."""
    images = [*tiny_images[:3], ImageSource("no-url", None), ImageSource("numeric-url", 12345),
              ImageSource(None, f"{antenna.mount(tiny_images[3].path.parent)}/{tiny_images[3].path.name}")]
    job = antenna.add_job(images, "synthetic-moths")
    settings = settings_for(antenna, antenna_api_dataloader_num_workers=num_workers, antenna_api_batch_size=8)
    assert build_worker(settings, burst=True, middlewares=[]).run() == 0
    report = antenna.report(job)
    assert (report.results_ok, report.results_error, report.lost, report.redeliveries, report.reserved) == (
        3, 3, 0, 0, 0)
    # Each row's WARNING line is checked in test_antenna_client: here the probe or a loader worker
    # may read the rows, and a worker's log handler is not the test's.
    errors = {item["result"].get("image_id"): item["result"]["error"]
              for post in antenna.result_posts for item in post["results"] if "error" in item["result"]}
    assert errors == {"no-url": "the server sent this task malformed: image_url is null",
                      "numeric-url": "the server sent this task malformed: image_url is not a string (12345)",
                      None: "the server sent this task malformed: image_id is null"}


def _children(process: psutil.Process) -> list[psutil.Process]:
    """Descendants, less multiprocessing's resource tracker and the loader's fork server (one each
    per process lifetime, by design). The loader workers the server forks do count."""
    return [c for c in process.children(recursive=True) if not _one_per_process(c, process)]


def _one_per_process(child: psutil.Process, parent: psutil.Process) -> bool:
    command = " ".join(child.cmdline())
    return "resource_tracker" in command or (
        "multiprocessing.forkserver import main" in command and child.ppid() == parent.pid)


def _tree(process: psutil.Process) -> list[psutil.Process]:
    return [process, *process.children(recursive=True)]


def _tree_fds(process: psutil.Process) -> int:
    """Open FDs across the tree, less the sockets of ``process`` itself: the local server runs in
    it, and its side of the worker's keep-alive connections comes and goes."""
    total = 0
    for member in _tree(process):
        try:
            total += member.num_fds()
        except psutil.Error:
            pass
    for fd in os.listdir(f"/proc/{process.pid}/fd"):
        try:
            total -= os.readlink(f"/proc/{process.pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return total


def _fd_kinds(process: psutil.Process) -> dict:
    import collections

    kinds = collections.Counter()
    for member in _tree(process):
        tag = "main" if member.pid == process.pid else " ".join(member.cmdline())[-30:]
        for fd in os.listdir(f"/proc/{member.pid}/fd"):
            try:
                kinds[(tag, re.sub(r"[0-9]+", "N", os.readlink(f"/proc/{member.pid}/fd/{fd}")))] += 1
            except OSError:
                pass
    return kinds


def _tree_shm(process: psutil.Process) -> set[str]:
    """/dev/shm entries of this process tree: mapped or open by a member, or named for one (pym-PID-*,
    torch_PID_*). Other processes on the machine make the directory's own count meaningless."""
    members = _tree(process)
    held = set()
    for member in members:
        try:
            held.update(m.path for m in member.memory_maps(grouped=True) if m.path.startswith("/dev/shm"))
            held.update(f.path for f in member.open_files() if f.path.startswith("/dev/shm"))
        except psutil.Error:
            pass
    tags = [(f"-{m.pid}-", f"_{m.pid}_") for m in members]
    named = {f"/dev/shm/{name}" for name in os.listdir("/dev/shm") if any(a in name or b in name for a, b in tags)}
    return held | named


def _ledgers() -> set[str]:
    import tempfile

    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("ami-ledger-")}


class _ForceAfterFirstBatch:
    """Test middleware: sets the forced-stop flag after the first batch (a second SIGTERM's effect)."""

    def __getattr__(self, name):  # every other hook: no-op
        return lambda *args, **kwargs: None

    def after_batch(self, worker, ctx, batch, results) -> None:
        worker.stop.forced = True


def _run_path(worker, antenna, images, path: str) -> None:
    """One job through ``path``: happy, forced (abandon at a forced stop) or a killed loader worker
    (LoaderFailed, then the minimal rebuild)."""
    from worker.daemon import StopState

    worker.middlewares = {"happy": [], "forced": [_ForceAfterFirstBatch()],
                          "loader_failed": [KillAfterFirstBatch("worker")]}[path]
    job = antenna.add_job(images, "synthetic-moths")
    worker.process_job(JobRef(job, "synthetic-moths"))
    worker.stop = StopState()


@pytest.mark.timeout(600)
def test_jobs_ending_every_way_leak_no_processes_shm_fds_or_ledgers_across_the_process_tree(
        antenna, settings_for, tiny_images):
    """Happy, forced (abandoned held tasks), and LoaderFailed (a killed loader worker) jobs, each
    once to warm up and then twice more: the tree's processes, FDs and /dev/shm entries and the
    ledger directories do not grow."""
    settings = settings_for(antenna, antenna_api_dataloader_num_workers=2, antenna_api_batch_size=3)
    worker = build_worker(settings, burst=True, middlewares=[])
    me = psutil.Process()
    paths = ("happy", "forced", "loader_failed")
    for path in paths:  # warm-up: sessions, model, imports, the fork server
        _run_path(worker, antenna, tiny_images[:12], path)
    gc.collect()  # as each loader's close does: cycles inside the DataLoader delay freeing its queues
    before = (len(_children(me)), _tree_fds(me), _tree_shm(me), _ledgers())
    kinds_before = _fd_kinds(me)
    for _ in range(2):
        for path in paths:
            _run_path(worker, antenna, tiny_images[:12], path)
    gc.collect()
    after = (len(_children(me)), _tree_fds(me), _tree_shm(me), _ledgers())
    assert after[0] == before[0] == 0, "loader workers left running"
    kinds_after = _fd_kinds(me)
    grown = {k: (kinds_before.get(k, 0), v) for k, v in kinds_after.items() if v > kinds_before.get(k, 0)}
    assert after[1] <= before[1], f"tree fds {before[1]} -> {after[1]}: {grown}"
    # multiprocessing's shared heap arena (pym-*) is created once per process and reused.
    assert after[2] <= before[2] and not [p for p in after[2] if "/sem." in p], (before[2], after[2])
    assert after[3] <= before[3], "reservation ledgers left behind"


@pytest.mark.timeout(240)
def test_worker_subprocess_logs_never_contain_the_token(antenna, tiny_images, tmp_path):
    antenna.add_job(tiny_images[:6], "synthetic-moths", image_faults={tiny_images[0].image_id: "404"})
    antenna.set_faults("tasks", [503])
    env = worker_env(antenna, tmp_path, AMI_LOG_LEVEL="DEBUG", AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="1",
                     AMI_AUTOTUNE="false")
    done = subprocess.run([sys.executable, "-m", "worker.cli", "--env-file", os.devnull, "run", "--burst"],
                          env=env, capture_output=True, text=True, timeout=200, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "job 1: 6 images (5 ok, 1 failed)" in output
    assert TOKEN not in output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variable,value", [
    ("AMI_ANTENNA_API_BATCH_SIZE", "0"),
    ("AMI_ANTENNA_API_BASE_URL", "ftp://example.org/api"),
    ("AMI_ANTENNA_API_DATALOADER_PREFETCH_FACTOR", "-1"),
    ("AMI_WATCHDOG_SOFT_CAP_FRACTION", "lots"),
    ("AMI_GPU_MEMORY_FRACTION", "0"),
    ("AMI_GPU_MEMORY_FRACTION", "1.5"),
])
def test_a_bad_setting_is_one_line_naming_the_variable_and_exit_2(tmp_path, variable, value):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMI_")}
    env.update({"AMI_ANTENNA_API_AUTH_TOKEN": TOKEN, variable: value})
    done = subprocess.run([sys.executable, "-m", "worker.cli", "run", "--burst"], env=env,
                          capture_output=True, text=True, timeout=50, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"worker: {variable}=") and "fix" in lines[0]


@pytest.mark.timeout(60)
def test_settings_come_from_a_dotenv_file(tmp_path):
    (tmp_path / ".env").write_text("AMI_ANTENNA_API_BATCH_SIZE=0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMI_")}
    done = subprocess.run([sys.executable, "-m", "worker.cli", "run"], env=env, capture_output=True,
                          text=True, timeout=50, cwd=tmp_path)
    assert done.returncode == 2 and "AMI_ANTENNA_API_BATCH_SIZE=0" in done.stderr


@pytest.mark.timeout(240)
def test_results_spooled_while_the_api_is_down_are_replayed_first_at_the_next_start(
        antenna, settings_for, tiny_images):
    job = antenna.add_job(tiny_images[:6], "synthetic-moths")
    # Every result POST of the first run fails, the spool replay thread's retries included.
    antenna.set_faults("result", [503] * 100)
    settings = settings_for(antenna, antenna_api_dataloader_num_workers=0, antenna_api_batch_size=3,
                            antenna_api_max_attempts=2)
    first = build_worker(settings, burst=True, middlewares=[])
    assert first.run() == 0
    assert first.poster.counters.spooled_items == 6
    report = antenna.report(job)
    assert report.results_ok == 0 and report.reserved == 6 and not report.complete
    antenna.set_faults("result", [])
    second = build_worker(settings, burst=True, middlewares=[])
    assert second.run() == 0
    assert second.poster.counters.replayed_items == 6
    report = antenna.report(job)
    assert report.results_ok == 6 and report.complete and report.redeliveries == 0 and report.lost == 0


@pytest.mark.timeout(120)
def test_register_sends_every_offered_pipeline(antenna, tmp_path):
    env = worker_env(antenna, tmp_path)
    done = subprocess.run([sys.executable, "-m", "worker.cli", "--env-file", os.devnull, "register"], env=env,
                          capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "registered 2 pipelines with project 1" in done.stdout
    slugs = [p["slug"] for p in antenna.registered[0]["pipelines"]]
    assert slugs == ["synthetic-moths", "null"]
    assert TOKEN not in done.stdout + done.stderr


def _fork_server_of(process: psutil.Process) -> Optional[psutil.Process]:
    """The loader's fork server: a direct child of ``process`` (its forks share its command line)."""
    servers = [c for c in process.children() if "multiprocessing.forkserver import main" in " ".join(c.cmdline())]
    return servers[0] if servers else None


class KillAfterFirstBatch:
    """Test middleware: after the first batch, SIGKILLs one real loader worker (``target='worker'``:
    a child of the fork server, which ``children()`` of this process does not list) or the fork
    server itself (``target='server'``), once."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.killed: Optional[psutil.Process] = None
        self.loader_pids: set[int] = set()
        self.server_children: list[psutil.Process] = []

    def __getattr__(self, name):  # every other hook: no-op
        return lambda *args, **kwargs: None

    def after_batch(self, worker, ctx, batch, results) -> None:
        if self.killed is not None:
            return
        server = _fork_server_of(psutil.Process())
        assert server is not None
        self.loader_pids = {int(pid) for pid in ctx.loader.control.pids if pid}
        self.server_children = server.children()
        self.killed = server if self.target == "server" else self.server_children[0]
        self.killed.kill()


@pytest.mark.timeout(240)
def test_a_killed_loader_worker_costs_only_a_redelivery_of_what_the_loader_held(
        antenna_factory, settings_for, tiny_images, caplog):
    server = antenna_factory(reservation_timeout_s=8.0)
    job = server.add_job(tiny_images[:24], "synthetic-moths")
    settings = settings_for(server, antenna_api_dataloader_num_workers=2, antenna_api_batch_size=2)
    killer = KillAfterFirstBatch("worker")
    caplog.set_level(logging.INFO, logger="worker.daemon")
    first = build_worker(settings, burst=True, middlewares=[killer])
    done = first.process_job(JobRef(job, "synthetic-moths"))
    assert killer.killed is not None
    assert killer.killed.pid in killer.loader_pids  # a loader worker, not the fork server
    assert "loader failed" in caplog.text
    stranded = int(re.search(rf"job {job}: {done} images .*, (\d+) stranded", caplog.text).group(1))
    report = server.report(job)
    assert report.lost == 0 and report.results_ok == done
    # exact: every delivery without a result was counted as stranded (none expires within 8 s)
    assert 0 < stranded == report.reserved == report.delivered - done
    time.sleep(8.5)  # the dead worker's reservations expire and are redelivered
    second = build_worker(settings, burst=True, middlewares=[])
    assert second.run() == 0
    report = server.report(job)
    assert report.results_ok == 24 and report.complete and report.lost == 0
    # A dead worker breaks the DataLoader, so what both workers held is redelivered: at most
    # workers x (prefetch x batch + tasks per reserve) = 2 x (4 x 2 + 2), never more.
    assert 0 < report.redeliveries <= 2 * (4 * 2 + 2)


@pytest.mark.timeout(240)
def test_a_killed_fork_server_fails_that_loader_only_and_the_next_job_gets_a_new_server(
        antenna_factory, settings_for, tiny_images, caplog):
    server = antenna_factory(reservation_timeout_s=3.0)
    first_job = server.add_job(tiny_images[:16], "synthetic-moths")
    settings = settings_for(server, antenna_api_dataloader_num_workers=2, antenna_api_batch_size=2)
    killer = KillAfterFirstBatch("server")
    caplog.set_level(logging.INFO, logger="worker.daemon")
    worker = build_worker(settings, burst=True, middlewares=[killer])
    assert worker.process_job(JobRef(first_job, "synthetic-moths")) > 0
    assert killer.killed is not None and "loader failed" in caplog.text
    # the dead server's loader workers do not outlive it for long
    _gone, alive = psutil.wait_procs(killer.server_children, timeout=15)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
    second_job = server.add_job(tiny_images[16:24], "synthetic-moths")
    assert worker.process_job(JobRef(second_job, "synthetic-moths")) == 8
    new_server = _fork_server_of(psutil.Process())
    assert new_server is not None and new_server.pid != killer.killed.pid
    assert server.report(second_job).complete
    time.sleep(3.5)  # what the first job's loader held expires and is redelivered
    assert build_worker(settings, burst=True, middlewares=[]).run() == 0
    report = server.report(first_job)
    assert report.complete and report.lost == 0 and report.duplicates == 0


class FdLimitUntilTheMinimalLoader:
    """Test middleware: from job start until the minimal rebuild's loader starts (or the job
    ends) the process may open no more file descriptors (RLIMIT_NOFILE = those open at job
    start): the real EMFILE of a busy host, for the loader the plan asked for."""

    def __init__(self) -> None:
        self.saved = None

    def __getattr__(self, name):  # every other hook: no-op
        return lambda *args, **kwargs: None

    def on_job_start(self, worker, ctx) -> None:
        import resource

        self.saved = resource.getrlimit(resource.RLIMIT_NOFILE)
        open_now = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself had open
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_now, self.saved[1]))

    def on_loader_start(self, worker, ctx) -> None:
        if ctx.plan.source == "minimal":
            self.on_job_end(worker, ctx)

    def on_job_end(self, worker, ctx) -> None:
        import resource

        if self.saved is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, self.saved)
            self.saved = None


@pytest.mark.timeout(120)
# torch's __del__ on the iterator whose __init__ failed (EMFILE) reports a missing attribute
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_running_out_of_file_descriptors_while_a_loader_starts_fails_the_loader_not_the_daemon(
        antenna, settings_for, tiny_images, caplog):
    job = antenna.add_job(tiny_images[:4], "synthetic-moths")
    settings = settings_for(antenna, antenna_api_dataloader_num_workers=2, antenna_api_batch_size=2)
    limit = FdLimitUntilTheMinimalLoader()
    worker = build_worker(settings, burst=True, middlewares=[limit])
    caplog.set_level(logging.INFO, logger="worker.daemon")
    try:
        assert worker.run() == 0
    finally:
        limit.on_job_end(worker, None)
    # The loader failed to set up or start its workers (which of the two depends on what this
    # process had already imported and allocated); the daemon went on with a minimal rebuild.
    failures = re.findall(rf"job {job}: loader failed: cannot (?:set the loader up|start the loader): "
                          r"OSError: \[Errno 24\]", caplog.text)
    assert failures, caplog.text[-3000:]
    if not antenna.report(job).complete:  # the minimal loader could not be set up either
        assert antenna.report(job).delivered == 0  # so nothing was reserved
        assert build_worker(settings, burst=True, middlewares=[]).run() == 0
    report = antenna.report(job)
    assert report.complete and report.results_ok == 4 and report.lost == 0 and report.duplicates == 0


@pytest.mark.timeout(120)
def test_burst_follows_the_listings_next_link_past_jobs_that_answer_nothing_now(antenna, settings_for, tiny_images):
    """A server caps a listing page (Django REST framework's ``max_limit``) below what a burst asks
    for. The first page's jobs answer [] (another worker holds their tasks): the job behind the
    page's ``next`` link still gets done, not skipped by a burst that saw no work on page one."""
    held = [antenna.add_job(tiny_images[i * 2:i * 2 + 2], "null") for i in range(3)]
    waiting = antenna.add_job(tiny_images[6:10], "null")
    other = AntennaClient(antenna.base_url, TOKEN, max_attempts=1)
    for job in held:
        assert len(other.reserve_tasks(job, 10)) == 2  # another worker's, unanswered for now
    antenna.set_job_page_cap(2)
    settings = settings_for(antenna, antenna_api_dataloader_num_workers=0, antenna_api_batch_size=4)
    assert build_worker(settings, burst=True, middlewares=[]).run() == 0
    report = antenna.report(waiting)
    assert (report.results_ok, report.complete) == (4, True)
    assert all(antenna.report(job).results_ok == 0 for job in held)
