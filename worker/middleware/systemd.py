"""Running as a service: systemd's notify protocol and the open-files limit.

``ServiceMiddleware`` raises the soft RLIMIT_NOFILE to the hard limit at start (DataLoader
workers pass tensors as file descriptors and the common default of 1024 ran out after days), and
when ``NOTIFY_SOCKET`` is set speaks sd_notify over it: ``READY=1`` once started, ``STATUS=…``
as jobs progress, ``WATCHDOG=1`` every half of ``WATCHDOG_USEC`` and ``STOPPING=1`` as soon as a
drain begins. It works the same under supervisor (no socket: only the FD limit).

Watchdog pings come from a thread, but only while the loop shows life: a hook ran within
``stall_limit_s`` (default: the reservation timeout, since a loop that handled no batch for that
long holds only expired tasks). A hung loop thus stops the pings and systemd restarts the worker.
"""
from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

from worker.hooks import JobContext, Middleware

if TYPE_CHECKING:
    from worker.results import ImageResult
    from worker.daemon import Worker
    from worker.ingest import Batch

log = logging.getLogger(__name__)

MIN_HARD_FD_LIMIT = 4096
FLAG_POLL_S = 0.1
STATUS_INTERVAL_S = 1.0


@dataclass(frozen=True)
class FdLimit:
    soft_before: int
    soft: int
    hard: int


def raise_fd_limit(minimum_hard: int = MIN_HARD_FD_LIMIT) -> FdLimit:
    """Set the soft RLIMIT_NOFILE to the hard limit; warn when the hard limit is below ``minimum_hard``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-files soft limit from %d to %d: %s", soft, target, error)
            target = soft
        else:
            log.info("open-files soft limit raised from %d to %d (hard limit)", soft, target)
    if hard != resource.RLIM_INFINITY and hard < minimum_hard:
        log.warning("open-files hard limit is %d, below %d: loader workers may fail with EMFILE; set "
                    "LimitNOFILE=65536 (systemd) or minfds=65536 (supervisor) or ulimit -Hn", hard, minimum_hard)
    return FdLimit(soft_before=soft, soft=target, hard=hard)


class Notifier:
    """sd_notify over a unix datagram socket; ``@name`` is the abstract namespace. Never raises."""

    def __init__(self, address: str) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._lock = threading.Lock()
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Optional["Notifier"]:
        address = environ.get("NOTIFY_SOCKET", "")
        return cls(address) if address.startswith(("/", "@")) else None

    def send(self, *lines: str) -> bool:
        message = "\n".join(lines).encode()
        with self._lock:
            try:
                self._socket.sendto(message, self.address)
            except OSError as error:
                if not self._failed:  # one line, not one per ping
                    log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), error)
                self._failed = True
                return False
        return True

    def close(self) -> None:
        self._socket.close()


def keepalive_interval_s(environ: Mapping[str, str], pid: int) -> Optional[float]:
    """Half of ``WATCHDOG_USEC`` in seconds, if systemd asks this process (``WATCHDOG_PID``) to ping."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (owner and owner != str(pid)):
        return None
    return int(usec) / 2e6


class ServiceMiddleware(Middleware):
    def __init__(self, notifier: Optional[Notifier] = None, *, keepalive_interval_s: Optional[float] = None,
                 stall_limit_s: float = 300.0) -> None:
        self.notifier = notifier
        self.keepalive_interval_s = keepalive_interval_s
        self.stall_limit_s = stall_limit_s
        self.fd_limit: Optional[FdLimit] = None
        self._heartbeat_s = time.monotonic()
        self._status_sent_s = 0.0
        self._stopping_sent = False
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], *, stall_limit_s: float) -> "ServiceMiddleware":
        return cls(Notifier.from_environ(environ), keepalive_interval_s=keepalive_interval_s(environ, os.getpid()),
                   stall_limit_s=stall_limit_s)

    def on_start(self, worker: "Worker") -> None:
        self.fd_limit = raise_fd_limit()
        self._beat()
        self._thread = threading.Thread(target=self._run, args=(worker,), name="service", daemon=True)
        self._thread.start()
        if self.notifier is None:
            return
        self.notifier.send("READY=1", f"STATUS=polling {worker.settings.antenna_api_base_url}",
                           f"MAINPID={os.getpid()}")
        log.info("systemd notified READY=1%s", "" if self.keepalive_interval_s is None
                 else f"; watchdog ping every {self.keepalive_interval_s:.1f} s")

    def on_idle(self, worker: "Worker") -> None:
        self._beat()
        self._status(f"idle; {worker.jobs_done} jobs done", throttle=True)

    def on_job_start(self, worker: "Worker", ctx: JobContext) -> None:
        self._beat()
        self._status(f"job {ctx.job.id}: started")

    def on_loader_start(self, worker: "Worker", ctx: JobContext) -> None:
        self._beat()

    def after_batch(self, worker: "Worker", ctx: JobContext, batch: "Batch", results: "list[ImageResult]") -> None:
        self._beat()
        self._status(f"job {ctx.job.id}: {ctx.stats.images} images, {ctx.stats.images_per_s():.1f} images/s",
                     throttle=True)

    def on_job_end(self, worker: "Worker", ctx: JobContext) -> None:
        self._beat()
        self._status(f"job {ctx.job.id}: done, {ctx.stats.images} images")

    def on_stop(self, worker: "Worker") -> None:
        self._send_stopping()
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self.notifier is not None:
            self.notifier.close()

    # --- internals

    def _beat(self) -> None:
        self._heartbeat_s = time.monotonic()

    def _status(self, text: str, *, throttle: bool = False) -> None:
        now_s = time.monotonic()
        if self.notifier is None or (throttle and now_s - self._status_sent_s < STATUS_INTERVAL_S):
            return
        self._status_sent_s = now_s
        self.notifier.send(f"STATUS={text}")

    def _report_flags(self, worker: "Worker", before: tuple[bool, bool, bool], now: tuple[bool, bool, bool]) -> None:
        draining, forced, after_job = now
        if draining and not before[0]:
            log.info("stop requested: draining (no new reserves; finish, post, exit within %.0f s; "
                     "a second signal forces)", worker.settings.shutdown_grace_s)
        if forced and not before[1]:
            log.warning("stop forced: abandoning held tasks (they are redelivered after the reservation timeout)")
        if after_job and not before[2]:
            log.info("recycle requested (SIGUSR1): exiting after the current job")
        if draining or forced:
            self._send_stopping()

    def _send_stopping(self) -> None:
        if self.notifier is not None and not self._stopping_sent:
            self._stopping_sent = True
            self.notifier.send("STOPPING=1", "STATUS=draining: finishing in-flight work and flushing posts")

    def _run(self, worker: "Worker") -> None:
        """Reports the stop flags the signal handlers set (a log line and STOPPING=1 within
        FLAG_POLL_S: handlers themselves must not log) and pings the watchdog."""
        next_ping_s = time.monotonic()
        stalled_logged = False
        seen = (False, False, False)
        while not self._done.wait(FLAG_POLL_S):
            flags = (worker.stop.draining, worker.stop.forced, worker.stop.after_job)
            if flags != seen:
                self._report_flags(worker, seen, flags)
                seen = flags
            if self.notifier is None or self.keepalive_interval_s is None or time.monotonic() < next_ping_s:
                continue
            next_ping_s = time.monotonic() + self.keepalive_interval_s
            stalled_s = time.monotonic() - self._heartbeat_s
            # A drain is bounded by AMI_SHUTDOWN_GRACE_S and systemd's TimeoutStopSec: keep pinging.
            if stalled_s < self.stall_limit_s or worker.stopping:
                self.notifier.send("WATCHDOG=1")  # type: ignore[union-attr]
                stalled_logged = False
            elif not stalled_logged:
                stalled_logged = True
                log.error("the loop ran no hook for %.0f s (limit %.0f s): no more watchdog pings, "
                          "systemd will restart the worker", stalled_s, self.stall_limit_s)
