"""Retry policies: how many attempts a step gets and how long to wait between them.

Pure: the delay before an attempt is a function of the policy, the attempt number and a
stable seed, so the decider can compute timers without reading a clock or a random source.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["DEFAULT_ACTION_RETRY", "DEFAULT_COMPENSATION_RETRY", "DEFAULT_RETRIABLE_RETRY",
           "RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a step (or a compensation) is retried.

    Attributes:
        max_attempts: total invocations allowed, the first included; ``None`` is unlimited.
            An invocation interrupted by a crash counts as an attempt.
        initial_backoff: seconds to wait before the second attempt.
        max_backoff: the cap on any single wait.
        multiplier: each wait is the previous one times this.
        jitter: fraction (0..1) of each wait that is randomised, spreading retries of many
            runs; the "random" part is derived from the idempotency key and attempt, so it
            is reproducible.
        non_retryable: exception types that fail the step at once, without another attempt.
    """

    max_attempts: int | None = 3
    initial_backoff: float = 0.1
    max_backoff: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.1
    non_retryable: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        # Imported here, not at module top, to keep this module free of cycles.
        from sagaway.errors import DefinitionError

        if self.max_attempts is not None and self.max_attempts < 1:
            raise DefinitionError(
                f"RetryPolicy.max_attempts must be at least 1 (or None for unlimited), "
                f"got {self.max_attempts}"
            )
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise DefinitionError("RetryPolicy backoffs must be >= 0 seconds")
        if self.multiplier < 1:
            raise DefinitionError(f"RetryPolicy.multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise DefinitionError(f"RetryPolicy.jitter must be within 0..1, got {self.jitter}")
        if isinstance(self.non_retryable, type):
            raise DefinitionError(
                f"RetryPolicy.non_retryable must be a tuple of exception types, e.g. "
                f"({self.non_retryable.__name__},), not a bare type"
            )
        if isinstance(self.non_retryable, Sequence) and not isinstance(self.non_retryable, tuple):
            object.__setattr__(self, "non_retryable", tuple(self.non_retryable))
        for exc in self.non_retryable:
            if not (isinstance(exc, type) and issubclass(exc, BaseException)):
                raise DefinitionError(
                    f"RetryPolicy.non_retryable must hold exception types, got {exc!r}"
                )

    def allows(self, attempt: int) -> bool:
        """Whether attempt number ``attempt`` (1-based) may be made."""
        return self.max_attempts is None or attempt <= self.max_attempts

    def delay(self, attempt: int, seed: str = "") -> float:
        """Seconds to wait after failed attempt ``attempt`` before the next one."""
        exponent = max(attempt - 1, 0)
        # Cap the exponent so huge attempt counts (unlimited policies) cannot overflow.
        try:
            base = min(self.max_backoff,
                       self.initial_backoff * self.multiplier ** min(exponent, 64))
        except OverflowError:
            base = self.max_backoff
        if self.jitter == 0 or base == 0:
            return base
        digest = hashlib.blake2b(f"{seed}:{attempt}".encode(), digest_size=8).digest()
        fraction = int.from_bytes(digest, "big") / 2**64
        return base * (1 - self.jitter * fraction)

    def is_non_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, self.non_retryable)


DEFAULT_ACTION_RETRY = RetryPolicy()
"""3 attempts, exponential backoff from 0.1 s capped at 10 s."""

DEFAULT_RETRIABLE_RETRY = RetryPolicy(max_attempts=None, initial_backoff=0.1, max_backoff=30.0)
"""After the pivot: unlimited attempts, backoff capped at 30 s."""

DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=20, initial_backoff=0.1, max_backoff=60.0)
"""20 attempts over roughly 15 minutes; then the run ends FAILED for an operator."""
