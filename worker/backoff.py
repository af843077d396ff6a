"""Back-off between retries: exponential, with jitter, honouring Retry-After, never past a deadline."""

from __future__ import annotations

import random


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before attempt `attempt + 1` (attempt counts from 1).

    "Equal jitter": half of the exponential step is kept, the other half is random, so replicas that
    failed together spread out without any of them retrying at once. Retry-After is a floor.
    """
    step = min(cap, base * 2 ** max(0, attempt - 1))
    delay: float = step / 2 + (rng or random).uniform(0, step / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
