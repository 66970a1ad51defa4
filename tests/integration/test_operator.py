"""Operator actions: retry, force-compensate, resume, resolve — recorded, fenced, refused
when the run's state does not allow them. Memory and SQLite (see conftest)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from integration_helpers import eventually, kinds

from sagaway import (
    InvalidPayload,
    InvalidTransition,
    NonRetryableError,
    Orchestrator,
    RetryPolicy,
    RunNotFound,
    Saga,
    SagaStatus,
    StepContext,
    Store,
)

FAST = RetryPolicy(max_attempts=2, initial_backoff=0.01)


def shaky_saga(calls: list[tuple[str, int, Any]], broken: dict[str, bool]) -> Saga:
    """reserve (compensation may be broken) → charge (fails non-retryably on demand)."""
    saga = Saga("shaky")

    @saga.step(retry=FAST)
    async def reserve(ctx: StepContext, data: dict[str, Any]) -> dict[str, str]:
        calls.append(("reserve", ctx.attempt, None))
        return {"reservation": "r-1"}

    @reserve.compensation(retry=FAST)
    async def release(ctx: StepContext, data: dict[str, Any], result: Any) -> None:
        calls.append(("release", ctx.attempt, result))
        if broken["release"]:
            raise RuntimeError("inventory service down")

    @saga.step(retry=FAST)
    async def charge(ctx: StepContext, data: dict[str, Any]) -> None:
        calls.append(("charge", ctx.attempt, None))
        if broken["charge"]:
            raise NonRetryableError("card declined")

    @charge.compensation
    async def refund(ctx: StepContext, data: dict[str, Any], result: Any) -> None:
        calls.append(("refund", ctx.attempt, result))

    return saga


async def test_retry_a_failed_compensation_after_the_fault_is_fixed(store_url: str) -> None:
    calls: list[tuple[str, int, Any]] = []
    broken = {"release": True, "charge": True}
    async with Orchestrator(store_url, sagas=[shaky_saga(calls, broken)],
                            poll_interval=0.05) as orch:
        failed = await (await orch.start("shaky", {})).wait(timeout=10)
        assert failed.status is SagaStatus.FAILED
        assert [c[:2] for c in calls if c[0] == "release"] == [("release", 1), ("release", 2)]

        broken["release"] = False
        requested = await orch.retry(failed.id, reason="inventory is back", actor="ana")
        assert requested.request == {"action": "retry", "reason": "inventory is back",
                                     "actor": "ana", "at": requested.request["at"]}
        done = await orch.wait(failed.id, timeout=10)

    assert done.status is SagaStatus.COMPENSATED
    assert done.request is None
    # Attempt numbers keep counting; the policy gave the retry a fresh budget of 2.
    assert [c for c in calls if c[0] == "release"][-1] == ("release", 3, {"reservation": "r-1"})
    timeline = [(h.kind, h.step, h.attempt) for h in done.history]
    requested = kinds(done).index("operator.requested")
    assert timeline[requested:] == [
        ("operator.requested", None, None),
        ("operator.retry", None, None),
        ("compensation.started", "reserve", 3),
        ("compensation.succeeded", "reserve", 3),
        ("run.finished", None, None),
    ]
    entry = next(h for h in done.history if h.kind == "operator.retry")
    assert entry.data == {"actor": "ana", "reason": "inventory is back"}


async def test_actions_the_state_does_not_allow_are_refused_and_change_nothing(
        store_url: str) -> None:
    calls: list[tuple[str, int, Any]] = []
    broken = {"release": False, "charge": False}
    async with Orchestrator(store_url, sagas=[shaky_saga(calls, broken)]) as orch:
        done = await (await orch.start("shaky", {})).wait(timeout=10)
        assert done.status is SagaStatus.COMPLETED
        before = await orch.get(done.id)
        for action in (orch.retry, orch.resolve, orch.resume, orch.compensate):
            with pytest.raises(InvalidTransition, match=r"the run is COMPLETED") as info:
                await action(done.id, reason="why not", actor="bob")
            assert info.value.status == "COMPLETED"
        after = await orch.get(done.id)
        assert after.history == before.history
        assert after.updated_at == before.updated_at
        with pytest.raises(InvalidPayload, match="a reason is required"):
            await orch.retry(done.id, reason="  ", actor="bob")
        with pytest.raises(RunNotFound):
            await orch.retry("no-such-run", reason="x", actor="bob")


async def test_resolve_marks_a_failed_run_resolved(store_url: str) -> None:
    calls: list[tuple[str, int, Any]] = []
    broken = {"release": True, "charge": True}
    async with Orchestrator(store_url, sagas=[shaky_saga(calls, broken)],
                            poll_interval=0.05) as orch:
        failed = await (await orch.start("shaky", {})).wait(timeout=10)
        await orch.resolve(failed.id, reason="released by hand in the WMS", actor="ana")

        async def resolved() -> bool:
            return (await orch.get(failed.id)).status is SagaStatus.RESOLVED

        await eventually(resolved)
        run = await orch.get(failed.id)
        assert kinds(run)[-3:] == ["operator.requested", "operator.resolve", "run.finished"]
        assert run.history[-1].data == {"status": "RESOLVED"}
        assert [r.id for r in await orch.list(status=SagaStatus.RESOLVED)] == [failed.id]
        with pytest.raises(InvalidTransition, match="the run is RESOLVED"):
            await orch.retry(failed.id, reason="again", actor="ana")


async def test_force_compensate_a_run_stuck_in_a_step(store_url: str) -> None:
    gate = asyncio.Event()
    calls: list[tuple[str, Any]] = []
    saga = Saga("stuck")

    @saga.step
    async def book(ctx: StepContext, data: Any) -> str:
        calls.append(("book", ctx.attempt))
        return "booking-1"

    @book.compensation
    async def cancel(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("cancel", result))

    @saga.step
    async def pay(ctx: StepContext, data: Any) -> None:
        calls.append(("pay", ctx.attempt))
        await gate.wait()  # the payment provider never answers

    @pay.compensation
    async def refund(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("refund", result))

    async with Orchestrator(store_url, sagas=[saga], poll_interval=0.05) as orch:
        handle = await orch.start("stuck", {})
        async def paying() -> bool:
            return ("pay", 1) in calls

        await eventually(paying)
        await orch.compensate(handle.id, reason="provider outage, customer cancelled",
                              actor="ana")
        done = await orch.wait(handle.id, timeout=10)

    assert done.status is SagaStatus.COMPENSATED
    # The cut payment may have gone through: it is compensated (with no result), then book.
    assert calls[-2:] == [("refund", None), ("cancel", "booking-1")]
    history = kinds(done)
    forced = history.index("operator.compensate")
    assert history[forced:forced + 3] == ["operator.compensate", "step.interrupted",
                                          "run.compensating"]


async def test_resume_fires_a_long_retry_timer_now(store_url: str) -> None:
    attempts: list[int] = []
    saga = Saga("slow_retry")

    @saga.step(retry=RetryPolicy(max_attempts=3, initial_backoff=3600))
    async def flaky(ctx: StepContext, data: Any) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("try later")

    @flaky.compensation
    async def undo(ctx: StepContext, data: Any, result: Any) -> None:
        pass

    async with Orchestrator(store_url, sagas=[saga], poll_interval=0.05) as orch:
        handle = await orch.start("slow_retry", {})

        async def waiting() -> bool:
            return "step.retry_scheduled" in kinds(await orch.get(handle.id))

        await eventually(waiting)
        await orch.resume(handle.id, reason="the service is back", actor="ana")
        done = await orch.wait(handle.id, timeout=10)
    assert done.status is SagaStatus.COMPLETED
    assert attempts == [1, 2]


async def test_retry_a_step_after_the_pivot_that_exhausted_a_finite_policy(
        store_url: str) -> None:
    outage = {"on": True}
    saga = Saga("after_pivot")

    @saga.step(pivot=True)
    async def charge(ctx: StepContext, data: Any) -> None:
        return None

    @saga.step(retry=FAST)
    async def ship(ctx: StepContext, data: Any) -> str:
        if outage["on"]:
            raise RuntimeError("carrier down")
        return f"shipped on attempt {ctx.attempt}"

    async with Orchestrator(store_url, sagas=[saga], poll_interval=0.05) as orch:
        failed = await (await orch.start("after_pivot", {})).wait(timeout=10)
        assert failed.status is SagaStatus.FAILED
        outage["on"] = False
        await orch.retry(failed.id, reason="carrier back", actor="ana")
        done = await orch.wait(failed.id, timeout=10)
    assert done.status is SagaStatus.COMPLETED
    assert done.results["ship"] == "shipped on attempt 3"


async def test_a_client_records_the_request_and_a_worker_carries_it_out(
        shared_store: Callable[[], str | Store]) -> None:
    calls: list[tuple[str, int, Any]] = []
    broken = {"release": True, "charge": True}
    saga = shaky_saga(calls, broken)
    async with Orchestrator(shared_store(), sagas=[saga], poll_interval=0.05) as worker:
        failed = await (await worker.start("shaky", {})).wait(timeout=10)
        broken["release"] = False
        # The admin side: no definitions, no driving; it only records the request.
        async with Orchestrator(shared_store(), worker=False) as admin:
            await admin.retry(failed.id, reason="fixed", actor="ana")
            with pytest.raises(InvalidTransition, match=r"already pending|the run is"):
                await admin.retry(failed.id, reason="twice", actor="ana")
            done = await admin.wait(failed.id, timeout=10)
    assert done.status is SagaStatus.COMPENSATED
