"""Compensations that fail: retried by their own policy, and past it the run ends FAILED."""

from __future__ import annotations

from typing import Any

from integration_helpers import timeline

from sagaway import NonRetryableError, Orchestrator, RetryPolicy, Saga, SagaStatus, StepContext


def saga_with_shaky_compensation(calls: list[tuple[str, int, str, Any]], *, comp_failures: int,
                                 comp_policy: RetryPolicy) -> Saga:
    """first, reserve (compensation fails ``comp_failures`` times), then charge refuses."""
    saga = Saga("shaky")

    @saga.step
    async def first(ctx: StepContext, data: Any) -> str:
        return "first-result"

    @first.compensation
    async def undo_first(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("undo first", ctx.attempt, ctx.idempotency_key, result))

    @saga.step
    def reserve(ctx: StepContext, data: Any) -> dict[str, str]:
        return {"reservation": "r-1"}

    @reserve.compensation(retry=comp_policy)
    def release(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("release", ctx.attempt, ctx.idempotency_key, result))
        if ctx.attempt <= comp_failures:
            raise RuntimeError(f"warehouse down {ctx.attempt}")

    @saga.step(pivot=True)
    async def charge(ctx: StepContext, data: Any) -> None:
        raise NonRetryableError("declined")

    return saga


async def test_compensation_exhausted_ends_the_run_failed(store_url: str) -> None:
    calls: list[tuple[str, int, str, Any]] = []
    saga = saga_with_shaky_compensation(
        calls, comp_failures=99, comp_policy=RetryPolicy(max_attempts=2, initial_backoff=0.01))
    async with Orchestrator(store_url, sagas=[saga]) as orch:
        run = await orch.start("shaky")
        done = await run.wait(timeout=10)
        stored = await orch.get(run.id)

    error = "compensation of step 'reserve' failed after 2 attempts: RuntimeError: warehouse down 2"
    assert done.status is SagaStatus.FAILED
    assert done.error == error
    assert stored.status is SagaStatus.FAILED and stored.error == error
    key = f"{run.id}:reserve:compensation"
    assert [c[:3] for c in calls] == [("release", 1, key), ("release", 2, key)]
    # The operator takes over from here: the earlier step is left as it is, not undone.
    assert not any(c[0] == "undo first" for c in calls)
    assert timeline(done)[8:] == [
        ("run.compensating", None, None),
        ("compensation.started", "reserve", 1),
        ("compensation.failed", "reserve", 1),
        ("compensation.retry_scheduled", "reserve", 2),
        ("compensation.started", "reserve", 2),
        ("compensation.failed", "reserve", 2),
        ("compensation.gave_up", "reserve", 2),
        ("run.finished", None, None),
    ]
    assert done.history[-2].data == {"error": "RuntimeError: warehouse down 2"}
    assert done.history[-1].data == {"status": "FAILED", "error": error}
    assert stored.history == done.history


async def test_non_retryable_compensation_error_gives_up_at_once(store_url: str) -> None:
    calls: list[tuple[str, int, str, Any]] = []
    saga = saga_with_shaky_compensation(
        calls, comp_failures=99,
        comp_policy=RetryPolicy(max_attempts=5, initial_backoff=0.01,
                                non_retryable=(RuntimeError,)))
    async with Orchestrator(store_url, sagas=[saga]) as orch:
        done = await (await orch.start("shaky")).wait(timeout=10)
    assert done.status is SagaStatus.FAILED
    assert done.error == ("compensation of step 'reserve' failed after 1 attempts: "
                          "RuntimeError: warehouse down 1")
    assert [c[:2] for c in calls] == [("release", 1)]
    assert timeline(done)[-4:] == [
        ("compensation.started", "reserve", 1),
        ("compensation.failed", "reserve", 1),
        ("compensation.gave_up", "reserve", 1),
        ("run.finished", None, None),
    ]


async def test_compensation_retried_then_succeeding_compensates(store_url: str) -> None:
    calls: list[tuple[str, int, str, Any]] = []
    saga = saga_with_shaky_compensation(
        calls, comp_failures=1, comp_policy=RetryPolicy(max_attempts=3, initial_backoff=0.01))
    async with Orchestrator(store_url, sagas=[saga]) as orch:
        run = await orch.start("shaky")
        done = await run.wait(timeout=10)
    assert done.status is SagaStatus.COMPENSATED
    assert done.error == "step 'charge' failed: NonRetryableError: declined"
    key = f"{run.id}:reserve:compensation"
    assert [c[:3] for c in calls] == [("release", 1, key), ("release", 2, key),
                                      ("undo first", 1, f"{run.id}:first:compensation")]
    assert calls[2][3] == "first-result"


async def test_retried_compensation_gets_the_steps_result(store_url: str) -> None:
    calls: list[tuple[str, int, str, Any]] = []
    saga = saga_with_shaky_compensation(
        calls, comp_failures=1, comp_policy=RetryPolicy(max_attempts=3, initial_backoff=0.01))
    async with Orchestrator(store_url, sagas=[saga]) as orch:
        done = await (await orch.start("shaky")).wait(timeout=10)
    assert done.status is SagaStatus.COMPENSATED
    assert [(c[1], c[3]) for c in calls if c[0] == "release"] == [
        (1, {"reservation": "r-1"}), (2, {"reservation": "r-1"})]
