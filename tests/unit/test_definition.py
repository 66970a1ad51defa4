"""Saga definitions: declaration, parallel groups, kind resolution and every DefinitionError."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from sagaway import DefinitionError, RetryPolicy, Saga, Step, StepContext, StepKind
from sagaway.definition.retry import (
    DEFAULT_ACTION_RETRY,
    DEFAULT_COMPENSATION_RETRY,
    DEFAULT_RETRIABLE_RETRY,
)
from sagaway.definition.saga import idempotency_key


def reserve(ctx: StepContext, data: Any) -> str:
    return "reservation-1"


def release(ctx: StepContext, data: Any, result: Any) -> None:
    return None


def act(ctx: StepContext, data: Any) -> None:
    return None


def undo(ctx: StepContext, data: Any, result: Any) -> None:
    return None


def compensated(saga: Saga, name: str, **options: Any) -> Step:
    """Declare a step named ``name`` with a compensation."""
    step: Step = saga.step(name=name, **options)(act)
    step.compensation(undo)
    return step


# -- declaration ----------------------------------------------------------------------


def test_step_defaults_and_registration_order() -> None:
    saga = Saga("orders")
    first = saga.step(reserve)
    first.compensation(release)
    second = compensated(saga, "charge")
    assert isinstance(first, Step)
    assert saga.steps == [first, second]
    assert saga.stages == [(first,), (second,)]
    assert saga["reserve"] is first
    assert list(saga) == [first, second]
    assert (first.name, first.action, first.compensation_fn) == ("reserve", reserve, release)
    assert (first.timeout, first.pivot, first.read_only, first.declared_retriable) == (
        None,
        False,
        False,
        False,
    )
    assert first.retry is DEFAULT_ACTION_RETRY
    assert first.compensation_retry is DEFAULT_COMPENSATION_RETRY
    assert first.kind is StepKind.COMPENSATABLE
    assert saga.version == 1
    assert repr(saga) == "<Saga orders v1: reserve -> charge>"
    assert repr(first) == "<Step orders.reserve compensatable>"
    saga.validate()


def test_unknown_step_lookup_raises_key_error() -> None:
    with pytest.raises(KeyError):
        Saga("orders")["nope"]


def test_step_stays_callable_for_unit_tests() -> None:
    saga = Saga("orders")
    step = saga.step(reserve)
    assert step(None, {}) == "reservation-1"


def test_is_async_reflects_the_action() -> None:
    saga = Saga("orders")

    async def fetch(ctx: StepContext, data: Any) -> None:
        return None

    assert saga.step(read_only=True)(fetch).is_async
    assert not saga.step(read_only=True)(act).is_async


def test_step_options_are_kept() -> None:
    saga = Saga("orders", version=3, description="take money")
    policy = RetryPolicy(max_attempts=7)
    step = saga.step(name="charge-card", retry=policy, timeout=2.5)(act)
    comp_policy = RetryPolicy(max_attempts=50)
    registered = step.compensation(retry=comp_policy, timeout=9.0)(undo)
    assert registered is undo
    assert (saga.version, saga.description) == (3, "take money")
    assert (step.name, step.retry, step.timeout) == ("charge-card", policy, 2.5)
    assert (step.compensation_fn, step.compensation_retry, step.compensation_timeout) == (
        undo,
        comp_policy,
        9.0,
    )


def test_compensation_timeout_defaults_to_the_step_timeout() -> None:
    saga = Saga("orders")
    step = saga.step(timeout=4.0)(act)
    step.compensation(undo)
    assert step.compensation_timeout == 4.0
    assert step.compensation_retry is DEFAULT_COMPENSATION_RETRY


def test_bare_compensation_decorator_returns_the_function() -> None:
    saga = Saga("orders")
    step = saga.step(reserve)
    assert step.compensation(release) is release


def test_idempotency_key_format() -> None:
    assert idempotency_key("r1", "charge", compensation=False) == "r1:charge:action"
    assert idempotency_key("r1", "charge", compensation=True) == "r1:charge:compensation"


# -- kinds ------------------------------------------------------------------------------


def test_kinds_are_resolved_by_validate() -> None:
    saga = Saga("orders")
    res = compensated(saga, "reserve")
    check = saga.step(name="check", read_only=True)(act)
    charge = saga.step(name="charge", pivot=True)(act)
    ship = saga.step(name="ship")(act)  # after the pivot, says nothing
    notify = saga.step(name="notify", retriable=True)(act)  # after the pivot, says retriable
    audit = saga.step(name="audit", read_only=True)(act)
    # Before validation the plain step after the pivot still looks compensatable ...
    assert ship.kind is StepKind.COMPENSATABLE
    assert ship.retry is DEFAULT_ACTION_RETRY
    saga.validate()
    assert [s.kind for s in (res, check, charge, ship, notify, audit)] == [
        StepKind.COMPENSATABLE,
        StepKind.COMPENSATABLE,
        StepKind.PIVOT,
        StepKind.RETRIABLE,
        StepKind.RETRIABLE,
        StepKind.RETRIABLE,
    ]
    # ... after it, every step past the pivot retries without limit by default.
    assert ship.retry is DEFAULT_RETRIABLE_RETRY
    assert notify.retry is DEFAULT_RETRIABLE_RETRY
    assert charge.retry is DEFAULT_ACTION_RETRY
    assert res.retry is DEFAULT_ACTION_RETRY


def test_declared_retry_wins_over_the_retriable_default() -> None:
    saga = Saga("orders")
    saga.step(name="charge", pivot=True)(act)
    policy = RetryPolicy(max_attempts=5)
    ship = saga.step(name="ship", retry=policy)(act)
    saga.validate()
    assert ship.kind is StepKind.RETRIABLE
    assert ship.retry is policy


def test_validate_is_idempotent() -> None:
    saga = Saga("orders")
    compensated(saga, "reserve")
    saga.step(name="charge", pivot=True)(act)
    ship = saga.step(name="ship")(act)
    saga.validate()
    saga.validate()
    assert ship.kind is StepKind.RETRIABLE


def test_saga_of_only_a_pivot_is_valid() -> None:
    saga = Saga("orders")
    saga.step(name="charge", pivot=True)(act)
    saga.validate()
    assert saga["charge"].kind is StepKind.PIVOT


def test_read_only_steps_need_no_compensation() -> None:
    saga = Saga("orders")
    saga.step(name="lookup", read_only=True)(act)
    saga.validate()
    assert saga["lookup"].kind is StepKind.COMPENSATABLE
    assert saga["lookup"].compensation_fn is None


def test_parallel_group_after_the_pivot_is_retriable() -> None:
    saga = Saga("orders")
    saga.step(name="charge", pivot=True)(act)
    a = saga.step(name="email")(act)
    b = saga.step(name="sms")(act)
    saga.parallel(a, b)
    saga.validate()
    assert (a.kind, b.kind) == (StepKind.RETRIABLE, StepKind.RETRIABLE)


# -- DefinitionError: steps -------------------------------------------------------------


def test_compensatable_step_without_compensation() -> None:
    saga = Saga("orders")
    saga.step(reserve)
    with pytest.raises(
        DefinitionError,
        match=r"^step 'reserve' of saga 'orders' runs before the pivot, so it must be undoable: "
        r"add @reserve\.compensation, or mark it read_only=True if it changes nothing, "
        r"or retriable=True/pivot=True$",
    ):
        saga.validate()


def test_missing_compensation_is_found_in_a_parallel_group() -> None:
    saga = Saga("orders")
    a = compensated(saga, "a")
    b = saga.step(name="b")(act)
    saga.parallel(a, b)
    with pytest.raises(DefinitionError, match=r"^step 'b' of saga 'orders' runs before the pivot"):
        saga.validate()


def test_missing_compensation_on_a_callable_object() -> None:
    saga = Saga("orders")
    saga.step(name="reserve")(functools.partial(act))
    with pytest.raises(DefinitionError, match=r"step 'reserve' .* must be undoable"):
        saga.validate()


def test_two_pivots() -> None:
    saga = Saga("orders")
    saga.step(name="charge", pivot=True)(act)
    with pytest.raises(
        DefinitionError,
        match=r"^saga 'orders' already has a pivot \('charge'\); a saga has at most one pivot, "
        r"so make 'ship' retriable or compensatable$",
    ):
        saga.step(name="ship", pivot=True)(act)
    assert [s.name for s in saga.steps] == ["charge"]


def test_duplicate_step_names() -> None:
    saga = Saga("orders")
    compensated(saga, "reserve")
    with pytest.raises(
        DefinitionError,
        match=r"^saga 'orders' already has a step named 'reserve'; step names must be unique "
        r"\(pass name=… to rename one\)$",
    ):
        saga.step(reserve)
    assert len(saga.steps) == 1
    assert len(saga.stages) == 1


def test_saga_with_no_steps() -> None:
    with pytest.raises(
        DefinitionError,
        match=r"^saga 'orders' has no steps; declare at least one with @saga\.step$",
    ):
        Saga("orders").validate()


def test_compensation_on_a_step_after_the_pivot() -> None:
    saga = Saga("orders")
    saga.step(name="charge", pivot=True)(act)
    compensated(saga, "ship")
    with pytest.raises(
        DefinitionError,
        match=r"^step 'ship' of saga 'orders' is after the pivot, so it is never compensated; "
        r"remove its compensation or move it before the pivot$",
    ):
        saga.validate()


def test_compensation_on_a_step_marked_retriable() -> None:
    saga = Saga("orders")
    compensated(saga, "notify", retriable=True)
    with pytest.raises(
        DefinitionError,
        match=r"^step 'notify' of saga 'orders' is marked retriable, so it is never compensated",
    ):
        saga.validate()


def test_compensation_on_the_pivot() -> None:
    saga = Saga("orders")
    pivot = saga.step(name="charge", pivot=True)(act)
    with pytest.raises(
        DefinitionError,
        match=r"^step 'charge' is the pivot \(the point of no return\) and cannot have a "
        r"compensation; make it an ordinary step or drop the compensation$",
    ):
        pivot.compensation(undo)
    assert pivot.compensation_fn is None


def test_compensation_on_a_read_only_step() -> None:
    saga = Saga("orders")
    lookup = saga.step(name="lookup", read_only=True)(act)
    with pytest.raises(
        DefinitionError,
        match=r"^step 'lookup' is read_only, so it has nothing to compensate; remove "
        r"read_only=True or the compensation$",
    ):
        lookup.compensation(undo)
    assert lookup.compensation_fn is None


def test_compensation_registered_twice() -> None:
    saga = Saga("orders")
    step = saga.step(reserve)
    step.compensation(release)
    with pytest.raises(
        DefinitionError,
        match=r"^step 'reserve' of saga 'orders' already has a compensation \(release\); "
        r"register only one$",
    ):
        step.compensation(undo)
    assert step.compensation_fn is release


def test_compensation_with_options_registered_twice() -> None:
    saga = Saga("orders")
    step = saga.step(reserve)
    step.compensation(retry=RetryPolicy(max_attempts=2))(release)
    with pytest.raises(DefinitionError, match="already has a compensation"):
        step.compensation(retry=RetryPolicy(max_attempts=9))(undo)
    assert step.compensation_retry == RetryPolicy(max_attempts=2)


def test_pivot_and_retriable_together() -> None:
    saga = Saga("orders")
    with pytest.raises(
        DefinitionError, match=r"^step 'charge' cannot be both pivot=True and retriable=True$"
    ):
        saga.step(name="charge", pivot=True, retriable=True)(act)


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_non_positive_timeout(timeout: float) -> None:
    with pytest.raises(DefinitionError, match=r"^step 'act': timeout must be > 0 seconds$"):
        Saga("orders").step(timeout=timeout)(act)


def test_retry_must_be_a_policy() -> None:
    with pytest.raises(DefinitionError, match=r"^step 'act': retry must be a RetryPolicy$"):
        Saga("orders").step(retry={"max_attempts": 3})(act)  # type: ignore[arg-type]


def test_action_must_be_callable() -> None:
    with pytest.raises(DefinitionError, match=r"^a saga step must be a function, got 42$"):
        Saga("orders").step(42)  # type: ignore[call-overload]


def test_compensation_must_be_callable() -> None:
    step = Saga("orders").step(reserve)
    with pytest.raises(
        DefinitionError, match=r"^compensation of step 'reserve' must be a function, got 'undo'$"
    ):
        step.compensation("undo")  # type: ignore[call-overload]


# -- DefinitionError: names -------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", "1orders", "-orders", "has space", "slash/name", "ünïcode", "x" * 129, "\norders"]
)
def test_bad_saga_names(name: str) -> None:
    with pytest.raises(
        DefinitionError,
        match=r"^saga name .* is not valid: use letters, digits, '_', '\.', '-' \(at most 128 "
        r"characters, starting with a letter or '_'\)$",
    ):
        Saga(name)


def test_trailing_newline_in_names_is_rejected() -> None:
    with pytest.raises(DefinitionError, match=r"^saga name 'orders\\n' is not valid"):
        Saga("orders\n")


def test_trailing_newline_in_step_names_is_rejected() -> None:
    with pytest.raises(DefinitionError, match=r"^step name 'act\\n' in saga 'orders'"):
        Saga("orders").step(name="act\n", read_only=True)(act)


@pytest.mark.parametrize("name", [None, 42, b"orders"])
def test_non_string_saga_names(name: object) -> None:
    with pytest.raises(DefinitionError, match=r"^saga name .* is not valid"):
        Saga(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["a", "_", "orders", "Orders.v2-eu_1", "x" * 128])
def test_good_saga_names(name: str) -> None:
    assert Saga(name).name == name


@pytest.mark.parametrize("version", [0, -1, True, "1", 1.0, None])
def test_bad_versions(version: object) -> None:
    with pytest.raises(
        DefinitionError, match=r"^saga 'orders': version must be a positive int, got "
    ):
        Saga("orders", version=version)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["has space", "1st", "a/b", "x" * 129])
def test_bad_step_names(name: str) -> None:
    saga = Saga("orders")
    with pytest.raises(
        DefinitionError,
        match=r"^step name .* in saga 'orders' is not valid; pass name=…$",
    ):
        saga.step(name=name)(act)
    assert saga.steps == []


def test_lambda_needs_a_name() -> None:
    saga = Saga("orders")
    with pytest.raises(
        DefinitionError, match=r"^step name '<lambda>' in saga 'orders' is not valid; pass name=…$"
    ):
        saga.step(lambda ctx, data: None)
    step = saga.step(name="inline", read_only=True)(lambda ctx, data: None)
    assert step.name == "inline"


def test_nameless_callable_needs_a_name() -> None:
    with pytest.raises(DefinitionError, match=r"^step name None in saga 'orders' is not valid"):
        Saga("orders").step(functools.partial(act))


# -- parallel ---------------------------------------------------------------------------


def test_parallel_merges_consecutive_steps_into_one_stage() -> None:
    saga = Saga("orders")
    a = compensated(saga, "a")
    b = compensated(saga, "b")
    c = compensated(saga, "c")
    d = compensated(saga, "d")
    e = compensated(saga, "e")
    saga.parallel(d, b, c)  # argument order does not matter; declaration order does
    assert saga.stages == [(a,), (b, c, d), (e,)]
    assert saga.steps == [a, b, c, d, e]
    saga.validate()


def test_two_parallel_groups() -> None:
    saga = Saga("orders")
    a, b, c, d = (compensated(saga, n) for n in "abcd")
    saga.parallel(a, b)
    saga.parallel(c, d)
    assert saga.stages == [(a, b), (c, d)]


@pytest.mark.parametrize("count", [0, 1])
def test_parallel_needs_two_steps(count: int) -> None:
    saga = Saga("orders")
    steps = [compensated(saga, "a")][:count]
    with pytest.raises(DefinitionError, match=r"^parallel\(\) needs at least two steps$"):
        saga.parallel(*steps)


def test_parallel_rejects_a_step_of_another_saga() -> None:
    saga, other = Saga("orders"), Saga("refunds")
    a = compensated(saga, "a")
    foreign = compensated(other, "b")
    with pytest.raises(
        DefinitionError,
        match=r"^parallel\(\) takes steps of saga 'orders', got <Step refunds\.b compensatable>$",
    ):
        saga.parallel(a, foreign)


def test_parallel_rejects_non_steps() -> None:
    saga = Saga("orders")
    a = compensated(saga, "a")
    with pytest.raises(DefinitionError, match=r"^parallel\(\) takes steps of saga 'orders', got"):
        saga.parallel(a, act)  # type: ignore[arg-type]


def test_parallel_rejects_the_pivot() -> None:
    saga = Saga("orders")
    a = compensated(saga, "a")
    pivot = saga.step(name="charge", pivot=True)(act)
    with pytest.raises(
        DefinitionError,
        match=r"^the pivot 'charge' cannot run in parallel with other steps; the point of no "
        r"return must be a single step$",
    ):
        saga.parallel(a, pivot)


def test_parallel_rejects_a_step_already_grouped() -> None:
    saga = Saga("orders")
    a, b, c = (compensated(saga, n) for n in "abc")
    saga.parallel(a, b)
    with pytest.raises(DefinitionError, match=r"^step 'b' is already in a parallel group$"):
        saga.parallel(b, c)
    assert saga.stages == [(a, b), (c,)]


def test_parallel_rejects_non_consecutive_steps() -> None:
    saga = Saga("orders")
    a, b, c = (compensated(saga, n) for n in "abc")
    with pytest.raises(
        DefinitionError,
        match=r"^parallel\(\) steps must be declared consecutively in saga 'orders': "
        r"\['a', 'c'\]$",
    ):
        saga.parallel(a, c)
    assert saga.stages == [(a,), (b,), (c,)]


def test_parallel_rejects_the_same_step_twice() -> None:
    saga = Saga("orders")
    a = compensated(saga, "a")
    compensated(saga, "b")
    with pytest.raises(DefinitionError, match=r"^parallel\(\) steps must be declared consec"):
        saga.parallel(a, a)
