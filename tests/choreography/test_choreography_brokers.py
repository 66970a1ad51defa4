"""The choreographed order flow over real RabbitMQ and NATS JetStream, tracked in a real saga log.

Each test runs the example's services (their own SQLite databases) and a tracker, checks the
run records the tracker wrote (status, timeline, results) and the services' databases
(every effect once, every failure undone).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from choreo_helpers import STOCK, Shop, effects, events_of, kinds, order

from sagaway import SagaStatus
from sagaway.choreography import emit_event


@pytest.fixture
async def shop(broker_url: str, tmp_path: Path) -> AsyncIterator[Shop]:
    s = Shop(broker_url, tmp_path)
    await s.open()
    try:
        yield s
    finally:
        await s.aclose()


async def test_success_completes_with_its_timeline(shop: Shop) -> None:
    run_id = await shop.place(order(1))
    (run,) = await shop.wait([run_id])

    assert run.status is SagaStatus.COMPLETED, run.error
    assert run.saga == shop.flow.name and run.version == 1
    assert events_of(run) == ["OrderCreated", "StockReserved", "PaymentCharged",
                              "ShippingArranged"]
    assert kinds(run) == [("run.started", None), ("step.started", "reserve_stock"),
                          ("step.succeeded", "reserve_stock"),
                          ("step.started", "charge_payment"),
                          ("step.succeeded", "charge_payment"),
                          ("step.started", "arrange_shipping"),
                          ("step.succeeded", "arrange_shipping"), ("run.finished", None)]
    assert run.input == order(1)
    assert run.results["arrange_shipping"]["tracking"] == f"TRK-{run_id[-8:]}"
    assert {k: v["status"] for k, v in (run.steps or {}).items()} == {
        "reserve_stock": "SUCCEEDED", "charge_payment": "SUCCEEDED",
        "arrange_shipping": "SUCCEEDED"}
    await shop.settle_outboxes()
    await asyncio.sleep(0.3)  # the orders service's notification
    assert effects(shop, run_id) == {"reservations": [(1, 0)], "payments": [(10, "charged")],
                                     "shipments": [("FR",)], "order": [("confirmed",)]}
    listed = await shop.reader.list(saga=shop.flow.name)
    assert [r.id for r in listed] == [run_id]
    assert (await shop.reader.counts(saga=shop.flow.name))[SagaStatus.COMPLETED] == 1


FAILURES = {
    # step that fails: (order changes, the events in the timeline, effects left)
    "reserve_stock": (
        {"qty": STOCK + 1},
        ["OrderCreated", "StockRejected"],
        {"reservations": [], "payments": [], "shipments": [], "order": [("cancelled",)]},
    ),
    "charge_payment": (
        {"amount": 5000},
        ["OrderCreated", "StockReserved", "PaymentFailed", "StockReleased"],
        {"reservations": [(1, 1)], "payments": [], "shipments": [],
         "order": [("cancelled",)]},
    ),
    "arrange_shipping": (
        {"country": "XX"},
        ["OrderCreated", "StockReserved", "PaymentCharged", "ShippingFailed",
         "PaymentRefunded", "StockReleased"],
        {"reservations": [(1, 1)], "payments": [(10, "refunded")], "shipments": [],
         "order": [("cancelled",)]},
    ),
}


@pytest.mark.parametrize("failing", list(FAILURES))
async def test_a_failure_at_each_step_is_compensated_by_the_right_events(
        amqp_url: str, tmp_path: Path, failing: str) -> None:
    changes, expected_events, expected_effects = FAILURES[failing]
    shop = await Shop(amqp_url, tmp_path).open()
    try:
        run_id = await shop.place(order(1, **changes))
        (run,) = await shop.wait([run_id])
        assert run.status is SagaStatus.COMPENSATED
        assert events_of(run) == expected_events
        assert run.error is not None and run.error.startswith(f"{failing} failed")
        failed = [h for h in run.history if h.kind == "step.failed"]
        assert [h.step for h in failed] == [failing]
        assert (run.steps or {})[failing]["status"] == "FAILED"
        undone = [h.step for h in run.history if h.kind == "compensation.succeeded"]
        assert undone == [s.name for s in shop.flow.cascade(shop.flow.step(failing).failure
                                                              or "")]
        await shop.settle_outboxes()
        await asyncio.sleep(0.3)
        assert effects(shop, run_id) == expected_effects
        audit = shop.audit([run])
        assert audit.ok, audit.problems
    finally:
        await shop.aclose()


async def test_duplicated_events_have_no_double_effect_and_one_history_entry(
        amqp_url: str, tmp_path: Path) -> None:
    # Every service and the starter publish each event twice (same envelope id), and a
    # second OrderCreated with a new id arrives too: still one reservation, one charge,
    # one shipment, and one timeline line per event.
    shop = await Shop(amqp_url, tmp_path, duplicate=True).open()
    try:
        ids = [await shop.place(order(i, **({"country": "XX"} if i % 2 else {})))
               for i in range(6)]
        await emit_event(shop.services["orders"].transport, shop.flow, "OrderCreated",
                         order(0), run_id=ids[0], event_id=uuid.uuid4().hex)
        runs = await shop.wait(ids)
        await shop.settle_outboxes()
        await asyncio.sleep(0.5)  # let the duplicates drain
        runs = [await shop.get(i) for i in ids]  # type: ignore[misc]
        for i, run in enumerate(runs):
            assert run is not None
            want = SagaStatus.COMPENSATED if i % 2 else SagaStatus.COMPLETED
            assert run.status is want, (run.id, run.error)
            ids_seen = [h.data["id"] for h in run.history if h.data and "id" in h.data]
            assert len(ids_seen) == len(set(ids_seen)), run.history
            events = events_of(run)
            assert len(events) == len(set(events))
            e = effects(shop, run.id)
            assert len(e["reservations"]) == 1 and len(e["order"]) == 1
            assert len(e["payments"]) == 1
            assert len(e["shipments"]) == (0 if i % 2 else 1)
        ignored = [h for h in runs[0].history if h.kind == "event.ignored"]  # type: ignore[union-attr]
        assert len(ignored) == 1 and ignored[0].data["event"] == "OrderCreated"
        audit = shop.audit([r for r in runs if r is not None])
        assert audit.ok, audit.problems
    finally:
        await shop.aclose()


async def test_a_service_down_for_a_while_finishes_the_saga_when_back(
        amqp_url: str, tmp_path: Path) -> None:
    shop = await Shop(amqp_url, tmp_path).open(without=("shipping",))
    try:
        ids = [await shop.place(order(i)) for i in range(5)]
        # Everything up to shipping happens; shipping's events wait in its queue.
        await shop.wait(ids, until=lambda r: "PaymentCharged" in events_of(r))
        await asyncio.sleep(1.0)
        for run_id in ids:
            run = await shop.get(run_id)
            assert run is not None and run.status is SagaStatus.RUNNING
            assert (run.steps or {})["arrange_shipping"]["status"] == "RUNNING"
        await shop.start_service("shipping")
        runs = await shop.wait(ids)
        assert all(r.status is SagaStatus.COMPLETED for r in runs)
        await shop.settle_outboxes()
        await asyncio.sleep(0.3)
        assert shop.audit(runs).ok
    finally:
        await shop.aclose()


async def test_a_run_is_reported_stuck_when_a_service_never_answers_then_recovers(
        amqp_url: str, tmp_path: Path) -> None:
    shop = await Shop(amqp_url, tmp_path, deadline=1.0).open(without=("payment",))
    try:
        run_id = await shop.place(order(1))
        (run,) = await shop.wait([run_id], until=lambda r: bool(r.error), timeout=15)
        assert run.status is SagaStatus.RUNNING
        assert run.error is not None and run.error.startswith("stuck: no event for")
        assert "after StockReserved" in run.error
        assert "waiting for payment (PaymentCharged or PaymentFailed)" in run.error
        stuck = [h for h in run.history if h.kind == "run.stuck"]
        assert len(stuck) == 1
        # updated_at stays the last event's time: the stuck_for filter finds it.
        found = await shop.reader.list(saga=shop.flow.name, stuck_for=0.5)
        assert [r.id for r in found] == [run_id]
        assert run.updated_at < stuck[0].at
        # Not reported twice while it stays stuck.
        await asyncio.sleep(1.5)
        again = await shop.get(run_id)
        assert again is not None and [h.kind for h in again.history].count("run.stuck") == 1
        # The service comes back: the run moves on and completes, no longer stuck.
        await shop.start_service("payment")
        (done,) = await shop.wait([run_id])
        assert done.status is SagaStatus.COMPLETED and done.error is None
        assert await shop.reader.list(saga=shop.flow.name, stuck_for=0.5) == []
    finally:
        await shop.aclose()
