"""The tracker's projection, pure: events (in any order, duplicated, unknown) → a run record."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from examples.ecommerce.choreography.flow import order_flow

from sagaway import SagaStatus
from sagaway.choreography.projection import Projection, awaited, project, stuck_reason

FLOW = order_flow()

PATHS = {
    "completed": ["OrderCreated", "StockReserved", "PaymentCharged", "ShippingArranged"],
    "rejected": ["OrderCreated", "StockRejected"],
    "declined": ["OrderCreated", "StockReserved", "PaymentFailed", "StockReleased"],
    "unshippable": ["OrderCreated", "StockReserved", "PaymentCharged", "ShippingFailed",
                    "PaymentRefunded", "StockReleased"],
}
FINAL = {"completed": SagaStatus.COMPLETED, "rejected": SagaStatus.COMPENSATED,
         "declined": SagaStatus.COMPENSATED, "unshippable": SagaStatus.COMPENSATED}


def feed(events: list[str], state: dict[str, Any] | None = None,
         ids: list[str] | None = None) -> tuple[dict[str, Any] | None, list[Projection]]:
    out = []
    for i, event in enumerate(events):
        payload: dict[str, Any] = {"from": event}
        if event in ("StockRejected", "PaymentFailed", "ShippingFailed"):
            payload["error"] = f"{event} because"
        p = project(FLOW, state, event=event, event_id=(ids[i] if ids else event),
                    payload=payload, at=100.0 + i, received_at=200.0 + i)
        if p.entries:
            state = p.state
        out.append(p)
    return state, out


@pytest.mark.parametrize("path", list(PATHS))
def test_each_path_ends_in_its_status(path: str) -> None:
    state, steps = feed(PATHS[path])
    assert steps[-1].status is FINAL[path]
    assert [p.status for p in steps[:-1]] == [
        SagaStatus.COMPENSATING if any(e in PATHS[path][: i + 1]
                                       for e in ("StockRejected", "PaymentFailed",
                                                 "ShippingFailed"))
        else SagaStatus.RUNNING
        for i in range(len(steps) - 1)]
    assert state is not None and state["status"] == FINAL[path].value
    finished = [e for p in steps for e in p.entries if e.kind == "run.finished"]
    assert len(finished) == 1 and finished[0].data == (
        {"status": FINAL[path].value} if path == "completed"
        else {"status": FINAL[path].value, "error": steps[-1].error})


@pytest.mark.parametrize("path", ["completed", "declined", "unshippable"])
def test_the_status_does_not_depend_on_the_order_events_arrive_in(path: str) -> None:
    events = PATHS[path]
    expected = feed(events)[0]
    assert expected is not None
    for order in itertools.permutations(events):
        state, steps = feed(list(order))
        assert state is not None
        assert state["status"] == expected["status"], order
        assert state["steps"] == expected["steps"], order
        assert sum(e.kind == "run.finished" for p in steps for e in p.entries) == 1, order


def test_a_repeated_envelope_adds_nothing_and_another_copy_is_ignored_once() -> None:
    state, _ = feed(["OrderCreated", "StockReserved"])
    again = project(FLOW, state, event="StockReserved", event_id="StockReserved",
                    payload={}, at=1, received_at=2)
    assert again.entries == [] and again.state == state
    other = project(FLOW, state, event="StockReserved", event_id="another-id", payload={},
                    at=1, received_at=2)
    assert [e.kind for e in other.entries] == ["event.ignored"]
    assert other.entries[0].data == {"event": "StockReserved", "id": "another-id",
                                     "reason": "'StockReserved' was seen before (another "
                                               "message)"}
    assert other.state["steps"] == state["steps"]
    assert project(FLOW, other.state, event="StockReserved", event_id="another-id",
                   payload={}, at=1, received_at=2).entries == []
    unknown = project(FLOW, state, event="Mystery", event_id="m1", payload=None, at=1,
                      received_at=2)
    assert unknown.entries[0].kind == "event.ignored"
    assert "not an event of choreography" in unknown.entries[0].data["reason"]


def test_the_timeline_and_the_steps_read_like_an_orchestrated_run() -> None:
    state, steps = feed(PATHS["unshippable"])
    entries = [e for p in steps for e in p.entries]
    assert [(e.kind, e.step) for e in entries] == [
        ("run.started", None), ("step.started", "reserve_stock"),
        ("step.succeeded", "reserve_stock"), ("step.started", "charge_payment"),
        ("step.succeeded", "charge_payment"), ("step.started", "arrange_shipping"),
        ("step.failed", "arrange_shipping"), ("run.compensating", None),
        ("compensation.started", "charge_payment"),
        ("compensation.succeeded", "charge_payment"), ("compensation.started", "reserve_stock"),
        ("compensation.succeeded", "reserve_stock"), ("run.finished", None)]
    assert entries[6].data == {"event": "ShippingFailed", "id": "ShippingFailed",
                               "error": "ShippingFailed because"}
    assert entries[6].attempt == entries[5].attempt == 1  # an outcome pairs with its start
    assert entries[5].data == {"on": "PaymentCharged"}
    assert entries[0].at == 100.0  # the event's own time
    assert state is not None
    assert {k: v["status"] for k, v in state["steps"].items()} == {
        "reserve_stock": "COMPENSATED", "charge_payment": "COMPENSATED",
        "arrange_shipping": "FAILED"}
    assert state["steps"]["charge_payment"]["result"] == {"from": "PaymentCharged"}
    assert steps[-1].error == ("arrange_shipping failed (ShippingFailed): ShippingFailed "
                               "because")


def test_a_compensation_failure_ends_the_run_failed() -> None:
    from sagaway.choreography import Choreography, FlowStep

    flow = Choreography("f", start="Go", steps=[
        FlowStep("a", service="x", on="Go", success="A", compensate_on="BFailed",
                 compensated="AUndone", compensation_failure="AStuck"),
        FlowStep("b", service="y", on="A", success="B", failure="BFailed"),
    ])
    state = None
    for event in ("Go", "A", "BFailed", "AStuck"):
        p = project(flow, state, event=event, event_id=event,
                    payload={"error": "bank closed"}, at=0, received_at=0)
        state = p.state
    assert p.status is SagaStatus.FAILED
    assert p.error == "compensation of 'a' failed (AStuck): bank closed"
    assert [e.kind for e in p.entries] == ["compensation.failed", "run.finished"]


def test_what_a_stuck_run_waits_for() -> None:
    state, _ = feed(["OrderCreated", "StockReserved"])
    assert state is not None
    assert [(s.name, e) for s, e in awaited(FLOW, state)] == [
        ("charge_payment", ("PaymentCharged", "PaymentFailed"))]
    assert stuck_reason(FLOW, state, 42.4) == (
        "stuck: no event for 42s after StockReserved (deadline 30s); waiting for payment "
        "(PaymentCharged or PaymentFailed)")
    state, _ = feed(["OrderCreated", "StockReserved", "PaymentCharged", "ShippingFailed"])
    assert state is not None
    assert [(s.name, e) for s, e in awaited(FLOW, state)] == [
        ("charge_payment", ("PaymentRefunded",))]
    # A run first seen by a later event still says what it waits for.
    state, _ = feed(["StockReserved"])
    assert state is not None and state["status"] == "RUNNING"
    assert [s.name for s, _ in awaited(FLOW, state)] == ["charge_payment"]


def test_a_run_finishes_only_once_every_event_on_its_path_is_in() -> None:
    # Two trackers, or two queues: ShippingArranged may be projected before PaymentCharged.
    # The run must not finish without it, or PaymentCharged would be dropped as "late".
    assert FLOW.required_for_end() == {"OrderCreated", "StockReserved", "PaymentCharged",
                                       "ShippingArranged"}
    assert FLOW.required_for_end("ShippingFailed") == {
        "OrderCreated", "StockReserved", "PaymentCharged", "ShippingFailed",
        "PaymentRefunded", "StockReleased"}
    assert FLOW.required_for_end("StockRejected") == {"OrderCreated", "StockRejected"}
    state, steps = feed(["OrderCreated", "StockReserved", "ShippingArranged"])
    assert steps[-1].status is SagaStatus.RUNNING
    _, steps = feed(["PaymentCharged"], state)
    assert steps[-1].status is SagaStatus.COMPLETED
    state, steps = feed(["StockReserved", "PaymentFailed", "StockReleased"])
    assert steps[-1].status is SagaStatus.COMPENSATING  # OrderCreated not in yet
    _, steps = feed(["OrderCreated"], state)
    assert steps[-1].status is SagaStatus.COMPENSATED


def test_a_step_whose_outcome_overtook_its_trigger_is_not_started_after_it() -> None:
    _, steps = feed(["StockReserved", "PaymentCharged", "OrderCreated"])
    kinds = [(e.kind, e.step) for p in steps for e in p.entries]
    assert kinds == [("step.succeeded", "reserve_stock"), ("step.started", "charge_payment"),
                     ("step.succeeded", "charge_payment"),
                     ("step.started", "arrange_shipping"), ("run.started", None)]
