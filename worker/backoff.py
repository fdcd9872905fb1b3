"""One small pure function for retry delays, shared by every retrying caller."""
from __future__ import annotations

import random
from typing import Optional


def backoff_delay_s(
    attempt: int,
    *,
    base_s: float = 0.5,
    cap_s: float = 30.0,
    retry_after_s: Optional[float] = None,
    rng: Optional[random.Random] = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 = first retry).

    Exponential with "full jitter" (uniform in [0, base x 2^(attempt-1)], capped at ``cap_s``) so
    a fleet of workers that failed together does not retry together. A server's ``Retry-After``
    wins when given (also capped), because it knows its own recovery time.
    """
    if retry_after_s is not None and retry_after_s >= 0:
        return min(retry_after_s, cap_s)
    ceiling_s = min(cap_s, base_s * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(0.0, ceiling_s)
