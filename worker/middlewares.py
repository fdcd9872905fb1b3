"""The default middleware stack, in order. Each entry is switched by its settings."""
from __future__ import annotations

from worker.hooks import Middleware
from worker.settings import Settings


def build_middlewares(settings: Settings) -> list[Middleware]:
    stack: list[Middleware] = []
    # Autotune first: later entries (the watchdog) see the job's plan in ctx.plan.
    from worker.tuning import tuning_middlewares

    stack.extend(tuning_middlewares(settings))
    return stack
