"""Daemon threads reused between calls: a loader lane's downloads and reservations.

A lane starts a download per image and a reservation per batch of tasks, each on a thread of
its own so that none waits on another. It started a fresh thread for each, and ``Thread.start``
waits until the new thread runs, on cores the other lane and the image server are using. Reusing
idle threads took a null job of small images on a fast link from a median of 74.6 to 76.4 images/s
(``benchmarks/job_timeline.py null-small``, seven alternating pairs on 2 cores: 73.5-77.2 before,
75.3-77.5 after; six of the seven pairs faster). On the 300 ms link (``null-small-far``) three
pairs showed no difference either way.

Not a ``concurrent.futures`` executor: its threads are joined when the process exits, so one
download stuck on a slow host would hold up a loader worker's exit (and the DataLoader's
shutdown), and its fixed size would let stuck downloads starve the others. Here a call that
finds no idle thread starts one, a stuck call holds only its own thread (it ends on its own
deadline), an idle thread retires after ``idle_s``, and every thread is a daemon.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

IDLE_S = 5.0

_Work = tuple[Future, Callable[..., Any], tuple[Any, ...]]
# One thread's mailbox: the caller that takes it from the idle list puts one call in it.
_Mailbox = queue.SimpleQueue


class DaemonThreads:
    """``submit`` runs a call on an idle thread of this pool, or on a new daemon thread if none is idle."""

    def __init__(self, name: str, *, idle_s: float = IDLE_S) -> None:
        self.name = name
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._idle: list[_Mailbox] = []
        self.started = 0  # threads started so far (reuse shows as calls > started)

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        work: _Work = (future, function, args)
        with self._lock:
            mailbox = self._idle.pop() if self._idle else None
            if mailbox is None:
                self.started += 1
        if mailbox is None:  # the call goes through the mailbox: a Thread keeps its args while it runs
            mailbox = _Mailbox()
            threading.Thread(target=self._run, args=(mailbox,), name=self.name, daemon=True).start()
        mailbox.put(work)
        return future

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def _run(self, mailbox: _Mailbox) -> None:
        work: _Work = mailbox.get()
        while True:
            _call(*work)
            del work  # an idle thread keeps nothing of its last call (whose future holds a body)
            with self._lock:
                self._idle.append(mailbox)
            try:
                work = mailbox.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if mailbox in self._idle:  # nobody took it: retire
                        self._idle.remove(mailbox)
                        return
                work = mailbox.get()  # taken just now: its call is on the way


def _call(future: Future, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(function(*args))
    except BaseException as error:  # handed to the waiting thread, which classifies it
        future.set_exception(error)
