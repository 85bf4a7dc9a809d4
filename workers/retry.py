"""Retry timing: exponential backoff with full jitter, never sooner than the upstream asked."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_s(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    retry_after_s: float | None = None,
    rng: Callable[[], float] = random.random,
) -> float:
    """Delay before attempt `attempt + 1`. Capped at max_s, which stays below the broker's
    visibility timeout (a longer countdown would make Redis deliver the message twice)."""
    delay = rng() * min(max_s, base_s * 2 ** (attempt - 1))
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return min(delay, max_s)
