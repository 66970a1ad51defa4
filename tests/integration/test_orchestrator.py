"""The Orchestrator end to end on a real saga log: the quick-start, how steps are called,
parallel groups, idempotent starts, listeners, wait and get.

Every test runs against the memory store and a SQLite file (see conftest.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Any

import pytest
from integration_helpers import kinds, timeline

from sagaway import (
    IdempotencyConflict,
    Listener,
    NonRetryableError,
    Orchestrator,
    RunNotFound,
    Saga,
    SagaRun,
    SagaStatus,
    StepContext,
    Transition,
    WaitTimeout,
)


def order_saga(calls: list[tuple[str, Any]]) -> Saga:
    """The quick-start saga: async reserve (undoable), sync pivot charge, retriable shipping."""
    order = Saga("order")

    @order.step
    async def reserve_inventory(ctx: StepContext, data: dict[str, Any]) -> dict[str, Any]:
        calls.append(("reserve_inventory", ctx.idempotency_key))
        return {"reservation": f"res-{data['order_id']}"}

    @reserve_inventory.compensation
    async def release_inventory(ctx: StepContext, data: dict[str, Any], result: Any) -> None:
        calls.append(("release_inventory", (ctx.idempotency_key, result)))

    @order.step(pivot=True)
    def charge_payment(ctx: StepContext, data: dict[str, Any]) -> dict[str, Any]:
        calls.append(("charge_payment", ctx.idempotency_key))
        if data["amount"] > 1000:
            raise NonRetryableError("card declined")
        return {"charge": data["amount"]}

    @order.step(retriable=True)
    async def arrange_shipping(ctx: StepContext, data: dict[str, Any]) -> str:
        calls.append(("arrange_shipping", ctx.idempotency_key))
        return f"ship-{data['order_id']}"

    return order


SNAPSHOT_FIELDS = {"id", "saga", "version", "status", "input", "results", "error", "history",
                   "created_at", "updated_at"}


def assert_snapshot_shape(run: SagaRun) -> None:
    names = {f.name for f in dataclasses.fields(SagaRun)}
    assert names >= SNAPSHOT_FIELDS
    assert isinstance(run.id, str) and run.id
    assert run.saga == "order" and run.version == 1
    assert isinstance(run.status, SagaStatus)
    assert isinstance(run.results, dict)
    assert isinstance(run.history, tuple)
    assert isinstance(run.created_at, float) and isinstance(run.updated_at, float)
    assert run.created_at <= run.updated_at


COMPLETED_TIMELINE = [
    ("run.started", None, None),
    ("step.started", "reserve_inventory", 1),
    ("step.succeeded", "reserve_inventory", 1),
    ("step.started", "charge_payment", 1),
    ("step.succeeded", "charge_payment", 1),
    ("step.started", "arrange_shipping", 1),
    ("step.succeeded", "arrange_shipping", 1),
    ("run.finished", None, None),
]

DECLINED_TIMELINE = [
    ("run.started", None, None),
    ("step.started", "reserve_inventory", 1),
    ("step.succeeded", "reserve_inventory", 1),
    ("step.started", "charge_payment", 1),
    ("step.failed", "charge_payment", 1),
    ("step.gave_up", "charge_payment", 1),
    ("run.compensating", None, None),
    ("compensation.started", "reserve_inventory", 1),
    ("compensation.succeeded", "reserve_inventory", 1),
    ("run.finished", None, None),
]


async def test_quick_start(store_url: str) -> None:
    calls: list[tuple[str, Any]] = []
    order = order_saga(calls)
    async with Orchestrator(store_url, sagas=[order]) as orch:
        run = await orch.start("order", {"order_id": 42, "amount": 100})
        assert run.created is True and run.saga == "order"
        done = await run.wait(timeout=30)

        assert done.status is SagaStatus.COMPLETED
        assert done.error is None
        assert done.input == {"order_id": 42, "amount": 100}
        assert done.results["reserve_inventory"] == {"reservation": "res-42"}
        assert done.results == {
            "reserve_inventory": {"reservation": "res-42"},
            "charge_payment": {"charge": 100},
            "arrange_shipping": "ship-42",
        }
        assert timeline(done) == COMPLETED_TIMELINE
        assert done.history[0].data == {"saga": "order", "version": 1}
        assert done.history[-1].data == {"status": "COMPLETED"}
        stamps = [h.at for h in done.history]
        # Entries written by one transition share its timestamp; across transitions time moves on.
        assert stamps == sorted(stamps)
        assert stamps[0] < stamps[-1]
        assert stamps[0] >= done.created_at
        assert calls == [
            ("reserve_inventory", f"{run.id}:reserve_inventory:action"),
            ("charge_payment", f"{run.id}:charge_payment:action"),
            ("arrange_shipping", f"{run.id}:arrange_shipping:action"),
        ]
        assert_snapshot_shape(done)

        stored = await orch.get(run.id)
        assert stored.id == run.id
        assert stored.status is SagaStatus.COMPLETED
        assert stored.results == done.results
        assert stored.history == done.history
        assert stored.input == done.input
        assert stored.owner is None  # a finished run holds no lease
        assert_snapshot_shape(stored)

        # Two declined orders compensate; list() returns them newest first.
        declined = []
        for n in (1, 2):
            handle = await orch.start("order", {"order_id": n, "amount": 5000})
            result = await handle.wait(timeout=30)
            assert result.status is SagaStatus.COMPENSATED
            assert result.error == "step 'charge_payment' failed: NonRetryableError: card declined"
            assert timeline(result) == DECLINED_TIMELINE
            assert result.results == {"reserve_inventory": {"reservation": f"res-{n}"}}
            declined.append(handle.id)
        assert ("release_inventory", (f"{declined[0]}:reserve_inventory:compensation",
                                      {"reservation": "res-1"})) in calls

        compensated = await orch.list(status=SagaStatus.COMPENSATED)
        assert [r.id for r in compensated] == declined[::-1]
        everything = await orch.list()
        assert [r.id for r in everything] == [declined[1], declined[0], run.id]
        for listed in everything:
            assert_snapshot_shape(listed)
            assert listed.history == ()  # list() leaves the timeline out
        assert [r.id for r in await orch.list(status=[SagaStatus.COMPLETED])] == [run.id]


async def test_sync_steps_run_in_a_worker_thread_async_steps_on_the_loop(store_url: str) -> None:
    seen: dict[str, Any] = {}
    saga = Saga("threads")

    @saga.step(read_only=True)
    def sync_step(ctx: StepContext, data: Any) -> None:
        seen["sync"] = threading.current_thread()

    @saga.step(read_only=True)
    async def async_step(ctx: StepContext, data: Any) -> None:
        seen["async"] = threading.current_thread()
        seen["loop"] = asyncio.get_running_loop()

    async with Orchestrator(store_url, sagas=[saga]) as orch:
        done = await (await orch.start("threads")).wait(timeout=10)
    assert done.status is SagaStatus.COMPLETED
    assert seen["sync"] is not threading.main_thread()
    assert seen["sync"].name.startswith("sagaway-step")
    assert seen["async"] is threading.main_thread()
    assert seen["loop"] is asyncio.get_running_loop()


async def test_step_context_holds_earlier_results_and_the_input(store_url: str) -> None:
    contexts: list[StepContext] = []
    datas: list[Any] = []
    saga = Saga("ctx")

    @saga.step
    async def first(ctx: StepContext, data: Any) -> dict[str, int]:
        contexts.append(ctx)
        datas.append(data)
        return {"x": 1}

    @first.compensation
    async def undo_first(ctx: StepContext, data: Any, result: Any) -> None:
        raise AssertionError("not compensated")

    @saga.step(pivot=True)
    def second(ctx: StepContext, data: Any) -> list[int]:
        contexts.append(ctx)
        datas.append(data)
        return [2]

    @saga.step
    async def third(ctx: StepContext, data: Any) -> None:
        contexts.append(ctx)
        datas.append(data)

    payload = {"customer": "c-1", "items": [1, 2]}
    async with Orchestrator(store_url, sagas=[saga]) as orch:
        run = await orch.start("ctx", payload)
        done = await run.wait(timeout=10)
    assert done.status is SagaStatus.COMPLETED
    assert [dict(c.results) for c in contexts] == [{}, {"first": {"x": 1}},
                                                    {"first": {"x": 1}, "second": [2]}]
    assert datas == [payload, payload, payload]
    assert all(c.input == payload for c in contexts)
    assert [c.step for c in contexts] == ["first", "second", "third"]
    assert {(c.run_id, c.saga, c.attempt, c.compensating) for c in contexts} == {
        (run.id, "ctx", 1, False)}
    assert done.results == {"first": {"x": 1}, "second": [2], "third": None}


def parallel_saga(log: list[str], *, fail_b: bool) -> Saga:
    saga = Saga("fanout")
    barrier = asyncio.Barrier(3)

    @saga.step
    async def first(ctx: StepContext, data: Any) -> str:
        log.append("first")
        return "f"

    @first.compensation
    async def undo_first(ctx: StepContext, data: Any, result: Any) -> None:
        log.append(f"undo first {result} {ctx.idempotency_key.split(':', 1)[1]}")

    def member(name: str, delay: float) -> None:
        async def action(ctx: StepContext, data: Any) -> str:
            log.append(f"enter {name}")
            # Each waits for the other two to have entered: run one after another, they
            # would never get past this line.
            async with asyncio.timeout(5):
                await barrier.wait()
            await asyncio.sleep(delay)
            if name == "b" and fail_b:
                log.append("fail b")
                raise NonRetryableError("b says no")
            log.append(f"done {name}")
            return name.upper()

        async def undo(ctx: StepContext, data: Any, result: Any) -> None:
            log.append(f"undo {name} {result} {ctx.idempotency_key.split(':', 1)[1]}")

        step = saga.step(name=name)(action)
        step.compensation(undo)

    member("a", 0.1)
    member("b", 0.0)
    member("c", 0.15)
    saga.parallel(saga["a"], saga["b"], saga["c"])

    @saga.step(read_only=True)
    async def last(ctx: StepContext, data: Any) -> dict[str, Any]:
        log.append("last")
        return dict(ctx.results)

    return saga


async def test_parallel_group_runs_concurrently(store_url: str) -> None:
    log: list[str] = []
    async with Orchestrator(store_url, sagas=[parallel_saga(log, fail_b=False)]) as orch:
        done = await (await orch.start("fanout")).wait(timeout=10)
    assert done.status is SagaStatus.COMPLETED
    assert log[0] == "first"
    assert sorted(log[1:4]) == ["enter a", "enter b", "enter c"]
    assert log[4:] == ["done b", "done a", "done c", "last"]
    assert done.results["last"] == {"first": "f", "a": "A", "b": "B", "c": "C"}
    tl = timeline(done)
    # The three intents are written together, before any of them reports back.
    assert tl[3:6] == [("step.started", "a", 1), ("step.started", "b", 1),
                       ("step.started", "c", 1)]
    assert sorted(tl[6:9]) == [("step.succeeded", s, 1) for s in "abc"]
    assert tl[9:] == [("step.started", "last", 1), ("step.succeeded", "last", 1),
                      ("run.finished", None, None)]


async def test_parallel_failure_compensates_siblings_then_earlier_stages(store_url: str) -> None:
    log: list[str] = []
    async with Orchestrator(store_url, sagas=[parallel_saga(log, fail_b=True)]) as orch:
        run = await orch.start("fanout")
        done = await run.wait(timeout=10)
    assert done.status is SagaStatus.COMPENSATED
    assert done.error == "step 'b' failed: NonRetryableError: b says no"
    assert log[0] == "first"
    assert sorted(log[1:4]) == ["enter a", "enter b", "enter c"]
    # a and c are let finish; then both are undone (concurrently), then the earlier stage.
    assert log[4:7] == ["fail b", "done a", "done c"]
    assert sorted(log[7:9]) == ["undo a A a:compensation", "undo c C c:compensation"]
    assert log[9:] == ["undo first f first:compensation"]
    tl = timeline(done)
    assert ("step.started", "last", 1) not in tl
    assert not any(k.startswith("compensation") and s == "b" for k, s, _ in tl)
    assert tl[6:9] == [("step.failed", "b", 1), ("step.gave_up", "b", 1),
                       ("run.compensating", None, None)]
    assert tl[9:11] == [("step.succeeded", "a", 1), ("step.succeeded", "c", 1)]
    assert tl[11:13] == [("compensation.started", "a", 1), ("compensation.started", "c", 1)]
    assert sorted(tl[13:15]) == [("compensation.succeeded", "a", 1),
                                 ("compensation.succeeded", "c", 1)]
    assert tl[15:] == [("compensation.started", "first", 1),
                       ("compensation.succeeded", "first", 1),
                       ("run.finished", None, None)]


def two_sagas() -> list[Saga]:
    sagas = []
    for name in ("alpha", "beta"):
        saga = Saga(name)

        @saga.step(read_only=True)
        async def only(ctx: StepContext, data: Any) -> Any:
            return data

        sagas.append(saga)
    return sagas


async def test_idempotent_start(store_url: str) -> None:
    async with Orchestrator(store_url, sagas=two_sagas()) as orch:
        first = await orch.start("alpha", {"n": 1}, key="k")
        await first.wait(timeout=10)
        again = await orch.start("alpha", {"n": 1}, key="k")
        assert again.id == first.id
        assert (first.created, again.created) == (True, False)
        assert (await again.wait(timeout=10)).status is SagaStatus.COMPLETED
        assert len(await orch.list()) == 1

        with pytest.raises(IdempotencyConflict,
                           match=rf"^key 'k' already started run {first.id} of saga 'alpha' "
                                 r"with a different input; use a new key for a new run$") as ei:
            await orch.start("alpha", {"n": 2}, key="k")
        assert (ei.value.run_id, ei.value.key) == (first.id, "k")
        assert [r.id for r in await orch.list()] == [first.id]
        assert (await orch.get(first.id)).input == {"n": 1}

        other = await orch.start("beta", {"n": 2}, key="k")
        assert other.created is True and other.id != first.id
        assert (await other.wait(timeout=10)).results == {"only": {"n": 2}}
        assert [r.id for r in await orch.list()] == [other.id, first.id]
        assert (await orch.get(other.id)).idempotency_key == "k"

        # Concurrent starts with one key (one group-commit batch) still make one run.
        racers = await asyncio.gather(*(orch.start("alpha", {"n": 3}, key="race")
                                        for _ in range(5)))
        assert len({h.id for h in racers}) == 1
        assert sorted(h.created for h in racers) == [False, False, False, False, True]
        await racers[0].wait(timeout=10)
        assert len(await orch.list()) == 3


class Recorder(Listener):
    def __init__(self) -> None:
        self.transitions: list[Transition] = []

    def on_transition(self, transition: Transition) -> None:
        self.transitions.append(transition)


class Broken(Listener):
    def on_transition(self, transition: Transition) -> None:
        raise RuntimeError("listener bug")


async def test_listener_sees_every_transition_in_order(
        store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[str, Any]] = []
    recorder = Recorder()
    caplog.set_level(logging.ERROR, logger="sagaway.engine")
    async with Orchestrator(store_url, sagas=[order_saga(calls)],
                            listeners=[Broken(), recorder]) as orch:
        run = await orch.start("order", {"order_id": 7, "amount": 10})
        done = await run.wait(timeout=10)
        stored = await orch.get(run.id)
    assert done.status is SagaStatus.COMPLETED
    ts = recorder.transitions
    assert [t.seq for t in ts] == list(range(1, len(ts) + 1))
    assert {(t.run_id, t.saga, t.version) for t in ts} == {(run.id, "order", 1)}
    assert [e for t in ts for e in t.entries] == list(stored.history)
    assert [t.status for t in ts] == [SagaStatus.RUNNING] * (len(ts) - 1) + [
        SagaStatus.COMPLETED]
    # The first transition is the start with the first intent; each later one is a result
    # together with the next intent.
    assert [[e.kind for e in t.entries] for t in ts] == [
        ["run.started", "step.started"],
        ["step.succeeded", "step.started"],
        ["step.succeeded", "step.started"],
        ["step.succeeded", "run.finished"],
    ]
    failures = [r for r in caplog.records if "listener" in r.getMessage()]
    assert len(failures) == len(ts)
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in failures)


async def test_wait_timeout_and_unknown_run(store_url: str) -> None:
    release = asyncio.Event()
    saga = Saga("blocked")

    @saga.step(read_only=True)
    async def hold(ctx: StepContext, data: Any) -> str:
        await release.wait()
        return "released"

    async with Orchestrator(store_url, sagas=[saga]) as orch:
        run = await orch.start("blocked")
        with pytest.raises(WaitTimeout, match=rf"^run {run.id} did not finish within 0.05s$") as ei:
            await run.wait(timeout=0.05)
        assert isinstance(ei.value, TimeoutError)
        assert (await orch.get(run.id)).status is SagaStatus.RUNNING
        release.set()
        done = await run.wait(timeout=10)
        assert done.results == {"hold": "released"}
        assert kinds(done) == ["run.started", "step.started", "step.succeeded", "run.finished"]

        with pytest.raises(RunNotFound, match=r"^no saga run with id 'no-such-run'$"):
            await orch.get("no-such-run")
