"""``worker run --processes N``: N worker processes under one parent.

The parent runs no jobs and imports no torch. It plans one child per process (a CUDA device
each, a share of the memory budget), starts each as ``python -m worker.cli run``, serves every
child's metrics on AMI_METRICS_ADDR through prometheus-client's multiprocess mode, restarts a
child that dies (with ``backoff_delay_s``) and relays stop signals:

- SIGTERM / SIGINT: forwarded to every child, which drains (finishes and posts what it holds);
  the parent waits up to AMI_SHUTDOWN_GRACE_S + ``STOP_MARGIN_S``, SIGKILLs what is left, and
  exits 0 when every child drained and exited 0 (1 otherwise). A second signal makes the
  children force: the parent sends them ``FORCE_SIGNAL``.
- SIGUSR1: forwarded; each child drains after its current job, and none is restarted.

Children run in their own session, so a terminal's Ctrl-C reaches them once (through the
parent), and get SIGTERM from the kernel if the parent dies (PR_SET_PDEATHSIG). A stop sent to
every process at once (``scancel``, systemd's ``KillMode=control-group``) reaches a child twice,
directly and forwarded: a child therefore drains on any number of SIGTERM and SIGINT, and
forces only on the parent's ``FORCE_SIGNAL`` (``worker.stops``).

In burst mode a child that exits 3 or 4 (the API rejected the token, or is unreachable) is not
restarted: the parent exits with that code once the others are done. A child that fails
``BURST_MAX_QUICK_EXITS`` times in a row is given up (exit 1).
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, Sequence

from worker.backoff import backoff_delay_s
from worker.stops import FLEET_CHILD_VARIABLE, FORCE_SIGNAL, process_exists

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MIN_SHARE_BYTES = 64 * MIB  # AMI_MAX_MEMORY_BYTES's own minimum
STOP_MARGIN_S = 15.0  # a child's drain ends AMI_SHUTDOWN_GRACE_S after its signal; then it exits
STABLE_RUN_S = 60.0  # a child that ran this long before dying restarts without the backoff it had built up
RESTART_BASE_S = 1.0
RESTART_CAP_S = 60.0
POLL_S = 0.2
BAD_SETTING_EXIT = 2  # the CLI's exit code for a bad setting: restarting cannot help
BURST_FINAL_EXITS = (3, 4)  # burst: the API rejected the token, or is unreachable; a restart would only repeat it
BURST_MAX_QUICK_EXITS = 5
# systemd's notify variables belong to the parent (NotifyAccess=main ignores children).
PARENT_ONLY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildSpec:
    """One worker process: its index, the CUDA device it sees (None: not pinned), its memory and,
    on a GPU it shares with other children, its AMI_GPU_MEMORY_FRACTION (None: the operator's)."""

    index: int
    cuda_device: Optional[str]
    max_memory_bytes: int
    gpu_memory_fraction: Optional[float] = None


def visible_cuda_devices(environ: Mapping[str, str],
                         driver_dir: Path = Path("/proc/driver/nvidia/gpus")) -> list[str]:
    """CUDA device ids this process may use, read without importing torch.

    CUDA_VISIBLE_DEVICES wins when set (CUDA stops at the first negative id, so ``-1`` hides
    all); else one id per GPU the NVIDIA driver lists. [] on a host without NVIDIA GPUs.
    """
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        devices: list[str] = []
        for item in (part.strip() for part in value.split(",")):
            if not item or item.startswith("-"):
                break
            devices.append(item)
        return devices
    try:
        return [str(i) for i in range(len(list(driver_dir.iterdir())))]
    except OSError:
        return []


def memory_share_bytes(budget_bytes: int, reserve_bytes: int, safety_factor: float, processes: int) -> int:
    """Each child's memory: ``(budget - reserve) x safety / processes``.

    The reserve (for the OS) comes off once, for the host; the safety factor is applied once,
    here, so each child plans against its whole share. Raises ValueError when a share would be
    below 64 MiB (AMI_MAX_MEMORY_BYTES's minimum).
    """
    share = int((budget_bytes - reserve_bytes) * safety_factor / processes)
    if share < MIN_SHARE_BYTES:
        raise ValueError(f"{processes} worker processes get {max(share, 0) / MIB:.0f} MiB each from a "
                         f"{budget_bytes / MIB:.0f} MiB budget less a {reserve_bytes / MIB:.0f} MiB reserve; "
                         "run fewer (AMI_WORKER_PROCESSES) or raise AMI_MAX_MEMORY_BYTES")
    return share


def plan_children(processes: int, devices: Sequence[str], share_bytes: int,
                  gpu_memory_fraction: float = 1.0) -> list[ChildSpec]:
    """One spec per process; devices are dealt round-robin. More processes than GPUs share them,
    and the children on one GPU split ``gpu_memory_fraction`` of it (AMI_GPU_MEMORY_FRACTION) as
    the host's memory is split: each child's torch caps its allocations and autotune plans its
    batches for its part of the card, not the whole of it."""
    assigned = [devices[index % len(devices)] if devices else None for index in range(processes)]
    specs = []
    for index, device in enumerate(assigned):
        sharing = assigned.count(device) if device is not None else 1
        specs.append(ChildSpec(index, device, share_bytes, gpu_memory_fraction / sharing if sharing > 1 else None))
    return specs


def child_environ(base: Mapping[str, str], spec: ChildSpec, metrics_dir: Optional[str]) -> dict[str, str]:
    """The environment of one child: its device, its share, and the multiprocess metrics folder."""
    env = {name: value for name, value in base.items() if name not in PARENT_ONLY_VARIABLES}
    env.update(AMI_WORKER_PROCESSES="1", AMI_MAX_MEMORY_BYTES=str(spec.max_memory_bytes),
               AMI_MEMORY_RESERVE_BYTES="0", AMI_MEMORY_SAFETY_FACTOR="1.0")
    env[FLEET_CHILD_VARIABLE] = "1"
    if spec.cuda_device is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec.cuda_device
    if spec.gpu_memory_fraction is not None:
        env["AMI_GPU_MEMORY_FRACTION"] = f"{spec.gpu_memory_fraction:.6g}"
    if metrics_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    return env


@dataclass
class _Child:
    spec: ChildSpec
    proc: Optional[subprocess.Popen] = None
    started_s: float = 0.0
    quick_exits: int = 0
    restart_at_s: Optional[float] = None
    restarts: int = 0
    finished: bool = False  # exited for good: no restart


@dataclass
class _StopState:
    signals: list[int] = field(default_factory=list)
    draining: bool = False
    after_job: bool = False
    deadline_s: Optional[float] = None


class Fleet:
    """The parent: starts, watches, restarts and stops the children of ``specs``."""

    def __init__(self, settings: "Settings", specs: Sequence[ChildSpec], child_argv: Sequence[str], *,
                 burst: bool = False, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.children = [_Child(spec) for spec in specs]
        self.child_argv = list(child_argv)
        self.burst = burst
        self.environ = dict(environ)
        self.stop = _StopState()
        self.exit_code = 0
        self._wake_fd: Optional[int] = None  # the read end of the signal wake-up pipe
        self._stopping_announced = False
        self._metrics_dir: Optional[str] = None
        self._server = None
        self._next_keepalive_s = 0.0

    # --- signals: handlers only record

    def install_signal_handlers(self) -> None:
        """Handlers that only record the signal (main thread only); the interpreter writes each
        signal's number to a pipe (``signal.set_wakeup_fd``), which wakes the loop's ``select``.
        An ``Event.set()`` in the handler could deadlock against the interrupted ``wait()`` or
        ``clear()``, which hold the same lock."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._wake_fd = read_fd
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop.signals.append(signum)

    def _sleep(self) -> None:
        """Until a signal comes, or ``POLL_S``."""
        if self._wake_fd is None:
            time.sleep(POLL_S)
            return
        if select.select([self._wake_fd], [], [], POLL_S)[0]:
            try:
                while os.read(self._wake_fd, 512):
                    pass
            except BlockingIOError:
                pass

    # --- the loop

    def run(self) -> int:
        from worker.middleware.systemd import Notifier

        notifier = Notifier.from_environ(self.environ)
        try:
            self._start_metrics()
            for child in self.children:
                self._spawn(child)
            if notifier is not None:
                notifier.send("READY=1", f"STATUS={len(self.children)} worker processes")
            while True:
                self._handle_signals(notifier)
                self._reap()
                if all(c.finished for c in self.children) or self._past_deadline():
                    break
                self._restart_due()
                self._keepalive(notifier)
                self._sleep()
        finally:
            # Every child may have ended in the reap that stopped the fleet (two children exiting 2
            # at once), before the loop handled the stop it queued: systemd still hears STOPPING=1.
            self._announce_stopping(notifier)
            self._kill_all()
            self._stop_metrics()
        log.info("fleet: stopped (exit %d)", self.exit_code)
        return self.exit_code

    def _announce_stopping(self, notifier) -> None:
        """STOPPING=1 to systemd, once."""
        if notifier is not None and not self._stopping_announced:
            self._stopping_announced = True
            notifier.send("STOPPING=1")

    def _keepalive(self, notifier) -> None:
        """WATCHDOG=1 every half of systemd's WATCHDOG_USEC, from the loop (a hung loop stops it)."""
        usec = self.environ.get("WATCHDOG_USEC", "")
        if notifier is None or not usec.isdigit():
            return
        now_s = time.monotonic()
        if now_s >= self._next_keepalive_s:
            notifier.send("WATCHDOG=1")
            self._next_keepalive_s = now_s + int(usec) / 2e6

    def _live(self) -> list[_Child]:
        return [c for c in self.children if c.proc is not None and c.proc.poll() is None]

    def _spawn(self, child: _Child) -> None:
        env = child_environ(self.environ, child.spec, self._metrics_dir)
        child.proc = subprocess.Popen(self.child_argv, env=env, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        child.started_s = time.monotonic()
        child.restart_at_s = None
        log.info("fleet: child %d started: pid %d, CUDA_VISIBLE_DEVICES=%s, AMI_MAX_MEMORY_BYTES=%d (%.0f MiB)",
                 child.spec.index, child.proc.pid, child.spec.cuda_device or "-", child.spec.max_memory_bytes,
                 child.spec.max_memory_bytes / MIB)

    def _handle_signals(self, notifier) -> None:
        while self.stop.signals:
            signum = self.stop.signals.pop(0)
            if signum == signal.SIGUSR1:
                self.stop.after_job = True
                log.info("fleet: SIGUSR1: every child drains after its current job; none restarts")
            elif not self.stop.draining:
                self.stop.draining = True
                self.stop.deadline_s = time.monotonic() + self.settings.shutdown_grace_s + STOP_MARGIN_S
                log.info("fleet: %s: draining %d children (deadline %.0f s)", signal.Signals(signum).name,
                         len(self._live()), self.settings.shutdown_grace_s + STOP_MARGIN_S)
                self._announce_stopping(notifier)
            else:
                log.warning("fleet: second %s: the children force", signal.Signals(signum).name)
                signum = FORCE_SIGNAL
            for child in self.children:
                if child.restart_at_s is not None:  # dead, waiting for a restart that no longer comes
                    child.restart_at_s, child.finished = None, True
            for child in self._live():
                child.proc.send_signal(signum)

    def _reap(self) -> None:
        for child in self.children:
            if child.proc is None or child.finished or child.restart_at_s is not None:
                continue
            code = child.proc.poll()
            if code is None:
                continue
            self._forget_metrics(child.proc.pid)
            ran_s = time.monotonic() - child.started_s
            if self.stop.draining or self.stop.after_job or (self.burst and code == 0):
                child.finished = True
                log.info("fleet: child %d (pid %d) exited %s after %.1f s", child.spec.index, child.proc.pid,
                         _describe_exit(code), ran_s)
                if code != 0:  # killed or failed while draining: what it held may be left
                    self.exit_code = self.exit_code or 1
            elif self.burst and code in BURST_FINAL_EXITS:
                log.error("fleet: child %d exited %d in burst mode: not restarted", child.spec.index, code)
                child.finished = True
                self.exit_code = self.exit_code or code
            elif code == BAD_SETTING_EXIT:
                log.error("fleet: child %d exited %d (a bad setting): stopping every child", child.spec.index, code)
                child.finished = True
                self.exit_code = BAD_SETTING_EXIT
                self._on_signal(signal.SIGTERM, None)
            else:
                self._schedule_restart(child, code, ran_s)

    def _schedule_restart(self, child: _Child, code: int, ran_s: float) -> None:
        child.quick_exits = 1 if ran_s >= STABLE_RUN_S else child.quick_exits + 1
        if self.burst and child.quick_exits >= BURST_MAX_QUICK_EXITS:
            log.error("fleet: child %d (pid %d) exited %s, %d times in a row: given up (burst mode)",
                      child.spec.index, child.proc.pid, _describe_exit(code), child.quick_exits)
            child.finished = True
            self.exit_code = self.exit_code or 1
            return
        delay_s = backoff_delay_s(child.quick_exits, base_s=RESTART_BASE_S, cap_s=RESTART_CAP_S)
        child.restart_at_s = time.monotonic() + delay_s
        log.warning("fleet: child %d (pid %d) exited %s after %.1f s; restarting in %.1f s (exit %d in a row)",
                    child.spec.index, child.proc.pid, _describe_exit(code), ran_s, delay_s, child.quick_exits)

    def _restart_due(self) -> None:
        now_s = time.monotonic()
        for child in self.children:
            if child.restart_at_s is not None and now_s >= child.restart_at_s:
                child.restarts += 1
                self._spawn(child)

    def _past_deadline(self) -> bool:
        if self.stop.deadline_s is None or time.monotonic() < self.stop.deadline_s:
            return False
        left = self._live()
        if left:
            log.error("fleet: %d children still running at the drain deadline: killing pids %s",
                      len(left), [c.proc.pid for c in left])
            self.exit_code = self.exit_code or 1
        return True

    def _kill_all(self) -> None:
        for child in self._live():
            child.proc.kill()
        for child in self.children:
            if child.proc is not None:
                child.proc.wait()

    # --- metrics: one endpoint for every child

    def _start_metrics(self) -> None:
        if not self.settings.metrics_addr:
            return
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from worker.middleware.prometheus import MetricsServer

        for path in remove_stale_metrics_dirs():
            log.info("fleet: removed %s, left by a parent that was killed", path)
        self._metrics_dir = make_metrics_dir()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._metrics_dir)
        registry.register(_FleetCollector(self))
        self._server = MetricsServer(self.settings.metrics_addr, registry=registry)
        self._server.start(self.settings.metrics_port_attempts)

    def _forget_metrics(self, pid: int) -> None:
        """Drop a dead child's gauges (its counters and histograms stay in the sums)."""
        if self._metrics_dir is None:
            return
        for path in glob.glob(os.path.join(self._metrics_dir, f"gauge_*_{pid}.db")):
            os.remove(path)

    def _stop_metrics(self) -> None:
        if self._server is not None:
            self._server.stop()
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)


METRICS_DIR_PREFIX = "antenna-worker-metrics-"


def make_metrics_dir(root: Optional[str] = None) -> str:
    """The children's multiprocess metrics folder, named by this parent's pid."""
    return tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-", dir=root)


def remove_stale_metrics_dirs(root: Optional[str] = None) -> list[str]:
    """Remove the metrics folders of parents that no longer run (SIGKILL or the OOM killer leave
    no time for ``_stop_metrics``); returns their paths."""
    removed = []
    for path in sorted(glob.glob(os.path.join(root or tempfile.gettempdir(), METRICS_DIR_PREFIX + "*-*"))):
        pid = os.path.basename(path)[len(METRICS_DIR_PREFIX):].split("-", 1)[0]
        try:
            info = os.lstat(path)  # a real folder of this user's, not a link to elsewhere
        except OSError:
            continue
        if not pid.isdigit() or info.st_uid != os.getuid() or not stat.S_ISDIR(info.st_mode):
            continue
        if process_exists(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class _FleetCollector:
    """The parent's own series: children by state, restarts, and the build info."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        from worker import __version__

        children = self._fleet.children
        running = sum(1 for c in children if c.proc is not None and c.proc.poll() is None)
        waiting = sum(1 for c in children if c.restart_at_s is not None)
        states = GaugeMetricFamily("antenna_worker_fleet_processes", "Worker processes under this parent, by state.",
                                   labels=["state"])
        states.add_metric(["running"], running)
        states.add_metric(["restarting"], waiting)
        yield states
        yield CounterMetricFamily("antenna_worker_fleet_restarts", "Children restarted after they died.",
                                  value=sum(c.restarts for c in children))
        yield InfoMetricFamily("antenna_worker_build", "Version of the running worker.", value={"version": __version__})


def _describe_exit(code: int) -> str:
    return f"on signal {signal.Signals(-code).name}" if code < 0 else f"with code {code}"


_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the forked child before exec: SIGTERM when the parent dies (it drains like any stop)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_command(env_file: Optional[str], burst: bool) -> list[str]:
    """The command of one child: this interpreter running the CLI's ``run``."""
    return [sys.executable, "-m", "worker.cli", "--env-file", env_file or "/dev/null", "run",
            *(["--burst"] if burst else [])]


def _devices(settings: "Settings", environ: Mapping[str, str]) -> list[str]:
    return [] if settings.device == "cpu" else visible_cuda_devices(environ)


def fleet_size(settings: "Settings", processes: Optional[int], environ: Mapping[str, str]) -> int:
    """Worker processes to run: ``processes`` (--processes), else AMI_WORKER_PROCESSES, else one
    per visible CUDA device (none with AMI_DEVICE=cpu), else 1."""
    return processes or settings.worker_processes or len(_devices(settings, environ)) or 1


def run_fleet(settings: "Settings", count: int, *, env_file: Optional[str], burst: bool,
              environ: Mapping[str, str]) -> int:
    """Plan ``count`` children and run them until stopped; returns the exit code. ``environ`` is
    the process environment as the CLI read it: the children inherit it."""
    from watchdog.limits import read_limits
    from worker.settings import SettingsError

    devices = _devices(settings, environ)
    limits = read_limits(configured_max_bytes=settings.max_memory_bytes)
    try:
        share = memory_share_bytes(limits.effective_limit_bytes, settings.memory_reserve_bytes,
                                   settings.memory_safety_factor, count)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    log.info("fleet: %d worker processes; memory (%.0f MiB from %s - %.0f MiB reserve) x %.2f / %d = %.0f MiB each; "
             "CUDA devices %s", count, limits.effective_limit_bytes / MIB, limits.limit_source,
             settings.memory_reserve_bytes / MIB, settings.memory_safety_factor, count, share / MIB, devices or "none")
    specs = plan_children(count, devices, share, settings.gpu_memory_fraction)
    for device in sorted({s.cuda_device for s in specs if s.gpu_memory_fraction is not None}):
        shared = [s for s in specs if s.cuda_device == device]
        log.info("fleet: CUDA device %s is shared by %d worker processes: AMI_GPU_MEMORY_FRACTION %.3g x 1/%d "
                 "= %.3g each", device, len(shared), settings.gpu_memory_fraction, len(shared),
                 shared[0].gpu_memory_fraction)
    fleet = Fleet(settings, specs, child_command(env_file, burst), burst=burst, environ=environ)
    fleet.install_signal_handlers()
    return fleet.run()
