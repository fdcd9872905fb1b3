"""The soak benchmark: one long-lived ``worker run`` daemon through 2,000 batches, watched from outside.

    python benchmarks/soak.py            # 2,000 batches (80 jobs x 25); writes benchmarks/soak-results.json
    python benchmarks/soak.py --quick    # 100 batches (4 jobs x 25): a trial of the same code paths

The local Antenna server runs in this process. Jobs are added one at a time: each job builds a
loader (loader workers forked from the fork server) and tears it down at its end, so a resource
that one job's loader leaves behind adds up over the run. The plan is forced
(``AMI_BENCHMARK_PLAN_JSON``: batch = tasks per reserve = ``--batch``, ``--loader-workers``
loader workers, prefetch 2, one inference thread), so every job has exactly
``--batches-per-job`` batches. The images are 640x480 JPEGs (``tiny``); the pipeline is the
reference one (``synthetic-moths``). The poster's pool is one thread (``--max-pending-posts``): a
pool starts threads on demand up to its size, which would read as thread growth.

After every job, once the server holds a result for each of its tasks and the worker's process
tree is back to its idle size (no loader worker left), this process takes an idle sample:

- tree memory: ``benchmarks.meter.read_tree_memory`` (PSS outside /dev/shm + each /dev/shm segment
  the tree holds or maps, once), and the tree's anonymous PSS (smaps_rollup ``Pss_Anon``) + those
  segments. The check uses the second: the meter's total includes the PSS of library file pages
  (libtorch), which is shared with every other process that maps them and moved -122 to +74 MiB
  between idle samples while other torch processes started and stopped on the shared machine,
  where anonymous PSS moved under 1 MiB;
- the tree's memory mappings (lines of /proc/PID/maps): a file or segment mapped per job;
- open descriptors of the main process and of the whole tree;
- /dev/shm entries: as root, the worker runs in its own mount namespace with a fresh tmpfs on
  /dev/shm (``ShmView``), so every entry there is the tree's; else the host's /dev/shm, less the
  entries there before the worker started, those only processes outside the tree hold (a test
  suite's forkserver semaphores) and those gone 0.5 s later (an entry nobody holds counts);
- threads of the main process and of the tree; processes in the tree.

Growth is the last idle sample minus the idle sample after the warm-up (the first
``--warmup-jobs`` jobs, default 8): like for like, no loader running. The thresholds (issue 14):
tree memory < 50 MiB; descriptors, /dev/shm entries, threads (main process and tree) and
processes 0. A meter thread also samples tree memory every ``--interval`` s during the jobs (the
in-flight peak). The server's ledger must show every task
of every job with an accepted result, none lost, none posted twice. Exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autotune.plan import LoaderPlan  # noqa: E402
from benchmarks.meter import TreeMeterThread, read_tree_memory  # noqa: E402
from benchmarks.run import Config, plan_env, worker_env  # noqa: E402
from watchdog import procfs  # noqa: E402
from watchdog.proctree import tree_pids  # noqa: E402
from worker.testing.antenna_server import JobReport, LocalAntenna  # noqa: E402

MiB = 1024 * 1024
SHM_DIR = Path("/dev/shm")
RESULTS = ROOT / "benchmarks" / "soak-results.json"
MEMORY_GROWTH_LIMIT_BYTES = 50 * MiB
START_TIMEOUT_S = 300.0
JOB_TIMEOUT_S = 600.0
SETTLE_TIMEOUT_S = 30.0
# The tree must keep its idle size this long before an idle sample (a loader worker that is still
# exiting, or the daemon's next empty listing, would otherwise land in the sample).
SETTLE_STABLE_S = 1.0
SHM_RECHECK_S = 0.5


@dataclass(frozen=True)
class TreeSample:
    """One look at the worker's process tree from outside."""

    after_job: int  # jobs finished when taken (0: idle before the first job)
    batches_done: int
    elapsed_s: float
    memory_bytes: int  # benchmarks.meter total: non-shm PSS + /dev/shm segments once
    pss_bytes: int
    shm_held_bytes: int
    main_fds: int
    tree_fds: int
    shm_entries_new: int  # /dev/shm names not there before the worker started, less those other programs hold
    shm_entries_foreign: int  # new names held (mapped or open) only by processes outside the tree
    shm_names_seen: list[str]  # every new name the first listing saw (transient ones included)
    main_threads: int
    tree_threads: int
    processes: int
    anon_pss_bytes: int  # the tree's Pss_Anon: no file pages, whose PSS moves as other programs map the same libraries
    anon_shm_bytes: int  # anon_pss_bytes + shm_held_bytes: what a leak in the tree grows; the memory check's figure
    tree_mappings: int  # lines of /proc/PID/maps over the tree (a file or segment mapped per job and never unmapped)
    process_pss_bytes: dict[str, int]  # "pid name" -> PSS (smaps_rollup), to say which process moved


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    limit: str
    passed: bool


def read_threads(pid: int) -> int:
    data = procfs.read_bytes(f"/proc/{pid}/status") or b""
    for line in data.splitlines():
        if line.startswith(b"Threads:"):
            return int(line.split()[1])
    return 0


def shm_entries(directory: Path = SHM_DIR) -> set[str]:
    try:
        return set(os.listdir(directory))
    except OSError:
        return set()


@dataclass(frozen=True)
class ShmView:
    """Where the soak counts /dev/shm entries. ``private``: the worker runs in its own mount
    namespace with a fresh tmpfs on /dev/shm (``unshare``, root), read from outside through
    /proc/PID/root/dev/shm, so every entry there is the tree's. Else the host's /dev/shm, less the
    entries present before the worker started and those only other processes hold."""

    private: bool
    baseline: frozenset[str]

    def directory(self, pid: int) -> Path:
        return Path(f"/proc/{pid}/root/dev/shm") if self.private else SHM_DIR

    def new_entries(self, pid: int) -> set[str]:
        return shm_entries(self.directory(pid)) - self.baseline

    def command(self, command: list[str]) -> list[str]:
        if not self.private:
            return command
        mount = 'mount -t tmpfs -o mode=1777 soak-shm /dev/shm && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh", *command]

    @staticmethod
    def choose(mode: str) -> "ShmView":
        """``mode``: private, host or auto (private where root and ``unshare`` allow it)."""
        if mode == "auto":
            mode = "private" if _can_unshare() else "host"
        if mode == "private":
            return ShmView(True, frozenset())
        return ShmView(False, frozenset(shm_entries()))


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(ShmView(True, frozenset()).command(["true"]), capture_output=True, timeout=30)
    return probe.returncode == 0


def foreign_shm_entries(names: set[str], tree: set[int]) -> set[str]:
    """The names among ``names`` that some process outside ``tree`` maps or holds open and no tree
    process does: another program's segments or semaphores (a test suite running beside the soak).
    A name nobody holds counts as the tree's: a leaked entry outlives its creator."""
    if not names:
        return set()
    held: dict[str, set[bool]] = {}
    for pid in procfs_pids():
        inside = pid in tree
        for name in _held_shm_names(pid):
            if name in names:
                held.setdefault(name, set()).add(inside)
    return {name for name, sides in held.items() if sides == {False}}


def procfs_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _held_shm_names(pid: int) -> set[str]:
    prefix = str(SHM_DIR) + "/"
    names = set()
    for line in (procfs.read_bytes(f"/proc/{pid}/maps") or b"").decode(errors="replace").splitlines():
        at = line.find(prefix)
        if at >= 0:
            names.add(line[at + len(prefix):].split(" ", 1)[0])
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return names
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            names.add(target[len(prefix):].split(" ", 1)[0])
    return names


def take_sample(pid: int, after_job: int, batches_done: int, started_s: float, shm: ShmView) -> TreeSample:
    memory = read_tree_memory(pid)
    pids = tree_pids(pid)
    fds = {p: procfs.read_fds(p) for p in pids}
    main = fds.get(pid)
    rollups = {p: read_rollup(p) for p in pids}
    anon = sum(rollup[1] for rollup in rollups.values())
    new_shm = shm.new_entries(pid)
    seen = sorted(new_shm)
    foreign = set() if shm.private else foreign_shm_entries(new_shm, set(pids))
    if new_shm and not shm.private:
        # An entry counts only when it outlives the holder scan: other programs create and unlink
        # entries (a semaphore, a segment) within milliseconds, and an idle tree creates none.
        time.sleep(SHM_RECHECK_S)
        new_shm &= shm.new_entries(pid)
    return TreeSample(
        after_job=after_job, batches_done=batches_done, elapsed_s=round(time.monotonic() - started_s, 1),
        memory_bytes=memory.total_bytes, pss_bytes=memory.pss_bytes, shm_held_bytes=memory.shm_bytes,
        main_fds=main.open_fds if main else 0,
        tree_fds=sum(reading.open_fds for reading in fds.values() if reading is not None),
        shm_entries_new=len(new_shm - foreign), shm_entries_foreign=len(new_shm & foreign),
        shm_names_seen=seen,
        main_threads=read_threads(pid), tree_threads=sum(read_threads(p) for p in pids), processes=len(pids),
        anon_pss_bytes=anon, anon_shm_bytes=anon + memory.shm_bytes,
        tree_mappings=sum(_count_lines(f"/proc/{p}/maps") for p in pids),
        process_pss_bytes={f"{p} {_name(p)}": rollup[0] for p, rollup in rollups.items()},
    )


def _count_lines(path: str) -> int:
    return (procfs.read_bytes(path) or b"").count(b"\n")


def read_rollup(pid: int) -> tuple[int, int]:
    """(Pss, Pss_Anon) from /proc/PID/smaps_rollup in bytes; zeros when the process is gone."""
    values = {b"Pss:": 0, b"Pss_Anon:": 0}
    for line in (procfs.read_bytes(f"/proc/{pid}/smaps_rollup") or b"").splitlines():
        fields = line.split()
        if fields and fields[0] in values:
            values[fields[0]] = int(fields[1]) * 1024
    return values[b"Pss:"], values[b"Pss_Anon:"]


def _name(pid: int) -> str:
    return (procfs.read_bytes(f"/proc/{pid}/comm") or b"?").decode(errors="replace").strip()


class SoakAntenna(LocalAntenna):
    """The local server, noting when the worker first lists jobs (its pipeline is loaded)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.listed_at_s: Optional[float] = None

    def api_list_jobs(self, query: Any) -> dict[str, Any]:
        if self.listed_at_s is None:
            self.listed_at_s = time.monotonic()
        return super().api_list_jobs(query)


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class SoakParams:
    jobs: int
    batches_per_job: int
    batch: int
    loader_workers: int
    warmup_jobs: int
    pipeline: str
    interval_s: float
    max_pending_posts: int

    @property
    def tasks_per_job(self) -> int:
        return self.batches_per_job * self.batch

    @property
    def batches(self) -> int:
        return self.jobs * self.batches_per_job


def soak_env(base_url: str, token: str, scratch: Path, params: SoakParams) -> dict[str, str]:
    plan = LoaderPlan(params.batch, params.batch, params.loader_workers, 2, False, 4, "uint8", "benchmark", 1)
    env = worker_env(base_url, token, scratch, Config("soak", "soak", plan_env(plan), params.pipeline))
    env["AMI_ANTENNA_PIPELINES"] = params.pipeline
    env["AMI_ANTENNA_MAX_PENDING_POSTS"] = str(params.max_pending_posts)
    return env


def run_soak(params: SoakParams, images: list, log_path: Path, shm: ShmView) -> dict[str, Any]:
    token = secrets.token_hex(12)
    with SoakAntenna(token=token) as server, tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        env = soak_env(server.base_url, token, Path(scratch), params)
        command = shm.command([sys.executable, "-m", "worker.cli", "--env-file", os.devnull, "run"])
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            meter: Optional[TreeMeterThread] = None
            try:
                started_s = time.monotonic()
                _wait_ready(server, process)
                idle_processes = len(tree_pids(process.pid))
                samples = [take_sample(process.pid, 0, 0, started_s, shm)]
                print(_sample_line(samples[0]), flush=True)
                meter = TreeMeterThread(process.pid, interval_s=params.interval_s).start()
                reports: list[JobReport] = []
                for index in range(1, params.jobs + 1):
                    reports.append(_run_job(server, process, images, params, index))
                    settled = _settle(process, idle_processes)
                    sample = take_sample(process.pid, index, index * params.batches_per_job, started_s, shm)
                    samples.append(sample)
                    print(_sample_line(sample) + ("" if settled else "  (tree did not return to idle size)"), flush=True)
                wall_s = time.monotonic() - started_s
            finally:
                if meter is not None:
                    meter.stop()
                process.terminate()
                try:
                    exit_code = process.wait(120)
                except subprocess.TimeoutExpired:
                    process.kill()
                    exit_code = process.wait()
        # A private /dev/shm goes with its namespace: only the host's can be read after the exit.
        new_shm = set() if shm.private else shm.new_entries(0)
        leftover = sorted(new_shm - foreign_shm_entries(new_shm, set()))
    return {"samples": samples, "reports": reports, "exit_code": exit_code, "wall_s": wall_s,
            "idle_processes": idle_processes, "peak_in_flight_bytes": meter.peak_total_bytes if meter else 0,
            "shm_entries_left_after_exit": leftover}


def _wait_ready(server: SoakAntenna, process: subprocess.Popen) -> None:
    deadline_s = time.monotonic() + START_TIMEOUT_S
    while server.listed_at_s is None:
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited with {process.returncode} before listing jobs")
        if time.monotonic() > deadline_s:
            raise RuntimeError(f"the worker did not list jobs within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.2)
    time.sleep(2.0)  # a few empty listings: the idle loop, as between jobs


def _run_job(server: SoakAntenna, process: subprocess.Popen, images: list, params: SoakParams, index: int) -> JobReport:
    # Images rotate through the set so every job serves different files (same sizes).
    offset = (index * params.tasks_per_job) % len(images)
    chosen = [images[(offset + i) % len(images)] for i in range(params.tasks_per_job)]
    job_id = server.add_job([_renamed(image, index, i) for i, image in enumerate(chosen)], params.pipeline)
    deadline_s = time.monotonic() + JOB_TIMEOUT_S
    while True:
        report = server.report(job_id)
        if report.complete:
            return report
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited with {process.returncode} during job {index}")
        if time.monotonic() > deadline_s:
            raise RuntimeError(f"job {index} incomplete after {JOB_TIMEOUT_S:.0f} s: {report.as_dict()}")
        time.sleep(0.1)


def _renamed(image: Any, job_index: int, position: int) -> Any:
    return replace(image, image_id=str(job_index * 1_000_000 + position + 1))


def _settle(process: subprocess.Popen, idle_processes: int) -> bool:
    """Wait until the tree has its idle size (no loader worker) for ``SETTLE_STABLE_S``."""
    deadline_s = time.monotonic() + SETTLE_TIMEOUT_S
    stable_since_s: Optional[float] = None
    while time.monotonic() < deadline_s:
        if len(tree_pids(process.pid)) <= idle_processes:
            stable_since_s = stable_since_s or time.monotonic()
            if time.monotonic() - stable_since_s >= SETTLE_STABLE_S:
                return True
        else:
            stable_since_s = None
        time.sleep(0.1)
    return False


def _sample_line(sample: TreeSample) -> str:
    return (f"  after job {sample.after_job:3d} ({sample.batches_done:5d} batches, {sample.elapsed_s:7.1f} s): "
            f"tree {sample.memory_bytes / MiB:7.1f} MiB (anon {sample.anon_pss_bytes / MiB:6.1f}), fds {sample.main_fds}/{sample.tree_fds}, "
            f"new /dev/shm {sample.shm_entries_new} (+{sample.shm_entries_foreign} others'), threads {sample.main_threads}/{sample.tree_threads}, "
            f"processes {sample.processes}")


# ---------------------------------------------------------------- checks and output


def growth(samples: list[TreeSample], warmup_jobs: int) -> dict[str, dict[str, int]]:
    """Per figure: the warm-up sample, the last one, last - warm-up, and max - warm-up over the idle samples after warm-up."""
    after = [s for s in samples if s.after_job >= warmup_jobs]
    out = {}
    for name in ("memory_bytes", "anon_shm_bytes", "anon_pss_bytes", "tree_mappings", "main_fds", "tree_fds", "shm_entries_new", "main_threads", "tree_threads", "processes"):
        values = [getattr(s, name) for s in after]
        out[name] = {"warmup": values[0], "last": values[-1], "growth": values[-1] - values[0],
                     "max_growth": max(values) - values[0]}
    return out


def checks(result: dict[str, Any], grown: dict[str, dict[str, int]], params: SoakParams) -> list[Check]:
    reports: list[JobReport] = result["reports"]
    tasks = sum(r.tasks for r in reports)
    accepted = sum(r.results_ok + r.results_error for r in reports)
    unresolved = sum(r.pending + r.reserved + r.awaiting_redelivery + r.lost for r in reports)
    duplicates = sum(r.duplicates for r in reports)
    return [
        Check("jobs completed", len(reports), f"= {params.jobs}", len(reports) == params.jobs),
        Check("results accepted", accepted, f"= {tasks} tasks", accepted == tasks == params.jobs * params.tasks_per_job),
        Check("tasks unresolved or lost", unresolved, "= 0", unresolved == 0),
        Check("results posted twice", duplicates, "= 0", duplicates == 0),
        Check("tree memory growth, anonymous + /dev/shm (MiB)", round(grown["anon_shm_bytes"]["growth"] / MiB, 1),
              f"< {MEMORY_GROWTH_LIMIT_BYTES // MiB}", grown["anon_shm_bytes"]["growth"] < MEMORY_GROWTH_LIMIT_BYTES),
        Check("main process FD growth", grown["main_fds"]["growth"], "= 0", grown["main_fds"]["growth"] == 0),
        Check("tree FD growth", grown["tree_fds"]["growth"], "= 0", grown["tree_fds"]["growth"] == 0),
        Check("/dev/shm entry growth", grown["shm_entries_new"]["growth"], "= 0", grown["shm_entries_new"]["growth"] == 0),
        Check("main process thread growth", grown["main_threads"]["growth"], "= 0", grown["main_threads"]["growth"] == 0),
        Check("tree thread growth", grown["tree_threads"]["growth"], "= 0", grown["tree_threads"]["growth"] == 0),
        Check("tree process growth", grown["processes"]["growth"], "= 0", grown["processes"]["growth"] == 0),
    ]


def print_table(grown: dict[str, dict[str, int]], all_checks: list[Check]) -> None:
    print("\n| figure (idle, between jobs) | after warm-up | last | growth | max growth |")
    print("|---|---:|---:|---:|---:|")
    for name, row in grown.items():
        scale = MiB if name.endswith("_bytes") else 1
        label = {"memory_bytes": "tree memory, meter total (MiB)", "anon_shm_bytes": "tree memory, anonymous + /dev/shm (MiB)",
                 "anon_pss_bytes": "tree anonymous PSS (MiB)"}.get(name, name)
        cells = [row[key] / scale for key in ("warmup", "last", "growth", "max_growth")]
        print(f"| {label} | " + " | ".join(f"{c:.1f}" if scale != 1 else f"{c:.0f}" for c in cells) + " |")
    print("\n| check | value | limit | |\n|---|---:|---|---|")
    for check in all_checks:
        print(f"| {check.name} | {check.value:g} | {check.limit} | {'pass' if check.passed else 'FAIL'} |")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 batches: 4 jobs x 25, warm-up 1 job")
    parser.add_argument("--jobs", type=int, default=80)
    parser.add_argument("--batches-per-job", type=int, default=25)
    parser.add_argument("--batch", type=int, default=2, help="images per batch (= tasks per reserve)")
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--warmup-jobs", type=int, default=8, help="jobs before the reference idle sample")
    parser.add_argument("--pipeline", default="synthetic-moths", help="synthetic-moths (reference) or null (decode only)")
    parser.add_argument("--max-pending-posts", type=int, default=1,
                        help="the poster's thread pool size (AMI_ANTENNA_MAX_PENDING_POSTS; default 1: the pool "
                        "starts threads on demand up to this size, which would read as thread growth)")
    parser.add_argument("--shm", choices=("auto", "private", "host"), default="auto",
                        help="where /dev/shm entries are counted: a private tmpfs for the worker (root + unshare; "
                        "auto picks it where possible) or the host's, shared with every other program")
    parser.add_argument("--interval", type=float, default=1.0, help="in-flight memory meter interval, s")
    parser.add_argument("--output", type=Path, default=None, help=f"JSON results (default {RESULTS.relative_to(ROOT)}; "
                        "--quick: a temporary file unless given)")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.batches_per_job, args.warmup_jobs = 4, 25, 1
    if not 1 <= args.warmup_jobs < args.jobs:
        parser.error("--warmup-jobs must be at least 1 and below --jobs")
    params = SoakParams(args.jobs, args.batches_per_job, args.batch, args.loader_workers, args.warmup_jobs,
                        args.pipeline, args.interval, args.max_pending_posts)
    output = args.output or (Path(tempfile.gettempdir()) / "soak-quick.json" if args.quick else RESULTS)

    from worker.testing.synthetic import default_cache_dir, generate_preset

    images = generate_preset(default_cache_dir(), "tiny", 200, seed=11)
    log_path = Path(tempfile.gettempdir()) / f"soak-worker-{os.getpid()}.log"
    print(f"soak: {params.jobs} jobs x {params.batches_per_job} batches of {params.batch} ({params.batches} batches, "
          f"{params.jobs * params.tasks_per_job} tiny images), {params.loader_workers} loader workers, pipeline "
          f"{params.pipeline}; worker log {log_path}", flush=True)
    shm = ShmView.choose(args.shm)
    print(f"/dev/shm: {'private tmpfs in its own mount namespace' if shm.private else 'the host one'}", flush=True)
    result = run_soak(params, images, log_path, shm)
    grown = growth(result["samples"], params.warmup_jobs)
    all_checks = checks(result, grown, params)
    print_table(grown, all_checks)
    print(f"\nwall {result['wall_s']:.0f} s, worker exit code {result['exit_code']} (SIGTERM), in-flight peak "
          f"{result['peak_in_flight_bytes'] / MiB:.1f} MiB, /dev/shm entries left after exit: "
          f"{len(result['shm_entries_left_after_exit'])}")
    passed = all(check.passed for check in all_checks)
    output.write_text(json.dumps({
        "taken_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "params": asdict(params),
        "batches": params.batches, "wall_s": round(result["wall_s"], 1), "exit_code": result["exit_code"],
        "idle_processes": result["idle_processes"], "peak_in_flight_bytes": result["peak_in_flight_bytes"],
        "shm_entries_left_after_exit": result["shm_entries_left_after_exit"], "shm_private": shm.private,
        "growth": grown,
        "checks": [asdict(check) for check in all_checks], "passed": passed,
        "samples": [asdict(sample) for sample in result["samples"]],
        "reports": [report.as_dict() for report in result["reports"]],
    }, indent=1) + "\n")
    print(f"{'PASS' if passed else 'FAIL'}; results in {output}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
