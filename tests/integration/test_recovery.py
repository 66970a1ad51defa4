"""Runs outlive the worker that started them: crash recovery after the lease expires, graceful
hand-over on close, and runs of a definition version this worker does not know.

Each test puts two or three orchestrators on one saga log: a SQLite file, or one MemoryStore
object shared between them (see ``shared_store`` in conftest.py). The real SIGKILL test,
with separate processes, lives in tests/e2e.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from integration_helpers import eventually, timeline

from sagaway import (
    Orchestrator,
    Saga,
    SagaStatus,
    StepContext,
    Store,
    WaitTimeout,
)

StoreFactory = Callable[[], "str | Store"]


async def crash(orch: Orchestrator) -> None:
    """Make ``orch`` stop the way a killed process stops, without calling ``aclose``.

    A SIGKILLed worker runs none of its shutdown code: it does not release its leases,
    does not flush anything, does not write a last transition. What survives is exactly what
    the store already holds: the run, its last committed transition (here: step 2 started,
    attempt 1), and a lease in this worker's name that nobody renews any more. To get that
    in-process, we cancel every task the orchestrator runs (recovery poll, lease renewal,
    each run's driver with its in-flight invocations, the group committer) and close the
    store's connection as the OS would, skipping ``aclose``, which would release the leases
    (store.release_leases) and so turn the crash into a graceful hand-over.
    """
    orch._open = False
    background = list(orch._background)
    for task in background:
        task.cancel()
    drivers = list(orch._drivers.values())
    for d in drivers:
        orch._stop_driver(d)
    committer = orch._committer
    committer_task = committer._task if committer is not None else None
    if committer_task is not None:
        committer_task.cancel()
    await asyncio.gather(*background, *(d.task for d in drivers if d.task),
                         *([committer_task] if committer_task else []),
                         return_exceptions=True)
    if orch._threads is not None:
        orch._threads.shutdown(wait=False, cancel_futures=True)
    # Closing the connection does not touch the rows: the lease stays in the crashed name.
    await orch.store.aclose()


def blocking_saga(calls: list[tuple[str, int, str]], *, block_compensation: bool = False
                  ) -> Saga:
    """prepare -> hold -> finish; ``hold`` blocks forever on its first attempt.

    With ``block_compensation``, ``hold`` fails for good on attempt 2 instead and the
    compensation of ``prepare`` blocks forever on its first attempt.
    """
    saga = Saga("ship")

    @saga.step
    async def prepare(ctx: StepContext, data: Any) -> str:
        calls.append(("prepare", ctx.attempt, ctx.idempotency_key))
        return "prepared"

    @prepare.compensation
    async def unprepare(ctx: StepContext, data: Any, result: Any) -> None:
        calls.append(("unprepare", ctx.attempt, ctx.idempotency_key))
        if ctx.attempt == 1:
            await asyncio.Event().wait()  # never set: only a crash ends this attempt

    @saga.step(read_only=True)
    async def hold(ctx: StepContext, data: Any) -> str:
        calls.append(("hold", ctx.attempt, ctx.idempotency_key))
        if block_compensation:
            raise RuntimeError("refused")
        if ctx.attempt == 1:
            await asyncio.Event().wait()  # never set: only a crash ends this attempt
        return f"held on attempt {ctx.attempt}"

    @saga.step(read_only=True)
    async def finish(ctx: StepContext, data: Any) -> None:
        calls.append(("finish", ctx.attempt, ctx.idempotency_key))

    return saga


def called(calls: list[tuple[str, int, str]], entry: tuple[str, int]) -> Callable[[], Any]:
    async def check() -> bool:
        return any(c[:2] == entry for c in calls)
    return check


def called_at_all(calls: list[Any]) -> Callable[[], Any]:
    async def check() -> bool:
        return bool(calls)
    return check


async def read_run(orch: Orchestrator, run_id: str) -> Any:
    """The stored record, read through ``orch``'s (possibly not yet open) store."""
    await orch.store.open()
    return await orch.store.get_run(run_id)


async def test_a_crashed_workers_run_is_resumed_after_its_lease_expires(
        shared_store: StoreFactory) -> None:
    calls: list[tuple[str, int, str]] = []
    saga = blocking_saga(calls)
    a = Orchestrator(shared_store(), sagas=[saga], lease_seconds=0.5, poll_interval=0.05,
                     worker_id="worker-a")
    await a.open()
    run = await a.start("ship", {"order": 1})
    await eventually(called(calls, ("hold", 1)))
    await crash(a)

    b = Orchestrator(shared_store(), sagas=[saga], lease_seconds=0.5, poll_interval=0.05,
                     worker_id="worker-b")
    crashed = await read_run(b, run.id)
    assert crashed.status is SagaStatus.RUNNING
    assert crashed.owner == "worker-a"
    assert crashed.lease_expires > time.time()
    async with b:
        done = await b.wait(run.id, timeout=10)

    key = f"{run.id}:hold:action"
    assert done.status is SagaStatus.COMPLETED
    assert done.results == {"prepare": "prepared", "hold": "held on attempt 2", "finish": None}
    assert calls == [
        ("prepare", 1, f"{run.id}:prepare:action"),
        ("hold", 1, key),
        ("hold", 2, key),
        ("finish", 1, f"{run.id}:finish:action"),
    ]
    assert timeline(done) == [
        ("run.started", None, None),
        ("step.started", "prepare", 1),
        ("step.succeeded", "prepare", 1),
        ("step.started", "hold", 1),
        ("run.recovered", None, None),
        ("step.interrupted", "hold", 1),
        ("step.retry_scheduled", "hold", 2),
        ("step.started", "hold", 2),
        ("step.succeeded", "hold", 2),
        ("step.started", "finish", 1),
        ("step.succeeded", "finish", 1),
        ("run.finished", None, None),
    ]
    # Not before the crashed worker's lease ran out.
    assert done.history[4].at >= crashed.lease_expires
    assert done.owner is None


async def test_a_crash_during_compensation_resumes_the_compensation(
        shared_store: StoreFactory) -> None:
    calls: list[tuple[str, int, str]] = []
    saga = blocking_saga(calls, block_compensation=True)
    a = Orchestrator(shared_store(), sagas=[saga], lease_seconds=0.5, poll_interval=0.05,
                     worker_id="worker-a")
    await a.open()
    run = await a.start("ship")
    await eventually(called(calls, ("unprepare", 1)))
    await crash(a)

    b = Orchestrator(shared_store(), sagas=[saga], lease_seconds=0.5, poll_interval=0.05,
                     worker_id="worker-b")
    async with b:
        done = await b.wait(run.id, timeout=10)

    key = f"{run.id}:prepare:compensation"
    assert done.status is SagaStatus.COMPENSATED
    assert done.error == "step 'hold' failed: RuntimeError: refused"
    assert [c for c in calls if c[0] == "unprepare"] == [("unprepare", 1, key),
                                                         ("unprepare", 2, key)]
    assert timeline(done)[-7:] == [
        ("compensation.started", "prepare", 1),
        ("run.recovered", None, None),
        ("compensation.interrupted", "prepare", 1),
        ("compensation.retry_scheduled", "prepare", 2),
        ("compensation.started", "prepare", 2),
        ("compensation.succeeded", "prepare", 2),
        ("run.finished", None, None),
    ]


async def test_aclose_releases_leases_so_another_worker_resumes_at_once(
        shared_store: StoreFactory) -> None:
    calls: list[tuple[str, int, str]] = []
    saga = blocking_saga(calls)
    async with Orchestrator(shared_store(), sagas=[saga], lease_seconds=30,
                            poll_interval=0.05, worker_id="worker-a") as a:
        run = await a.start("ship")
        await eventually(called(calls, ("hold", 1)))
        assert (await a.get(run.id)).owner == "worker-a"

    b = Orchestrator(shared_store(), sagas=[saga], lease_seconds=30, poll_interval=0.05,
                     worker_id="worker-b")
    released = await read_run(b, run.id)
    assert released.status is SagaStatus.RUNNING
    assert (released.owner, released.lease_expires) == (None, None)
    started = time.monotonic()
    async with b:
        done = await b.wait(run.id, timeout=10)
    elapsed = time.monotonic() - started

    assert elapsed < 3  # the lease was 30 s: it did not have to run out
    assert done.status is SagaStatus.COMPLETED
    key = f"{run.id}:hold:action"
    assert [c for c in calls if c[0] == "hold"] == [("hold", 1, key), ("hold", 2, key)]
    assert timeline(done)[3:8] == [
        ("step.started", "hold", 1),
        ("run.recovered", None, None),
        ("step.interrupted", "hold", 1),
        ("step.retry_scheduled", "hold", 2),
        ("step.started", "hold", 2),
    ]


def versioned(version: int, calls: list[tuple[str, int, int]]) -> Saga:
    saga = Saga("order", version=version)

    @saga.step(read_only=True)
    async def work(ctx: StepContext, data: Any) -> str:
        calls.append((ctx.run_id, version, ctx.attempt))
        if version == 1 and ctx.attempt == 1:
            await asyncio.Event().wait()  # blocks until the worker goes away
        return f"v{version}"

    return saga


async def test_a_run_of_an_unregistered_version_waits_for_a_worker_that_knows_it(
        shared_store: StoreFactory) -> None:
    calls: list[tuple[str, int, int]] = []
    v1, v2 = versioned(1, calls), versioned(2, calls)

    async with Orchestrator(shared_store(), sagas=[v1], poll_interval=0.05) as a:
        old = await a.start("order", {"n": 1})
        await eventually(called_at_all(calls))
    # a closed gracefully, so old is unowned and claimable at once by any worker that can.

    async with Orchestrator(shared_store(), sagas=[v2], poll_interval=0.05) as b:
        before = await b.get(old.id)
        new = await b.start("order", {"n": 2})
        done_new = await new.wait(timeout=10)
        assert (done_new.status, done_new.version, done_new.results) == (
            SagaStatus.COMPLETED, 2, {"work": "v2"})
        await asyncio.sleep(0.3)  # several recovery polls go by
        assert not any(t.done() for t in b._background)  # the worker is alive
        stuck = await b.get(old.id)
        assert (stuck.status, stuck.version, stuck.owner) == (SagaStatus.RUNNING, 1, None)
        assert stuck.history == before.history  # b never touched it
        assert stuck.error == (
            "saga 'order' version 1 is not registered in this worker, so it cannot drive this "
            "run; deploy a worker that registers it")
        listed = {r.id: r for r in await b.list()}
        assert listed[old.id].error == stuck.error
        assert listed[new.id].error is None
        with pytest.raises(WaitTimeout):
            await b.wait(old.id, timeout=0.1)

    async with Orchestrator(shared_store(), sagas=[v1, v2], poll_interval=0.05) as c:
        done_old = await c.wait(old.id, timeout=10)
        assert (done_old.status, done_old.version, done_old.results, done_old.error) == (
            SagaStatus.COMPLETED, 1, {"work": "v1"}, None)
        assert "run.recovered" in [h.kind for h in done_old.history]
        newest = await c.start("order", {"n": 3})
        assert (await newest.wait(timeout=10)).version == 2
    assert [(v, attempt) for rid, v, attempt in calls if rid == old.id] == [(1, 1), (1, 2)]
