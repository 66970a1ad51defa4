"""The tracker's edges, on the in-memory transport and a real SQLite saga log: a store that
fails for a while, events that cannot be tracked, and its configuration errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from examples.ecommerce.choreography.flow import order_flow

from sagaway import Orchestrator, SagaStatus, SQLiteStore, StoreError
from sagaway.choreography import Tracker, emit_event
from sagaway.messaging import Delivery, Envelope
from sagaway.messaging.memory import MemoryTransport
from sagaway.store.base import BatchResult, NewRun, RunUpdate

FLOW = order_flow(prefix="unit.tracker")
PATH = ["OrderCreated", "StockReserved", "PaymentCharged", "ShippingArranged"]


class FlakyStore(SQLiteStore):
    """Fails its first ``failures`` commits, as a database restart would."""

    def __init__(self, path: str, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    async def commit(self, creates: Sequence[NewRun], updates: Sequence[RunUpdate], *,
                     owner: str, lease_seconds: float) -> BatchResult:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("the database is restarting")
        return await super().commit(creates, updates, owner=owner, lease_seconds=lease_seconds)


async def wait_status(store_url: str, run_id: str, status: SagaStatus,
                      timeout: float = 10.0) -> Any:
    async with Orchestrator(store_url, worker=False) as reader:
        deadline = time.monotonic() + timeout
        while True:
            try:
                run = await reader.get(run_id)
            except Exception:
                run = None
            if run is not None and run.status is status:
                return run
            assert time.monotonic() < deadline, run
            await asyncio.sleep(0.05)


async def dead_letters(transport: MemoryTransport, source: str) -> list[Delivery]:
    got: list[Delivery] = []

    async def keep(d: Delivery) -> None:
        got.append(d)

    sub = await transport.subscribe(source + ".dead-letter", keep)
    await asyncio.sleep(0.2)
    await sub.stop()
    return got


async def test_a_store_outage_is_waited_out_not_dead_lettered(tmp_path: Path) -> None:
    store = FlakyStore(str(tmp_path / "s.db"), failures=5)
    async with MemoryTransport() as transport, Tracker(store, transport, [FLOW],
                                                       max_deliveries=2) as tracker:
        run_id = None
        for event in PATH:
            run_id = await emit_event(transport, FLOW, event, {"e": event}, run_id=run_id)
        assert run_id is not None
        run = await wait_status(f"sqlite:///{tmp_path}/s.db", run_id, SagaStatus.COMPLETED)
        assert [h.data["event"] for h in run.history if h.data and "event" in h.data] == PATH
        assert store.failures == 0
        assert await dead_letters(transport, FLOW.tracker_destination) == []
        assert tracker.store is store
    await store.aclose()


async def test_events_it_cannot_track_are_dead_lettered_with_the_reason(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    async with MemoryTransport() as transport, Tracker(url, transport, [FLOW],
                                                       max_deliveries=1):
        await transport.publish(FLOW.tracker_destination,
                                Envelope(type="OrderCreated", payload={}))
        # A run id that belongs to an orchestrated saga of another name.
        async with Orchestrator(url, worker=False) as client:
            other = (await client.store.commit([NewRun(
                id="run-of-another-saga", saga="billing", version=1,
                status=SagaStatus.RUNNING, input_json="{}", input_hash="h", state={},
                idempotency_key=None, wake_at=None, now=time.time(), leased=False)], [],
                owner="t", lease_seconds=1)).created[0].record
        await emit_event(transport, FLOW, "StockReserved", {}, run_id=other.id)
        dead = await dead_letters(transport, FLOW.tracker_destination)
    reasons = sorted(d.dead_letter.reason for d in dead if d.dead_letter)
    assert len(reasons) == 2
    assert "carries no run_id (saga id)" in reasons[0]
    assert "belongs to saga 'billing', not to choreography" in reasons[1]


async def test_unknown_events_and_late_events_are_recorded_or_logged(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    async with MemoryTransport() as transport, Tracker(url, transport, [FLOW]):
        run_id = await emit_event(transport, FLOW, "OrderCreated", {})
        await transport.publish(FLOW.tracker_destination,
                                Envelope(type="Mystery", run_id=run_id, payload=None))
        for event in PATH[1:]:
            await emit_event(transport, FLOW, event, {}, run_id=run_id)
        run = await wait_status(url, run_id, SagaStatus.COMPLETED)
        # After the end: another copy of an event is logged, not written.
        await emit_event(transport, FLOW, "StockReserved", {}, run_id=run_id)
        await asyncio.sleep(0.2)
        again = await wait_status(url, run_id, SagaStatus.COMPLETED)
    ignored = [h for h in run.history if h.kind == "event.ignored"]
    assert len(ignored) == 1 and ignored[0].data["event"] == "Mystery"
    assert again.history == run.history


def test_tracker_configuration_errors() -> None:
    with pytest.raises(ValueError, match="at least one choreography"):
        Tracker("memory://", "memory://", [])
    with pytest.raises(ValueError, match="same name"):
        Tracker("memory://", "memory://", [FLOW, order_flow(prefix="other")])


async def test_operator_actions_resolve_is_applied_the_others_are_answered(
        tmp_path: Path) -> None:
    from sagaway.choreography import Choreography, FlowStep

    flow = Choreography("ops", start="Go", deadline=0.3, steps=[
        FlowStep("a", service="x", on="Go", success="A", compensate_on="BFailed",
                 compensated="AUndone", compensation_failure="AStuck"),
        FlowStep("b", service="y", on="A", success="B", failure="BFailed"),
    ])
    url = f"sqlite:///{tmp_path}/s.db"
    async with MemoryTransport() as transport, Tracker(url, transport, [flow],
                                                       poll_interval=0.05):
        stuck = await emit_event(transport, flow, "Go", {})
        failed = await emit_event(transport, flow, "Go", {})
        for event in ("A", "BFailed", "AStuck"):
            await emit_event(transport, flow, event, {"error": "bank closed"}, run_id=failed)
        await wait_status(url, failed, SagaStatus.FAILED)
        async with Orchestrator(url, worker=False) as operator:
            deadline = time.monotonic() + 5
            while not (await operator.get(stuck)).error:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await operator.compensate(stuck, reason="customer called", actor="ana")
            await operator.resolve(failed, reason="refunded by hand", actor="ana")
            resolved = await wait_status(url, failed, SagaStatus.RESOLVED)
            deadline = time.monotonic() + 5
            while (run := await operator.get(stuck)).request is not None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            version = (await operator.store.get_run(stuck, history=False)).row_version  # type: ignore[union-attr]
            await asyncio.sleep(0.5)  # answered once, not claimed again on every poll
            assert (await operator.store.get_run(stuck, history=False)).row_version == version  # type: ignore[union-attr]
    assert [h.kind for h in resolved.history][-3:] == ["operator.requested", "operator.resolve",
                                                       "run.finished"]
    assert run.status is SagaStatus.RUNNING
    answer = run.history[-1]
    assert answer.kind == "event.ignored" and answer.data["request"]["action"] == "compensate"
    assert "cannot be carried out on a choreographed run" in answer.data["reason"]


async def test_run_durations_of_choreographed_runs_reach_the_metrics(tmp_path: Path) -> None:
    from sagaway.observability import PrometheusMetrics

    url = f"sqlite:///{tmp_path}/s.db"
    metrics = PrometheusMetrics()
    async with MemoryTransport() as transport, Tracker(url, transport, [FLOW],
                                                       listeners=[metrics]):
        run_id = None
        for event in PATH:
            run_id = await emit_event(transport, FLOW, event, {"e": event}, run_id=run_id)
        assert run_id is not None
        await wait_status(url, run_id, SagaStatus.COMPLETED)
    count = metrics.registry.get_sample_value(
        "sagaway_run_duration_seconds_count", {"saga": FLOW.name, "status": "COMPLETED"})
    assert count == 1


async def test_the_tracker_opens_sealed_events_with_its_codec(tmp_path: Path) -> None:
    from sagaway.protection import AesGcmCodec, generate_key

    codec = AesGcmCodec({"k1": generate_key()})
    url = f"sqlite:///{tmp_path}/s.db"
    async with MemoryTransport() as transport, Tracker(url, transport, [FLOW], codec=codec):
        run_id = None
        for event in PATH:
            run_id = await emit_event(transport, FLOW, event, {"e": event}, run_id=run_id,
                                      codec=codec)
        assert run_id is not None
        run = await wait_status(url, run_id, SagaStatus.COMPLETED)
    assert run.input == {"e": "OrderCreated"}  # projected open, not as the sealed token
