"""sagaway: durable sagas for Python microservices.

The public API; everything else is internal unless documented.
"""

from sagaway.definition.retry import RetryPolicy
from sagaway.definition.saga import Saga, Step, StepContext, StepKind
from sagaway.definition.sensitive import Redactor, redact
from sagaway.engine.clock import Clock, SystemClock
from sagaway.engine.decider import OPERATOR_ALLOWED
from sagaway.engine.listener import Invocation, Listener, Transition
from sagaway.engine.runtime import NonRetryableError, Orchestrator, RunHandle
from sagaway.errors import (
    DefinitionError,
    IdempotencyConflict,
    InvalidPayload,
    InvalidTransition,
    LeaseLost,
    MalformedEnvelope,
    OrchestratorClosed,
    PayloadCodecError,
    PayloadTooLarge,
    RateLimited,
    RunNotFound,
    SagawayError,
    StoreError,
    TransportError,
    UnknownKey,
    UnknownSaga,
    UntrustedMessage,
    WaitTimeout,
)
from sagaway.run import HistoryEntry, SagaRun, SagaStatus
from sagaway.store import open_store
from sagaway.store.base import Store
from sagaway.store.memory import MemoryStore
from sagaway.store.sqlite import SQLiteStore

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - plain sorted(), as tests/unit/test_public_api.py pins it
    "Clock",
    "DefinitionError",
    "HistoryEntry",
    "IdempotencyConflict",
    "InvalidPayload",
    "InvalidTransition",
    "Invocation",
    "LeaseLost",
    "Listener",
    "MalformedEnvelope",
    "MemoryStore",
    "NonRetryableError",
    "OPERATOR_ALLOWED",
    "Orchestrator",
    "OrchestratorClosed",
    "PayloadCodecError",
    "PayloadTooLarge",
    "RateLimited",
    "Redactor",
    "RetryPolicy",
    "RunHandle",
    "RunNotFound",
    "SQLiteStore",
    "Saga",
    "SagaRun",
    "SagaStatus",
    "SagawayError",
    "Step",
    "StepContext",
    "StepKind",
    "Store",
    "StoreError",
    "SystemClock",
    "Transition",
    "TransportError",
    "UnknownKey",
    "UnknownSaga",
    "UntrustedMessage",
    "WaitTimeout",
    "open_store",
    "redact",
]
