"""Command steps: a step is a message to another service, sent through the outbox; the run
parks until the reply (or the step's deadline) wakes it. Memory transport, memory and SQLite
stores (see conftest)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

from integration_helpers import eventually, kinds

from sagaway import Invocation, Listener, Orchestrator, RetryPolicy, Saga, SagaStatus, Store
from sagaway.engine.relay import REPLY_TYPE
from sagaway.messaging import Delivery, Envelope
from sagaway.messaging.memory import MemoryTransport

FAST = RetryPolicy(max_attempts=2, initial_backoff=0.01)


class FakeService:
    """A participant that applies each idempotency key once and answers as told."""

    def __init__(self, transport: MemoryTransport, name: str) -> None:
        self.transport = transport
        self.name = name
        self.calls: list[tuple[str, str, int]] = []  # (command, key, attempt)
        self.effects: Counter[str] = Counter()
        self.answer: Callable[[Envelope], dict[str, Any] | None] = lambda env: {
            "ok": True, "result": {"done": env.type}}
        self.hold: asyncio.Event | None = None

    async def start(self) -> None:
        await self.transport.subscribe(self.name, self.handle)

    async def handle(self, delivery: Delivery) -> None:
        env = delivery.envelope
        attempt = int((env.correlation_id or "0").rsplit(":", 1)[1])
        self.calls.append((env.type, env.idempotency_key or "", attempt))
        self.effects[env.idempotency_key or ""] += 0  # seen
        if self.hold is not None:
            await self.hold.wait()
        body = self.answer(env)
        if body is None:  # the reply is lost
            return
        if body.get("ok"):
            self.effects[env.idempotency_key or ""] = 1  # applied once per key
        await self.transport.publish(env.reply_to or "", Envelope(
            type=REPLY_TYPE, payload=body, run_id=env.run_id, step=env.step,
            idempotency_key=env.idempotency_key, correlation_id=env.correlation_id))


def order_saga(timeout: float = 5.0) -> Saga:
    saga = Saga("order")
    saga.command_step("reserve", service="inventory", command="reserve",
                      compensation="release", timeout=timeout, retry=FAST)

    @saga.step(pivot=True)
    async def charge(ctx: Any, data: Any) -> str:
        if data.get("decline"):
            from sagaway import NonRetryableError

            raise NonRetryableError("card declined")
        return "charged"

    saga.command_step("ship", service="shipping", command="ship", timeout=timeout)
    return saga


async def services(transport: MemoryTransport) -> tuple[FakeService, FakeService]:
    inventory, shipping = FakeService(transport, "inventory"), FakeService(transport, "shipping")
    await inventory.start()
    await shipping.start()
    return inventory, shipping


async def test_a_command_step_parks_the_run_until_its_reply(store_url: str) -> None:
    transport = MemoryTransport()
    async with Orchestrator(store_url, sagas=[order_saga()], transport=transport,
                            poll_interval=0.05) as orch:
        inventory, shipping = await services(transport)
        inventory.hold = asyncio.Event()
        handle = await orch.start("order", {"sku": "A-1"})

        async def asked() -> bool:
            return bool(inventory.calls)

        await eventually(asked)
        # Nothing in this worker waits for the reply: the run is in the store only.
        assert handle.id not in orch._drivers
        parked = await orch.get(handle.id)
        assert parked.status is SagaStatus.RUNNING and parked.owner is None
        inventory.hold.set()
        done = await handle.wait(timeout=10)

    assert done.status is SagaStatus.COMPLETED
    assert done.results == {"reserve": {"done": "reserve"}, "charge": "charged",
                            "ship": {"done": "ship"}}
    assert inventory.calls == [("reserve", f"{done.id}:reserve:action", 1)]
    assert shipping.calls == [("ship", f"{done.id}:ship:action", 1)]


async def test_a_failed_pivot_sends_the_compensating_command(store_url: str) -> None:
    transport = MemoryTransport()
    async with Orchestrator(store_url, sagas=[order_saga()], transport=transport,
                            poll_interval=0.05) as orch:
        inventory, shipping = await services(transport)
        done = await (await orch.start("order", {"decline": True})).wait(timeout=10)
    assert done.status is SagaStatus.COMPENSATED
    assert [c[:2] for c in inventory.calls] == [
        ("reserve", f"{done.id}:reserve:action"),
        ("release", f"{done.id}:reserve:compensation"),
    ]
    assert shipping.calls == []


async def test_a_no_from_the_service_compensates(store_url: str) -> None:
    transport = MemoryTransport()
    saga = Saga("two")
    saga.command_step("reserve", service="inventory", compensation="release", retry=FAST)
    saga.command_step("pay", service="payments", compensation="refund", retry=FAST)
    async with Orchestrator(store_url, sagas=[saga], transport=transport,
                            poll_interval=0.05) as orch:
        inventory = FakeService(transport, "inventory")
        payments = FakeService(transport, "payments")
        payments.answer = lambda env: ({"ok": False, "error": "insufficient funds"}
                                       if env.type == "pay" else {"ok": True})
        await inventory.start()
        await payments.start()
        done = await (await orch.start("two", {})).wait(timeout=10)
    assert done.status is SagaStatus.COMPENSATED
    assert "insufficient funds" in (done.error or "")
    # A business "no" is not retried (the reply said retryable: false) and, not applied,
    # it is not compensated; reserve is.
    assert [c[0] for c in payments.calls] == ["pay"]
    assert [c[0] for c in inventory.calls] == ["reserve", "release"]


async def test_a_lost_reply_times_out_and_the_retry_reuses_the_key(store_url: str) -> None:
    transport = MemoryTransport()
    async with Orchestrator(store_url, sagas=[order_saga(timeout=0.3)], transport=transport,
                            poll_interval=0.05) as orch:
        inventory, _shipping = await services(transport)
        lost = {"n": 1}

        def answer(env: Envelope) -> dict[str, Any] | None:
            if env.type == "reserve" and lost["n"]:
                lost["n"] -= 1
                return None
            return {"ok": True, "result": env.type}

        inventory.answer = answer
        done = await (await orch.start("order", {})).wait(timeout=10)
    assert done.status is SagaStatus.COMPLETED
    assert [(c[0], c[2]) for c in inventory.calls] == [("reserve", 1), ("reserve", 2)]
    assert len({c[1] for c in inventory.calls}) == 1  # one idempotency key
    history = [(h.kind, h.step, h.attempt) for h in done.history]
    assert ("step.failed", "reserve", 1) in history


async def test_a_reply_after_the_deadline_does_not_resurrect_the_run(store_url: str) -> None:
    transport = MemoryTransport()
    saga = Saga("late")
    saga.command_step("reserve", service="inventory", compensation="release", timeout=0.2,
                      retry=RetryPolicy(max_attempts=1))
    async with Orchestrator(store_url, sagas=[saga], transport=transport,
                            poll_interval=0.05) as orch:
        inventory = FakeService(transport, "inventory")
        late: list[Envelope] = []
        inventory.answer = lambda env: (late.append(env), None)[1] if env.type == "reserve" \
            else {"ok": True}
        await inventory.start()
        done = await (await orch.start("late", {})).wait(timeout=10)
        assert done.status is SagaStatus.COMPENSATED
        # The service finally answers the timed-out attempt.
        [env] = late
        await transport.publish("sagaway.replies", Envelope(
            type=REPLY_TYPE, payload={"ok": True, "result": "reserved late"}, run_id=env.run_id,
            step=env.step, correlation_id=env.correlation_id))
        await asyncio.sleep(0.3)
        after = await orch.get(done.id)
    assert after.status is SagaStatus.COMPENSATED
    assert after.history == done.history
    # The timed-out reserve may have taken effect, so it was compensated.
    assert [c[0] for c in inventory.calls] == ["reserve", "release"]
    assert "step.succeeded" not in kinds(after)


async def test_a_command_committed_but_not_published_is_sent_after_a_restart(
        shared_store: Callable[[], str | Store]) -> None:
    transport = MemoryTransport()

    class Broken(MemoryTransport):
        async def publish_raw(self, destination: str, body: bytes, *,
                              message_id: str | None = None) -> None:
            from sagaway import TransportError

            raise TransportError("broker unreachable")

    down = Broken()
    async with Orchestrator(shared_store(), sagas=[order_saga()], transport=down,
                            lease_seconds=0.5, poll_interval=0.05) as first:
        handle = await first.start("order", {})
        await asyncio.sleep(0.2)
        stuck = await first.get(handle.id)
        assert stuck.status is SagaStatus.RUNNING
        assert await first.store.outbox_backlog() != (0, None)
    # A new worker (the broker is back): the relay publishes what was never confirmed.
    async with Orchestrator(shared_store(), sagas=[order_saga()], transport=transport,
                            lease_seconds=0.5, poll_interval=0.05) as second:
        inventory, _shipping = await services(transport)
        done = await second.wait(handle.id, timeout=10)
        assert await second.store.outbox_backlog() == (0, None)
    assert done.status is SagaStatus.COMPLETED
    assert inventory.effects[f"{done.id}:reserve:action"] == 1


async def test_a_saga_publishes_its_domain_event_when_it_ends(store_url: str) -> None:
    transport = MemoryTransport()
    saga = order_saga()
    saga.emits(destination="order-events", completed="OrderPlaced",
               compensated="OrderCancelled")
    seen: list[Envelope] = []

    async def collect(delivery: Delivery) -> None:
        seen.append(delivery.envelope)

    async with Orchestrator(store_url, sagas=[saga], transport=transport,
                            poll_interval=0.05) as orch:
        await services(transport)
        await transport.subscribe("order-events", collect)
        placed = await (await orch.start("order", {"n": 1})).wait(timeout=10)
        cancelled = await (await orch.start("order", {"decline": True})).wait(timeout=10)

        async def both() -> bool:
            return len(seen) == 2

        await eventually(both)
    by_run = {e.run_id: e for e in seen}
    assert by_run[placed.id].type == "OrderPlaced"
    assert by_run[placed.id].payload["results"]["charge"] == "charged"
    assert by_run[cancelled.id].type == "OrderCancelled"
    assert by_run[cancelled.id].payload["input"] == {"decline": True}
    assert by_run[cancelled.id].idempotency_key == f"{cancelled.id}:event"


def test_messages_without_a_transport_are_a_definition_error() -> None:
    import pytest

    from sagaway import DefinitionError

    with pytest.raises(DefinitionError, match=r"order.reserve, order.ship send messages"):
        Orchestrator("memory://", sagas=[order_saga()])
    # A client never sends them: it only records runs.
    Orchestrator("memory://", sagas=[order_saga()], worker=False)


class TraceHeaders(Listener):
    """Hands every attempt a header naming it, as a tracing listener would."""

    def __init__(self) -> None:
        self.invocations: list[Invocation] = []

    def on_invoke(self, invocation: Invocation) -> dict[str, str]:
        self.invocations.append(invocation)
        kind = "c" if invocation.compensating else "a"
        return {"traceparent": f"{invocation.step}-{kind}{invocation.attempt}"}


async def test_listener_headers_ride_on_commands_and_reach_local_steps(store_url: str) -> None:
    transport = MemoryTransport()
    seen: list[dict[str, str]] = []
    saga = order_saga()

    @saga.step(retriable=True)
    async def notify(ctx: Any, data: Any) -> None:
        seen.append(dict(ctx.headers))

    tracer = TraceHeaders()
    async with Orchestrator(store_url, sagas=[saga], transport=transport, poll_interval=0.05,
                            listeners=[tracer]) as orch:
        inventory, _shipping = await services(transport)
        envelopes: list[Envelope] = []
        answer = inventory.answer

        def record(env: Envelope) -> dict[str, Any] | None:
            envelopes.append(env)
            return answer(env)

        inventory.answer = record
        done = await (await orch.start("order", {"sku": "A-1"})).wait(timeout=10)
    assert done.status is SagaStatus.COMPLETED
    assert [e.headers.get("traceparent") for e in envelopes] == ["reserve-a1"]
    assert seen == [{"traceparent": "notify-a1"}]
    assert [(i.step, i.kind) for i in tracer.invocations] == [
        ("reserve", "command"), ("charge", "local"), ("ship", "command"), ("notify", "local")]
