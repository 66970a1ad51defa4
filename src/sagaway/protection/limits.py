"""Flood limits: a token bucket per saga name for ``Orchestrator.start``.

Each saga name gets a bucket holding one second's worth of starts (at least one) that
refills continuously at its rate; a start takes one token or is refused with the time until
one is there (``RateLimited.retry_after``, the admin API's ``Retry-After``). The buckets
live in one process: with several API processes the total is their sum.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

__all__ = ["StartLimiter"]


class StartLimiter:
    """Token buckets by saga name.

    Args:
        rate: starts per second, for every saga (a number) or per name (a mapping; names
            not in it are not limited).
        clock: a monotonic clock in seconds (tests pass their own).
    """

    def __init__(self, rate: float | Mapping[str, float],
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        rates = {"*": rate} if isinstance(rate, int | float) else dict(rate)
        for name, value in rates.items():
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"start_rate for {name!r} must be a number of starts per "
                                 f"second > 0, got {value!r}")
        self._rates = {k: float(v) for k, v in rates.items()}
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)

    def rate(self, name: str) -> float:
        """The rate that applies to ``name`` (``inf``: not limited)."""
        return self._rates.get(name, self._rates.get("*", math.inf))

    def take(self, name: str) -> float:
        """Take a token for a start of ``name``: 0.0 if allowed, else seconds to wait."""
        rate = self.rate(name)
        if rate == math.inf:
            return 0.0
        capacity = max(1.0, rate)
        now = self._clock()
        tokens, at = self._buckets.get(name, (capacity, now))
        tokens = min(capacity, tokens + (now - at) * rate)
        if tokens >= 1.0:
            self._buckets[name] = (tokens - 1.0, now)
            return 0.0
        self._buckets[name] = (tokens, now)
        return (1.0 - tokens) / rate
