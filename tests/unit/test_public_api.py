"""The public API is a promise: these tests make changing it a deliberate act."""

from __future__ import annotations

import sagaway
import sagaway.errors

EXPECTED_ALL = [
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

ISSUE_NAMES = [
    "Saga",
    "Orchestrator",
    "RetryPolicy",
    "StepContext",
    "SagaStatus",
    "SagaRun",
    "SagawayError",
    "DefinitionError",
    "UnknownSaga",
    "InvalidPayload",
    "PayloadTooLarge",
    "IdempotencyConflict",
]


def test_all_is_pinned() -> None:
    assert sagaway.__all__ == EXPECTED_ALL


def test_all_is_sorted_and_unique() -> None:
    assert sagaway.__all__ == sorted(sagaway.__all__)
    assert len(set(sagaway.__all__)) == len(sagaway.__all__)


def test_every_exported_name_resolves() -> None:
    missing = [name for name in sagaway.__all__ if not hasattr(sagaway, name)]
    assert missing == []


def test_names_promised_by_the_issue_are_exported() -> None:
    for name in ISSUE_NAMES:
        assert name in sagaway.__all__, name
        assert getattr(sagaway, name) is not None


def test_version_matches_the_distribution() -> None:
    from importlib.metadata import version

    assert sagaway.__version__ == version("sagaway")


def test_every_error_derives_from_sagaway_error() -> None:
    assert sagaway.errors.__all__, "errors.py must export its exceptions"
    for name in sagaway.errors.__all__:
        exc = getattr(sagaway.errors, name)
        assert isinstance(exc, type) and issubclass(exc, Exception), name
        assert issubclass(exc, sagaway.SagawayError), name
        # Every error is re-exported at the top level, as the same object.
        assert getattr(sagaway, name) is exc, name


def test_error_tree_matches_the_documented_one() -> None:
    assert issubclass(sagaway.PayloadTooLarge, sagaway.InvalidPayload)
    assert issubclass(sagaway.LeaseLost, sagaway.StoreError)
    assert issubclass(sagaway.WaitTimeout, TimeoutError)
    for name in (
        "DefinitionError",
        "UnknownSaga",
        "InvalidPayload",
        "IdempotencyConflict",
        "RunNotFound",
        "WaitTimeout",
        "StoreError",
        "OrchestratorClosed",
    ):
        assert getattr(sagaway, name).__bases__[0] is sagaway.SagawayError, name


def test_errors_carry_their_structured_fields() -> None:
    too_large = sagaway.PayloadTooLarge("too big", size=11, limit=10)
    assert (str(too_large), too_large.size, too_large.limit) == ("too big", 11, 10)
    conflict = sagaway.IdempotencyConflict("reused", run_id="r-1", key="k-1")
    assert (str(conflict), conflict.run_id, conflict.key) == ("reused", "r-1", "k-1")


def test_non_retryable_error_is_a_user_signal_not_a_sagaway_error() -> None:
    # Users raise it from their steps; it is not one of the errors sagaway raises.
    assert issubclass(sagaway.NonRetryableError, Exception)
    assert not issubclass(sagaway.NonRetryableError, sagaway.SagawayError)
