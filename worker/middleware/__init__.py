"""The default middleware stack, in order. Each entry is switched by its settings."""
from __future__ import annotations

from worker.hooks import Middleware
from worker.settings import Settings


def build_middlewares(settings: Settings) -> list[Middleware]:
    stack: list[Middleware] = []
    # Autotune first: later entries (the watchdog) see the job's plan in ctx.plan.
    from worker.middleware.autotune import tuning_middlewares

    stack.extend(tuning_middlewares(settings))
    if settings.watchdog_enabled:  # AMI_WATCHDOG_ENABLED: the memory governor (worker/middleware/watchdog.py)
        from worker.middleware.watchdog import WatchdogMiddleware

        stack.append(WatchdogMiddleware(settings))
    stack.extend(observability_middlewares(settings))
    return stack


def observability_middlewares(settings: Settings) -> list[Middleware]:
    """Metrics (AMI_METRICS_ADDR; empty disables), the TTY progress line, then systemd/FD limit.

    Last in the stack so their on_start runs after the others' (READY=1 means ready) and their
    hooks see the plan the earlier entries chose. systemd's variables (NOTIFY_SOCKET,
    WATCHDOG_USEC) are the service manager's, not AMI_ settings, so they are read here at wiring.
    """
    import os
    import sys

    from worker.middleware.prometheus import MetricsMiddleware
    from worker.middleware.progress import ProgressMiddleware
    from worker.middleware.systemd import ServiceMiddleware

    stack: list[Middleware] = []
    if settings.metrics_addr:
        # prometheus-client's own variable: set, this process writes its values to that folder
        # and whoever made it (`worker run --processes`, worker/fleet.py) serves them.
        serve = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        stack.append(MetricsMiddleware(settings.metrics_addr, port_attempts=settings.metrics_port_attempts,
                                       serve=serve))
    stack.append(ProgressMiddleware(sys.stderr))  # a redrawn line on a TTY, else DEBUG log lines
    stack.append(ServiceMiddleware.from_environ(os.environ, stall_limit_s=settings.antenna_reservation_timeout_s))
    return stack
