"""The default middleware stack, in order. Each entry is switched by its settings."""
from __future__ import annotations

from worker.hooks import Middleware
from worker.settings import Settings


def build_middlewares(settings: Settings) -> list[Middleware]:
    stack: list[Middleware] = []
    return stack
