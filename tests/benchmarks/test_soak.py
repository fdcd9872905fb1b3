"""benchmarks/soak.py's own logic: growth is measured from the warm-up idle sample, the checks
read the server's ledger, and /dev/shm entries other programs hold are not the tree's. The soak
itself is not in the suite (``python benchmarks/soak.py --quick`` runs 100 batches)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import replace

from benchmarks.soak import SoakParams, TreeSample, checks, foreign_shm_entries, growth
from worker.testing.antenna_server import JobReport

MiB = 1024 * 1024
IDLE = TreeSample(after_job=0, batches_done=0, elapsed_s=0.0, memory_bytes=800 * MiB, pss_bytes=800 * MiB,
                  shm_held_bytes=0, anon_pss_bytes=600 * MiB, anon_shm_bytes=600 * MiB, tree_mappings=1400,
                  main_fds=8, tree_fds=21, shm_entries_new=0, shm_entries_foreign=0, shm_names_seen=[], main_threads=6,
                  tree_threads=8, processes=3, process_pss_bytes={})
PARAMS = SoakParams(jobs=3, batches_per_job=2, batch=2, loader_workers=2, warmup_jobs=1,
                    pipeline="null", interval_s=1.0, max_pending_posts=1)


def report(job_id: int, ok: int = 4, lost: int = 0, duplicates: int = 0) -> JobReport:
    return JobReport(job_id, 4, 4, 0, ok, 0, duplicates, lost, 0, 0, ok == 4, 0, 0, 0, 0, True)


def samples(last_fds: int = 11, last_anon_mib: int = 640) -> list[TreeSample]:
    warm = replace(IDLE, after_job=1, main_fds=11, anon_pss_bytes=620 * MiB, anon_shm_bytes=620 * MiB)
    peak = replace(warm, after_job=2, anon_shm_bytes=700 * MiB)
    return [IDLE, warm, peak, replace(warm, after_job=3, main_fds=last_fds, anon_shm_bytes=last_anon_mib * MiB)]


def test_growth_runs_from_the_warm_up_sample_not_the_first():
    grown = growth(samples(), warmup_jobs=1)
    assert grown["main_fds"] == {"warmup": 11, "last": 11, "growth": 0, "max_growth": 0}
    assert grown["anon_shm_bytes"]["growth"] == 20 * MiB and grown["anon_shm_bytes"]["max_growth"] == 80 * MiB


def test_checks_fail_on_fd_growth_memory_growth_and_ledger_gaps():
    result = {"reports": [report(1), report(2), report(3)]}
    assert all(check.passed for check in checks(result, growth(samples(), 1), PARAMS))
    failed = {check.name for check in checks(result, growth(samples(last_fds=12, last_anon_mib=671), 1), PARAMS)
              if not check.passed}
    assert failed == {"main process FD growth", "tree memory growth, anonymous + /dev/shm (MiB)"}
    gaps = {"reports": [report(1), report(2, ok=3, lost=1), report(3, duplicates=1)]}
    failed = {check.name for check in checks(gaps, growth(samples(), 1), PARAMS) if not check.passed}
    assert failed == {"results accepted", "tasks unresolved or lost", "results posted twice"}


def test_a_shm_entry_only_another_process_holds_is_foreign_one_nobody_holds_is_ours():
    held, orphan = f"soak-test-{uuid.uuid4().hex}", f"soak-test-{uuid.uuid4().hex}"
    open(f"/dev/shm/{orphan}", "wb").close()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1], 'wb'); sys.stdin.read()",
                               f"/dev/shm/{held}"], stdin=subprocess.PIPE)
    try:
        deadline_s = time.monotonic() + 10
        while not os.path.exists(f"/dev/shm/{held}") and time.monotonic() < deadline_s:
            time.sleep(0.01)
        names = {held, orphan}
        assert foreign_shm_entries(names, tree={os.getpid()}) == {held}
        assert foreign_shm_entries(names, tree={holder.pid}) == set()
    finally:
        holder.communicate(b"")
        for name in (held, orphan):
            os.unlink(f"/dev/shm/{name}")
