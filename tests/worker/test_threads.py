"""DaemonThreads: reuse, no starvation behind a stuck call, retirement, daemon exit. Real threads
and a real subprocess."""
from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest

from worker.threads import DaemonThreads

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)


def test_calls_one_after_another_run_on_one_thread():
    threads = DaemonThreads("test")
    idents = {threads.submit(threading.get_ident).result(timeout=5) for _ in range(50)}
    assert len(idents) == 1 and threads.started == 1
    assert threading.get_ident() not in idents


def test_a_stuck_call_holds_only_its_own_thread():
    threads = DaemonThreads("test")
    release = threading.Event()
    stuck = [threads.submit(release.wait) for _ in range(3)]
    try:
        # every thread is busy: the next call gets a thread of its own, at once
        assert threads.submit(lambda: 42).result(timeout=5) == 42
        assert threads.started == 4 and not any(future.done() for future in stuck)
    finally:
        release.set()
    assert all(future.result(timeout=5) for future in stuck)
    deadline = time.monotonic() + 5
    while threads.idle < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads.idle == 4  # all back, and reused from here on
    assert threads.submit(lambda: 7).result(timeout=5) == 7 and threads.started == 4


class Body:
    """Stands for a downloaded body: what a finished call's future holds."""


@pytest.mark.parametrize("calls", [1, 2])
def test_a_thread_keeps_nothing_of_a_finished_call(calls):
    threads = DaemonThreads("test")
    for _ in range(calls - 1):
        threads.submit(lambda: None).result(timeout=5)
    future = threads.submit(Body)
    body = weakref.ref(future.result(timeout=5))
    del future
    deadline = time.monotonic() + 5
    while threads.idle < 1 and time.monotonic() < deadline:  # back in the idle list, waiting
        time.sleep(0.01)
    gc.collect()
    assert threads.idle == 1 and body() is None


def test_an_exception_reaches_the_caller():
    threads = DaemonThreads("test")

    def fail():
        raise ValueError("bad image")

    with pytest.raises(ValueError, match="bad image"):
        threads.submit(fail).result(timeout=5)
    assert threads.submit(lambda: "next").result(timeout=5) == "next"  # the thread survived


def test_idle_threads_retire_and_a_later_call_starts_a_new_one():
    threads = DaemonThreads("test-retire", idle_s=0.2)
    threads.submit(lambda: None).result(timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(t.name == "test-retire" for t in threading.enumerate()):
        time.sleep(0.02)
    assert threads.idle == 0 and not any(t.name == "test-retire" for t in threading.enumerate())
    assert threads.submit(lambda: 1).result(timeout=5) == 1 and threads.started == 2


def test_hand_offs_racing_retirement_lose_no_call():
    threads = DaemonThreads("test-race", idle_s=0.001)  # threads retire between almost every call
    futures = []
    for round_ in range(200):
        futures.append(threads.submit(lambda n=round_: n))
        if round_ % 7 == 0:
            time.sleep(0.002)
    assert [future.result(timeout=5) for future in futures] == list(range(200))


def test_a_stuck_call_does_not_hold_up_the_process_exit():
    script = ("import threading, time; from worker.threads import DaemonThreads; "
              "t = DaemonThreads('stuck'); t.submit(threading.Event().wait); "
              "t.submit(time.sleep, 0).result(); print('done', flush=True)")
    # a thread the interpreter joins at exit (an executor's) would hang it: TimeoutExpired
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
