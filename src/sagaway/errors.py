"""Every exception sagaway raises derives from :class:`SagawayError`.

The tree::

    SagawayError
    ├── DefinitionError          a saga definition is malformed (raised at registration)
    ├── UnknownSaga              no saga (or no such version) is registered under that name
    ├── InvalidPayload           an input or result is not JSON-serialisable
    │   └── PayloadTooLarge      the encoded payload is over the configured limit
    ├── IdempotencyConflict      a start key was reused with a different input
    ├── RunNotFound              no run with that id exists in the store
    ├── WaitTimeout              ``run.wait(timeout=…)`` ran out (also a ``TimeoutError``)
    ├── StoreError               the store failed or is unusable (driver errors are wrapped)
    │   └── LeaseLost            a write was fenced: another worker owns the run now
    └── OrchestratorClosed       the orchestrator was used outside ``async with`` / after close

Driver exceptions (sqlite3, asyncpg, …) are translated into these at the store port, so
user code never has to catch a backend's own exception types.
"""

from __future__ import annotations

__all__ = [
    "DefinitionError",
    "IdempotencyConflict",
    "InvalidPayload",
    "LeaseLost",
    "OrchestratorClosed",
    "PayloadTooLarge",
    "RunNotFound",
    "SagawayError",
    "StoreError",
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


class WaitTimeout(SagawayError, TimeoutError):
    """A run did not finish within the time given to ``wait``."""


class StoreError(SagawayError):
    """The saga store failed (I/O error, corrupt schema, lost connection)."""


class LeaseLost(StoreError):
    """A write was rejected because this worker no longer owns the run (fencing)."""


class OrchestratorClosed(SagawayError):
    """The orchestrator is not open: use ``async with Orchestrator(...)`` or ``await open()``."""
