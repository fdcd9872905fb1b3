"""The middlewares, one file per thing they plug into the loop, and the default stack, in order.

- ``autotune``: after each autotuned job, learn the memory correction and write the advisory.
- ``watchdog``: the memory governor (``AMI_WATCHDOG_ENABLED``).
- ``prometheus``: metrics on ``AMI_METRICS_ADDR`` (empty disables).
- ``progress``: the redrawn progress line on a TTY, else DEBUG log lines.
- ``systemd``: sd_notify READY/STOPPING/keepalive pings, and the FD limit.
"""
from __future__ import annotations

import sys
from typing import Mapping

from worker.hooks import Middleware
from worker.planning import AutotunePlanner, Planner
from worker.settings import Settings


def build_middlewares(settings: Settings, planner: Planner, environ: Mapping[str, str]) -> list[Middleware]:
    """The stack in hook order. Observability comes last, so its ``on_start`` runs after the
    others' (READY=1 means ready). ``environ`` is the process environment as the CLI read it:
    systemd's variables (NOTIFY_SOCKET, WATCHDOG_USEC) are the service manager's, not AMI_ settings.
    """
    from worker.middleware.progress import ProgressMiddleware
    from worker.middleware.systemd import ServiceMiddleware

    stack: list[Middleware] = []
    if isinstance(planner, AutotunePlanner):
        from worker.middleware.autotune import TuningMiddleware

        stack.append(TuningMiddleware(settings, planner.calibration))
    if settings.watchdog_enabled:
        from worker.middleware.watchdog import WatchdogMiddleware

        stack.append(WatchdogMiddleware(settings))
    if settings.metrics_addr:
        from worker.middleware.prometheus import MetricsMiddleware

        # prometheus-client's own variable: set, this process writes its values to that folder
        # and whoever made it (`worker run --processes`, worker/fleet.py) serves them.
        serve = not environ.get("PROMETHEUS_MULTIPROC_DIR")
        stack.append(MetricsMiddleware(settings.metrics_addr, port_attempts=settings.metrics_port_attempts,
                                       serve=serve))
    stack.append(ProgressMiddleware(sys.stderr))
    stack.append(ServiceMiddleware.from_environ(environ, stall_limit_s=settings.antenna_reservation_timeout_s))
    return stack
