"""Bad input gets a typed exception with a clear message, and nothing is written."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from decimal import Decimal
from typing import Any

import pytest
from integration_helpers import timeline
from pydantic import BaseModel

from sagaway import (
    DefinitionError,
    InvalidPayload,
    Orchestrator,
    OrchestratorClosed,
    PayloadTooLarge,
    Saga,
    SagaStatus,
    StepContext,
    UnknownSaga,
)


def echo_saga(seen: list[Any] | None = None) -> Saga:
    saga = Saga("echo")

    @saga.step(read_only=True)
    async def echo(ctx: StepContext, data: Any) -> Any:
        if seen is not None:
            seen.append(data)
        return data

    return saga


async def test_unknown_saga(store_url: str) -> None:
    async with Orchestrator(store_url, sagas=[echo_saga()]) as orch:
        with pytest.raises(UnknownSaga, match=re.escape(
                "no saga named 'nope' is registered with this orchestrator (registered: echo); "
                "pass it in Orchestrator(..., sagas=[...])")):
            await orch.start("nope", {"a": 1})
        assert await orch.list() == []


def _a_function() -> None:
    pass


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (object(), "the input of saga 'echo' is not JSON-serialisable (object): Unable to "
                   "serialize unknown type: <class 'object'>. Pass dicts, lists, str, numbers, "
                   "bools, None or pydantic models"),
        ({"callback": _a_function},
         "the input of saga 'echo' is not JSON-serialisable (dict): Unable to serialize "
         "unknown type: <class 'function'>. Pass dicts, lists, str, numbers, bools, None or "
         "pydantic models"),
        (float("nan"), "the input of saga 'echo' is not JSON-serialisable: Out of range float "
                       "values are not JSON compliant"),
        ({"price": [1.0, float("inf")]},
         "the input of saga 'echo' is not JSON-serialisable: Out of range float values are "
         "not JSON compliant"),
    ],
    ids=["object", "function", "nan", "nested-inf"],
)
async def test_input_not_json_serialisable(store_url: str, payload: Any, message: str) -> None:
    async with Orchestrator(store_url, sagas=[echo_saga()]) as orch:
        with pytest.raises(InvalidPayload) as ei:
            await orch.start("echo", payload)
        assert str(ei.value).startswith(message)
        assert type(ei.value) is InvalidPayload
        with pytest.raises(InvalidPayload, match=r"^key must be a non-empty string of at most "
                                                 r"512 characters$"):
            await orch.start("echo", {"ok": True}, key="")
        assert await orch.list() == []


async def test_input_over_the_size_limit(store_url: str) -> None:
    async with Orchestrator(store_url, sagas=[echo_saga()], max_payload_bytes=1000) as orch:
        with pytest.raises(PayloadTooLarge, match=re.escape(
                "the input of saga 'echo' is 2011 bytes encoded, over the limit of 1000 bytes; "
                "store large data elsewhere and pass a reference, or raise max_payload_bytes")
                ) as ei:
            await orch.start("echo", {"blob": "x" * 2000})
        assert (ei.value.size, ei.value.limit) == (2011, 1000)
        assert isinstance(ei.value, InvalidPayload)
        assert await orch.list() == []
        # Just under the limit is fine.
        done = await (await orch.start("echo", {"blob": "x" * 980})).wait(timeout=10)
        assert done.status is SagaStatus.COMPLETED


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (object(), "is not JSON-serialisable (object): Unable to serialize unknown type: "
                   "<class 'object'>"),
        ("y" * 2000, "is 2002 bytes encoded, over the limit of 1000 bytes"),
    ],
    ids=["not-json", "too-large"],
)
async def test_step_result_that_cannot_be_stored_fails_the_step_as_possibly_applied(
        store_url: str, bad: Any, why: str) -> None:
    calls: list[tuple[str, int, Any]] = []
    saga = Saga("bad-result")

    @saga.step
    async def first(ctx: StepContext, data: Any) -> str:
        return "first-result"

    @first.compensation
    async def undo_first(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("undo first", ctx.attempt, result))

    @saga.step
    def make(ctx: StepContext, data: Any) -> Any:
        calls.append(("make", ctx.attempt, None))
        return bad

    @make.compensation
    def unmake(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("unmake", ctx.attempt, result))

    async with Orchestrator(store_url, sagas=[saga], max_payload_bytes=1000) as orch:
        run = await orch.start("bad-result")
        done = await run.wait(timeout=10)
        # The worker is fine: the next run goes through the same path the same way.
        again = await (await orch.start("bad-result")).wait(timeout=10)

    assert done.status is SagaStatus.COMPENSATED
    assert again.status is SagaStatus.COMPENSATED
    assert done.error is not None
    assert done.error.startswith(f"step 'make' failed: the result of step 'make' {why}")
    assert calls[:3] == [("make", 1, None), ("unmake", 1, None),
                         ("undo first", 1, "first-result")]
    assert timeline(done) == [
        ("run.started", None, None),
        ("step.started", "first", 1),
        ("step.succeeded", "first", 1),
        ("step.started", "make", 1),
        ("step.failed", "make", 1),
        ("step.gave_up", "make", 1),
        ("run.compensating", None, None),
        ("compensation.started", "make", 1),
        ("compensation.succeeded", "make", 1),
        ("compensation.started", "first", 1),
        ("compensation.succeeded", "first", 1),
        ("run.finished", None, None),
    ]
    failed = done.history[4].data
    assert failed is not None
    assert (failed["retryable"], failed["maybe_applied"]) == (False, True)


async def test_start_before_open_and_after_close(store_url: str) -> None:
    orch = Orchestrator(store_url, sagas=[echo_saga()])
    message = re.escape("the orchestrator is not open: use `async with Orchestrator(...) as "
                        "orch:` or `await orch.open()`")
    with pytest.raises(OrchestratorClosed, match=message):
        await orch.start("echo", {"a": 1})
    async with orch:
        assert await orch.list() == []
    with pytest.raises(OrchestratorClosed, match=message):
        await orch.start("echo", {"a": 1})


def _no_compensation() -> Saga:
    saga = Saga("bad")

    @saga.step
    async def debit(ctx: StepContext, data: Any) -> None:
        pass

    return saga


def _compensation_after_pivot() -> Saga:
    saga = Saga("bad")

    @saga.step(pivot=True)
    async def pay(ctx: StepContext, data: Any) -> None:
        pass

    @saga.step
    async def ship(ctx: StepContext, data: Any) -> None:
        pass

    @ship.compensation
    async def unship(ctx: StepContext, data: Any, result: Any) -> None:
        pass

    return saga


def _twice() -> list[Any]:
    return [echo_saga(), echo_saga()]


@pytest.mark.parametrize(
    ("sagas", "message"),
    [
        (lambda: [_no_compensation()],
         "step 'debit' of saga 'bad' runs before the pivot, so it must be undoable: add "
         "@debit.compensation, or mark it read_only=True if it changes nothing, or "
         "retriable=True/pivot=True"),
        (lambda: [_compensation_after_pivot()],
         "step 'ship' of saga 'bad' is after the pivot, so it is never compensated; remove its "
         "compensation or move it before the pivot"),
        (lambda: [Saga("empty")],
         "saga 'empty' has no steps; declare at least one with @saga.step"),
        (_twice, "saga 'echo' version 1 is registered twice; bump the version of the newer "
                 "definition"),
        (lambda: ["echo"], "sagas must be Saga definitions, got 'echo'"),
    ],
    ids=["no-compensation", "compensation-after-pivot", "empty", "same-version-twice",
         "not-a-saga"],
)
async def test_invalid_definition_is_refused_by_the_constructor(
        store_url: str, sagas: Any, message: str) -> None:
    with pytest.raises(DefinitionError, match=f"^{re.escape(message)}$"):
        Orchestrator(store_url, sagas=sagas())


class Order(BaseModel):
    id: uuid.UUID
    amount: Decimal
    placed: dt.datetime
    tags: list[str]


async def test_pydantic_model_input_is_dumped_to_json(store_url: str) -> None:
    seen: list[Any] = []
    order = Order(id=uuid.UUID("12345678-1234-5678-1234-567812345678"), amount=Decimal("9.95"),
                  placed=dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC), tags=["a", "b"])
    expected = {"id": "12345678-1234-5678-1234-567812345678", "amount": "9.95",
                "placed": "2024-05-01T12:30:00Z", "tags": ["a", "b"]}
    assert order.model_dump(mode="json") == expected
    async with Orchestrator(store_url, sagas=[echo_saga(seen)]) as orch:
        run = await orch.start("echo", order)
        done = await run.wait(timeout=10)
        stored = await orch.get(run.id)
    assert seen == [expected]
    assert done.input == expected and stored.input == expected
    assert done.results == {"echo": expected}
    # An equal model under a key is the same input.
    async with Orchestrator(store_url, sagas=[echo_saga()]) as orch:
        first = await orch.start("echo", order, key="order-1")
        second = await orch.start("echo", Order.model_validate(expected), key="order-1")
        assert (second.id, second.created) == (first.id, False)
        await first.wait(timeout=10)

