"""Retries, non-retryable failures, timeouts and the forward-only path after the pivot."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from integration_helpers import timeline

from sagaway import (
    NonRetryableError,
    Orchestrator,
    RetryPolicy,
    Saga,
    SagaStatus,
    StepContext,
    StepKind,
)

FAST3 = RetryPolicy(max_attempts=3, initial_backoff=0.01)


async def test_failing_twice_then_succeeding_completes(store_url: str) -> None:
    seen: list[tuple[int, str]] = []
    saga = Saga("flaky")

    @saga.step(read_only=True, retry=FAST3)
    async def fetch(ctx: StepContext, data: Any) -> str:
        seen.append((ctx.attempt, ctx.idempotency_key))
        if ctx.attempt < 3:
            raise RuntimeError(f"boom {ctx.attempt}")
        return "ok"

    async with Orchestrator(store_url, sagas=[saga]) as orch:
        run = await orch.start("flaky")
        done = await run.wait(timeout=10)

    assert done.status is SagaStatus.COMPLETED
    assert done.results == {"fetch": "ok"}
    key = f"{run.id}:fetch:action"
    assert seen == [(1, key), (2, key), (3, key)]
    assert timeline(done) == [
        ("run.started", None, None),
        ("step.started", "fetch", 1),
        ("step.failed", "fetch", 1),
        ("step.retry_scheduled", "fetch", 2),
        ("step.started", "fetch", 2),
        ("step.failed", "fetch", 2),
        ("step.retry_scheduled", "fetch", 3),
        ("step.started", "fetch", 3),
        ("step.succeeded", "fetch", 3),
        ("run.finished", None, None),
    ]
    h = done.history
    assert h[2].data == {"error": "RuntimeError: boom 1", "retryable": True}
    assert h[5].data == {"error": "RuntimeError: boom 2", "retryable": True}
    # The waits follow the policy (10 ms, then 20 ms, less up to 10 % jitter), and the next
    # attempt starts no earlier than its durable timer.
    first_delay, second_delay = h[3].data["delay"], h[6].data["delay"]  # type: ignore[index]
    assert 0.009 <= first_delay <= 0.01
    assert 0.018 <= second_delay <= 0.02
    assert h[4].at >= h[3].at + first_delay - 1e-6
    assert h[7].at >= h[6].at + second_delay - 1e-6
    assert done.steps is not None
    assert done.steps["fetch"]["attempts"] == 3


def saga_with_failing_step(error: BaseException, policy: RetryPolicy,
                           calls: list[tuple[str, int, str]]) -> Saga:
    saga = Saga("nr")

    @saga.step
    async def before(ctx: StepContext, data: Any) -> str:
        calls.append(("before", ctx.attempt, ctx.idempotency_key))
        return "b"

    @before.compensation
    async def undo_before(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("undo before", ctx.attempt, ctx.idempotency_key))

    @saga.step(retry=policy)
    def refuse(ctx: StepContext, data: Any) -> None:
        calls.append(("refuse", ctx.attempt, ctx.idempotency_key))
        raise error

    @refuse.compensation
    def undo_refuse(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("undo refuse", ctx.attempt, ctx.idempotency_key))

    @saga.step(read_only=True)
    def after(ctx: StepContext, data: Any) -> None:
        calls.append(("after", ctx.attempt, ctx.idempotency_key))

    return saga


class Insufficient(ValueError):
    pass


@pytest.mark.parametrize(
    ("error", "policy", "described"),
    [
        (KeyError("sku"), RetryPolicy(max_attempts=3, initial_backoff=0.01,
                                      non_retryable=(KeyError,)), "KeyError: 'sku'"),
        (Insufficient("funds"), RetryPolicy(max_attempts=3, initial_backoff=0.01,
                                            non_retryable=(ValueError,)),
         "Insufficient: funds"),
        (NonRetryableError("out of stock"), FAST3, "NonRetryableError: out of stock"),
    ],
    ids=["policy-type", "policy-subclass", "NonRetryableError"],
)
async def test_non_retryable_fails_at_once_and_compensates(
        store_url: str, error: BaseException, policy: RetryPolicy, described: str) -> None:
    calls: list[tuple[str, int, str]] = []
    async with Orchestrator(store_url, sagas=[saga_with_failing_step(error, policy, calls)]
                            ) as orch:
        run = await orch.start("nr")
        done = await run.wait(timeout=10)

    assert done.status is SagaStatus.COMPENSATED
    assert done.error == f"step 'refuse' failed: {described}"
    assert calls == [
        ("before", 1, f"{run.id}:before:action"),
        ("refuse", 1, f"{run.id}:refuse:action"),
        ("undo before", 1, f"{run.id}:before:compensation"),
    ]
    assert timeline(done) == [
        ("run.started", None, None),
        ("step.started", "before", 1),
        ("step.succeeded", "before", 1),
        ("step.started", "refuse", 1),
        ("step.failed", "refuse", 1),
        ("step.gave_up", "refuse", 1),
        ("run.compensating", None, None),
        ("compensation.started", "before", 1),
        ("compensation.succeeded", "before", 1),
        ("run.finished", None, None),
    ]
    assert done.history[4].data == {"error": described, "retryable": False}
    assert done.history[6].data == {"reason": f"step 'refuse' failed: {described}"}
    assert done.history[-1].data == {"status": "COMPENSATED"}


async def test_exhausted_policy_compensates_previous_steps_in_reverse(store_url: str) -> None:
    calls: list[tuple[str, int, str]] = []
    results: list[Any] = []
    saga = Saga("exhaust")

    for name in ("a", "b"):
        async def action(ctx: StepContext, data: Any, name: str = name) -> str:
            calls.append((name, ctx.attempt, ctx.idempotency_key))
            return f"{name}-result"

        async def undo(ctx: StepContext, data: Any, result: Any, name: str = name) -> None:
            calls.append((f"undo {name}", ctx.attempt, ctx.idempotency_key))
            results.append(result)

        saga.step(name=name)(action).compensation(undo)

    @saga.step(retry=FAST3)
    async def c(ctx: StepContext, data: Any) -> None:
        calls.append(("c", ctx.attempt, ctx.idempotency_key))
        raise ConnectionError(f"down {ctx.attempt}")

    @c.compensation
    async def undo_c(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("undo c", ctx.attempt, ctx.idempotency_key))

    @saga.step(read_only=True)
    async def d(ctx: StepContext, data: Any) -> None:
        calls.append(("d", ctx.attempt, ctx.idempotency_key))

    async with Orchestrator(store_url, sagas=[saga]) as orch:
        run = await orch.start("exhaust")
        done = await run.wait(timeout=10)

    rid = run.id
    assert done.status is SagaStatus.COMPENSATED
    assert done.error == "step 'c' failed: ConnectionError: down 3"
    assert calls == [
        ("a", 1, f"{rid}:a:action"),
        ("b", 1, f"{rid}:b:action"),
        ("c", 1, f"{rid}:c:action"),
        ("c", 2, f"{rid}:c:action"),
        ("c", 3, f"{rid}:c:action"),
        ("undo b", 1, f"{rid}:b:compensation"),
        ("undo a", 1, f"{rid}:a:compensation"),
    ]
    assert results == ["b-result", "a-result"]
    assert timeline(done)[7:] == [
        ("step.retry_scheduled", "c", 2),
        ("step.started", "c", 2),
        ("step.failed", "c", 2),
        ("step.retry_scheduled", "c", 3),
        ("step.started", "c", 3),
        ("step.failed", "c", 3),
        ("step.gave_up", "c", 3),
        ("run.compensating", None, None),
        ("compensation.started", "b", 1),
        ("compensation.succeeded", "b", 1),
        ("compensation.started", "a", 1),
        ("compensation.succeeded", "a", 1),
        ("run.finished", None, None),
    ]


async def test_timed_out_step_is_compensated_as_possibly_applied(store_url: str) -> None:
    calls: list[tuple[str, int, Any]] = []
    saga = Saga("slow")

    @saga.step
    async def a(ctx: StepContext, data: Any) -> str:
        calls.append(("a", ctx.attempt, None))
        return "a-result"

    @a.compensation
    async def undo_a(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("undo a", ctx.attempt, result))

    @saga.step(timeout=0.05, retry=RetryPolicy(max_attempts=2, initial_backoff=0.01))
    async def t(ctx: StepContext, data: Any) -> str:
        calls.append(("t", ctx.attempt, ctx.idempotency_key))
        await asyncio.sleep(10)
        return "never"

    @t.compensation
    async def undo_t(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("undo t", ctx.attempt, (ctx.idempotency_key, result)))

    @saga.step
    async def z(ctx: StepContext, data: Any) -> None:
        calls.append(("z", ctx.attempt, None))

    @z.compensation
    async def undo_z(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("undo z", ctx.attempt, result))

    async with Orchestrator(store_url, sagas=[saga]) as orch:
        run = await orch.start("slow")
        done = await run.wait(timeout=10)

    rid = run.id
    assert done.status is SagaStatus.COMPENSATED
    assert done.error == "step 't' failed: timed out after 0.05s (may have taken effect)"
    assert calls == [
        ("a", 1, None),
        ("t", 1, f"{rid}:t:action"),
        ("t", 2, f"{rid}:t:action"),
        ("undo t", 1, (f"{rid}:t:compensation", None)),
        ("undo a", 1, "a-result"),
    ]
    assert timeline(done) == [
        ("run.started", None, None),
        ("step.started", "a", 1),
        ("step.succeeded", "a", 1),
        ("step.started", "t", 1),
        ("step.failed", "t", 1),
        ("step.retry_scheduled", "t", 2),
        ("step.started", "t", 2),
        ("step.failed", "t", 2),
        ("step.gave_up", "t", 2),
        ("run.compensating", None, None),
        ("compensation.started", "t", 1),
        ("compensation.succeeded", "t", 1),
        ("compensation.started", "a", 1),
        ("compensation.succeeded", "a", 1),
        ("run.finished", None, None),
    ]
    timed_out = {"error": "timed out after 0.05s (may have taken effect)", "retryable": True,
                 "maybe_applied": True}
    assert done.history[4].data == timed_out
    assert done.history[7].data == timed_out
    assert done.history[8].data == {"error": timed_out["error"], "maybe_applied": True}
    assert done.history[4].at - done.history[3].at >= 0.05


def after_pivot_saga(policy: RetryPolicy | None, failures: int,
                     calls: list[tuple[str, int, str]]) -> Saga:
    saga = Saga("ship")

    @saga.step
    async def reserve(ctx: StepContext, data: Any) -> str:
        calls.append(("reserve", ctx.attempt, ctx.idempotency_key))
        return "r"

    @reserve.compensation
    async def release(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("release", ctx.attempt, ctx.idempotency_key))

    @saga.step(pivot=True)
    def pay(ctx: StepContext, data: Any) -> str:
        calls.append(("pay", ctx.attempt, ctx.idempotency_key))
        return "paid"

    @saga.step(retry=policy)
    async def deliver(ctx: StepContext, data: Any) -> str:
        calls.append(("deliver", ctx.attempt, ctx.idempotency_key))
        if ctx.attempt <= failures:
            raise RuntimeError("no truck")
        return "delivered"

    return saga


async def test_after_pivot_a_finite_policy_that_exhausts_fails_the_run(store_url: str) -> None:
    calls: list[tuple[str, int, str]] = []
    saga = after_pivot_saga(RetryPolicy(max_attempts=2, initial_backoff=0.01), 99, calls)
    async with Orchestrator(store_url, sagas=[saga]) as orch:
        run = await orch.start("ship")
        done = await run.wait(timeout=10)

    rid = run.id
    error = ("step 'deliver' comes after the pivot and gave up after 2 "
             "attempt(s) (RuntimeError: no truck); the saga cannot compensate past its pivot, "
             "so it needs an operator")
    assert done.status is SagaStatus.FAILED
    assert done.error == error
    assert calls == [
        ("reserve", 1, f"{rid}:reserve:action"),
        ("pay", 1, f"{rid}:pay:action"),
        ("deliver", 1, f"{rid}:deliver:action"),
        ("deliver", 2, f"{rid}:deliver:action"),
    ]
    assert timeline(done)[5:] == [
        ("step.started", "deliver", 1),
        ("step.failed", "deliver", 1),
        ("step.retry_scheduled", "deliver", 2),
        ("step.started", "deliver", 2),
        ("step.failed", "deliver", 2),
        ("step.gave_up", "deliver", 2),
        ("run.finished", None, None),
    ]
    assert done.history[-1].data == {"status": "FAILED", "error": error}


async def test_after_pivot_the_default_policy_keeps_retrying(store_url: str) -> None:
    calls: list[tuple[str, int, str]] = []
    saga = after_pivot_saga(RetryPolicy(max_attempts=None, initial_backoff=0.01), 5, calls)
    async with Orchestrator(store_url, sagas=[saga]) as orch:
        run = await orch.start("ship")
        done = await run.wait(timeout=10)

    assert done.status is SagaStatus.COMPLETED
    assert done.results["deliver"] == "delivered"
    key = f"{run.id}:deliver:action"
    assert [c for c in calls if c[0] == "deliver"] == [("deliver", n, key) for n in range(1, 7)]
    assert not any(c[0] == "release" for c in calls)
    assert [e for e in timeline(done) if e[0] == "step.retry_scheduled"] == [
        ("step.retry_scheduled", "deliver", n) for n in range(2, 7)]

    # Declared without a policy, a step after the pivot is retriable with no attempt limit.
    default = after_pivot_saga(None, 0, [])
    default.validate()
    assert default["deliver"].kind is StepKind.RETRIABLE
    assert default["deliver"].retry.max_attempts is None
