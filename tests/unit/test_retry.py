"""RetryPolicy: attempt budget, exponential capped backoff, deterministic jitter, validation."""

from __future__ import annotations

import dataclasses

import pytest

from sagaway import DefinitionError, RetryPolicy
from sagaway.definition.retry import (
    DEFAULT_ACTION_RETRY,
    DEFAULT_COMPENSATION_RETRY,
    DEFAULT_RETRIABLE_RETRY,
)


def test_defaults() -> None:
    p = RetryPolicy()
    assert (
        p.max_attempts,
        p.initial_backoff,
        p.max_backoff,
        p.multiplier,
        p.jitter,
        p.non_retryable,
    ) == (3, 0.1, 10.0, 2.0, 0.1, ())


def test_default_policies() -> None:
    assert RetryPolicy() == DEFAULT_ACTION_RETRY
    assert DEFAULT_RETRIABLE_RETRY.max_attempts is None
    assert DEFAULT_RETRIABLE_RETRY.max_backoff == 30.0
    assert DEFAULT_COMPENSATION_RETRY.max_attempts == 20
    assert DEFAULT_COMPENSATION_RETRY.max_backoff == 60.0


def test_policy_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RetryPolicy().max_attempts = 5  # type: ignore[misc]


# -- allows ----------------------------------------------------------------------------


def test_allows_counts_the_first_attempt() -> None:
    p = RetryPolicy(max_attempts=3)
    assert [p.allows(n) for n in (1, 2, 3, 4, 5)] == [True, True, True, False, False]


def test_single_attempt_policy_allows_no_retry() -> None:
    p = RetryPolicy(max_attempts=1)
    assert p.allows(1)
    assert not p.allows(2)


def test_unlimited_policy_allows_any_attempt() -> None:
    p = RetryPolicy(max_attempts=None)
    assert all(p.allows(n) for n in (1, 2, 100, 10**9))


# -- delay -----------------------------------------------------------------------------


def test_delay_is_exponential_without_jitter() -> None:
    p = RetryPolicy(initial_backoff=0.5, multiplier=3.0, max_backoff=1000.0, jitter=0.0)
    assert [p.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.5, 4.5, 13.5]


def test_delay_is_capped_at_max_backoff() -> None:
    p = RetryPolicy(initial_backoff=1.0, multiplier=2.0, max_backoff=5.0, jitter=0.0)
    assert [p.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_delay_for_attempt_zero_or_below_is_the_initial_backoff() -> None:
    p = RetryPolicy(initial_backoff=0.25, jitter=0.0)
    assert p.delay(0) == 0.25
    assert p.delay(-3) == 0.25


def test_multiplier_one_gives_a_constant_delay() -> None:
    p = RetryPolicy(initial_backoff=2.0, multiplier=1.0, max_backoff=10.0, jitter=0.0)
    assert {p.delay(n) for n in range(1, 20)} == {2.0}


def test_zero_backoff_is_zero_even_with_jitter() -> None:
    p = RetryPolicy(initial_backoff=0.0, jitter=1.0)
    assert p.delay(1, "seed") == 0.0
    assert p.delay(5, "seed") == 0.0


def test_huge_attempt_numbers_do_not_overflow() -> None:
    p = RetryPolicy(max_attempts=None, initial_backoff=0.1, max_backoff=30.0, jitter=0.0)
    assert p.delay(10**6) == 30.0
    assert p.delay(10**18) == 30.0


def test_large_multiplier_with_many_attempts_is_capped_not_overflowing() -> None:
    p = RetryPolicy(
        max_attempts=None, initial_backoff=1.0, multiplier=1e6, max_backoff=60.0, jitter=0.0
    )
    assert p.delay(60) == 60.0


@pytest.mark.parametrize("attempt", [1, 2, 3, 7, 50])
def test_jitter_is_deterministic(attempt: int) -> None:
    p = RetryPolicy(jitter=0.5, max_attempts=None)
    assert p.delay(attempt, "run-1:step:action") == p.delay(attempt, "run-1:step:action")
    # Equal policies (e.g. in two worker processes) agree too.
    assert RetryPolicy(jitter=0.5, max_attempts=None).delay(attempt, "run-1:step:action") == (
        p.delay(attempt, "run-1:step:action")
    )


@pytest.mark.parametrize("jitter", [0.1, 0.5, 1.0])
def test_jitter_stays_within_bounds(jitter: float) -> None:
    p = RetryPolicy(
        initial_backoff=1.0, multiplier=2.0, max_backoff=8.0, jitter=jitter, max_attempts=None
    )
    for attempt in range(1, 12):
        base = min(8.0, 2.0 ** (attempt - 1))
        for i in range(50):
            delay = p.delay(attempt, f"run-{i}:charge:action")
            assert base * (1 - jitter) <= delay <= base, (attempt, i, delay)


def test_jitter_spreads_different_seeds_and_attempts() -> None:
    p = RetryPolicy(initial_backoff=1.0, max_backoff=1.0, jitter=0.5)
    by_seed = {p.delay(1, f"run-{i}:charge:action") for i in range(100)}
    assert len(by_seed) == 100
    # The attempt is part of the seed: the same run does not repeat the same fraction.
    by_attempt = {p.delay(n, "run-1:charge:action") for n in range(1, 50)}
    assert len(by_attempt) == 49


def test_jitter_only_shortens_the_wait() -> None:
    p = RetryPolicy(initial_backoff=1.0, max_backoff=1.0, jitter=0.3)
    delays = [p.delay(1, f"s{i}") for i in range(200)]
    assert max(delays) <= 1.0
    assert min(delays) >= 0.7
    # Not degenerate: the spread uses most of the allowed range.
    assert max(delays) - min(delays) > 0.2


# -- non_retryable ---------------------------------------------------------------------


def test_is_non_retryable_matches_subclasses() -> None:
    p = RetryPolicy(non_retryable=(LookupError,))
    assert p.is_non_retryable(KeyError("k"))
    assert p.is_non_retryable(LookupError())
    assert not p.is_non_retryable(ValueError())


def test_empty_non_retryable_matches_nothing() -> None:
    assert not RetryPolicy().is_non_retryable(Exception())


def test_non_retryable_list_is_stored_as_a_tuple() -> None:
    p = RetryPolicy(non_retryable=[KeyError, ValueError])  # type: ignore[arg-type]
    assert p.non_retryable == (KeyError, ValueError)
    assert hash(p) == hash(RetryPolicy(non_retryable=(KeyError, ValueError)))


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, r"max_attempts must be at least 1 \(or None for unlimited\), got 0"),
        ({"max_attempts": -2}, r"max_attempts must be at least 1 .*got -2"),
        ({"initial_backoff": -0.1}, r"backoffs must be >= 0 seconds"),
        ({"max_backoff": -1.0}, r"backoffs must be >= 0 seconds"),
        ({"multiplier": 0.5}, r"multiplier must be >= 1, got 0.5"),
        ({"multiplier": 0}, r"multiplier must be >= 1, got 0"),
        ({"jitter": -0.01}, r"jitter must be within 0..1, got -0.01"),
        ({"jitter": 1.5}, r"jitter must be within 0..1, got 1.5"),
        ({"jitter": float("nan")}, r"jitter must be within 0..1, got nan"),
        (
            {"non_retryable": (ValueError, "KeyError")},
            r"non_retryable must hold exception types, got 'KeyError'",
        ),
        ({"non_retryable": (ValueError(),)}, r"non_retryable must hold exception types"),
        ({"non_retryable": (int,)}, r"non_retryable must hold exception types, got <class 'int'>"),
    ],
)
def test_bad_values_raise_definition_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 1},
        {"max_attempts": None},
        {"initial_backoff": 0.0, "max_backoff": 0.0},
        {"multiplier": 1.0},
        {"jitter": 0.0},
        {"jitter": 1.0},
        {"non_retryable": (KeyboardInterrupt, Exception)},
    ],
)
def test_edge_values_are_accepted(kwargs: dict[str, object]) -> None:
    RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_bare_exception_type_as_non_retryable_is_a_definition_error() -> None:
    with pytest.raises(DefinitionError, match="non_retryable"):
        RetryPolicy(non_retryable=ValueError)  # type: ignore[arg-type]
