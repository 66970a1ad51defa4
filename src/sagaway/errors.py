"""Every exception sagaway raises derives from :class:`SagawayError`.

The tree::

    SagawayError
    ├── DefinitionError          a saga definition is malformed (raised at registration)
    ├── UnknownSaga              no saga (or no such version) is registered under that name
    ├── InvalidPayload           an input or result is not JSON-serialisable
    │   └── PayloadTooLarge      the encoded payload is over the configured limit
    ├── IdempotencyConflict      a start key was reused with a different input
    ├── RunNotFound              no run with that id exists in the store
    ├── InvalidTransition        an operator action the run's state does not allow
    ├── WaitTimeout              ``run.wait(timeout=…)`` ran out (also a ``TimeoutError``)
    ├── StoreError               the store failed or is unusable (driver errors are wrapped)
    │   └── LeaseLost            a write was fenced: another worker owns the run now
    ├── TransportError           a message broker failed or is unusable (driver errors are wrapped)
    ├── MalformedEnvelope        bytes received are not a sagaway message envelope (has a reason)
    │   └── UntrustedMessage     unsigned, forged, stale or replayed (signed envelopes on)
    ├── PayloadCodecError        an encrypted payload cannot be read (tampered, wrong place)
    │   └── UnknownKey           it was encrypted with a key id that is not configured
    ├── RateLimited              starts of a saga arrive faster than its start_rate allows
    └── OrchestratorClosed       the orchestrator was used outside ``async with`` / after close

Driver exceptions (sqlite3, asyncpg, aio-pika, nats-py, redis, …) are translated into these at
the store and transport ports, so user code never has to catch a backend's own exception types.
"""

from __future__ import annotations

__all__ = [
    "DefinitionError",
    "IdempotencyConflict",
    "InvalidPayload",
    "InvalidTransition",
    "LeaseLost",
    "MalformedEnvelope",
    "OrchestratorClosed",
    "PayloadCodecError",
    "PayloadTooLarge",
    "RateLimited",
    "RunNotFound",
    "SagawayError",
    "StoreError",
    "TransportError",
    "UnknownKey",
    "UnknownSaga",
    "UntrustedMessage",
    "WaitTimeout",
]


class SagawayError(Exception):
    """Root of every sagaway exception."""


class DefinitionError(SagawayError):
    """A saga definition is malformed; the message names the step and the fix."""


class UnknownSaga(SagawayError):
    """No saga definition is registered under that name (or that version)."""


class InvalidPayload(SagawayError):
    """A saga input or step result cannot be encoded as JSON."""


class PayloadTooLarge(InvalidPayload):
    """An encoded payload is larger than the configured ``max_payload_bytes``."""

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class IdempotencyConflict(SagawayError):
    """``start(..., key=K)`` was called again with the same key but a different input."""

    def __init__(self, message: str, *, run_id: str, key: str) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.key = key


class RunNotFound(SagawayError):
    """No run with that id exists in the store."""


class InvalidTransition(SagawayError):
    """An operator action the run's current state does not allow (HTTP 409)."""

    def __init__(self, message: str, *, run_id: str, status: str) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.status = status


class WaitTimeout(SagawayError, TimeoutError):
    """A run did not finish within the time given to ``wait``."""


class StoreError(SagawayError):
    """The saga store failed (I/O error, corrupt schema, lost connection)."""


class LeaseLost(StoreError):
    """A write was rejected because this worker no longer owns the run (fencing)."""


class TransportError(SagawayError):
    """A message transport failed: the broker is unreachable, refused a message or did not
    confirm it, or the transport is used before ``open()`` / after ``aclose()``."""


class MalformedEnvelope(SagawayError):
    """Bytes received are not a sagaway envelope; :attr:`reason` says what is wrong.

    A consumer never crashes on one: the transport dead-letters the bytes with the reason.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"malformed envelope: {reason}")
        self.reason = reason


class OrchestratorClosed(SagawayError):
    """The orchestrator is not open: use ``async with Orchestrator(...)`` or ``await open()``."""


class UntrustedMessage(MalformedEnvelope):
    """A message failed the signature check: ``kind`` is ``unsigned``, ``forged``
    (a bad signature or an unknown key id), ``stale`` (outside the time window) or
    ``replayed`` (the same signed message seen before). Dead-lettered at once."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind} message: {reason}")
        self.kind = kind


class PayloadCodecError(SagawayError):
    """An encrypted payload cannot be decrypted: tampered with, moved to another run or
    field, or not a payload this codec wrote."""


class UnknownKey(PayloadCodecError):
    """A payload was encrypted with a key id this process does not have configured."""

    def __init__(self, message: str, *, kid: str) -> None:
        super().__init__(message)
        self.kid = kid


class RateLimited(SagawayError):
    """Starts of a saga arrive faster than its ``start_rate`` allows (HTTP 429).

    ``retry_after`` is the seconds until a start would be accepted.
    """

    def __init__(self, message: str, *, saga: str, retry_after: float) -> None:
        super().__init__(message)
        self.saga = saga
        self.retry_after = retry_after
