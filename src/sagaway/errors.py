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
    "PayloadTooLarge",
    "RunNotFound",
    "SagawayError",
    "StoreError",
    "TransportError",
    "UnknownSaga",
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
