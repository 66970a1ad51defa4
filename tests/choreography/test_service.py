"""A choreographed service's outcomes, on the in-memory transport and real SQLite files:
what each kind of handler outcome emits, and what goes to the dead letter."""

from __future__ import annotations

import asyncio
import itertools
import math
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sagaway import DefinitionError, NonRetryableError, TransportError
from sagaway.choreography import ChoreographedService, Choreography, Emit, FlowStep, emit_event
from sagaway.messaging import Delivery
from sagaway.messaging.memory import MemoryTransport
from sagaway.participant import Command

FLOW = Choreography("svc", start="Go", steps=[
    FlowStep("a", service="alpha", on="Go", success="A", failure="AFailed",
             compensate_on="BFailed", compensated="AUndone"),
    FlowStep("b", service="beta", on="A", success="B", failure="BFailed"),
], notify={"gamma": ("B",)})


class Sink:
    """Collects what reaches the queues of beta, the tracker and alpha's dead letters."""

    def __init__(self, transport: MemoryTransport) -> None:
        self.transport = transport
        self.got: dict[str, list[Delivery]] = {}

    async def watch(self, *sources: str) -> None:
        for source in sources:
            bucket = self.got.setdefault(source, [])

            async def keep(d: Delivery, bucket: list[Delivery] = bucket) -> None:
                bucket.append(d)

            await self.transport.subscribe(source, keep)

    async def wait(self, source: str, n: int, timeout: float = 5.0) -> list[Delivery]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.got.get(source, [])) < n:
            assert asyncio.get_running_loop().time() < deadline, self.got.get(source)
            await asyncio.sleep(0.01)
        return self.got[source]


@pytest.fixture
async def transport() -> AsyncIterator[MemoryTransport]:
    async with MemoryTransport() as t:
        yield t


async def alpha_with(transport: MemoryTransport, tmp_path: Path, handler: Any,
                     **options: Any) -> ChoreographedService:
    svc = ChoreographedService("alpha", transport, f"sqlite:///{tmp_path}/alpha.db",
                               flow=FLOW, relay_interval=0.02, **options)
    svc.on("Go")(handler)
    svc.on("BFailed")(lambda e: None)
    await svc.open()
    return svc


@pytest.mark.parametrize(("result", "event", "payload"), [
    (None, "A", {"x": 1}),                       # None: the received payload goes on
    ({"y": 2}, "A", {"y": 2}),                   # a value: the success event carries it
    (Emit("AFailed", {"why": "chosen"}), "AFailed", {"why": "chosen"}),
])
async def test_what_a_handler_returns_decides_the_event(
        transport: MemoryTransport, tmp_path: Path, result: Any, event: str,
        payload: Any) -> None:
    sink = Sink(transport)
    await sink.watch(FLOW.destination("beta"), FLOW.tracker_destination)
    svc = await alpha_with(transport, tmp_path, lambda e: result)
    try:
        run_id = await emit_event(transport, FLOW, "Go", {"x": 1})
        (tracked_go, tracked) = await sink.wait(FLOW.tracker_destination, 2)
        assert tracked.envelope.type == event and tracked.envelope.payload == payload
        assert tracked.envelope.run_id == run_id and tracked.envelope.step == "a"
        assert tracked.envelope.correlation_id == tracked_go.envelope.id
        assert tracked.envelope.headers["sagaway-service"] == "alpha"
        if event == "A":
            (to_beta,) = await sink.wait(FLOW.destination("beta"), 1)
            assert to_beta.envelope.id == tracked.envelope.id  # one event, two queues
    finally:
        await svc.aclose()


async def test_a_business_no_rolls_back_and_emits_the_failure_with_the_reason(
        transport: MemoryTransport, tmp_path: Path) -> None:
    sink = Sink(transport)
    await sink.watch(FLOW.tracker_destination)

    conn = sqlite3.connect(tmp_path / "alpha.db")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()

    def refuse(e: Command) -> None:
        e.db.execute("INSERT INTO t VALUES (1)")
        raise NonRetryableError("no stock")

    svc = await alpha_with(transport, tmp_path, refuse)
    try:
        await emit_event(transport, FLOW, "Go", {"sku": "s"})
        (_, failed) = await sink.wait(FLOW.tracker_destination, 2)
        assert failed.envelope.type == "AFailed"
        assert failed.envelope.payload == {"sku": "s", "error": "no stock"}
    finally:
        await svc.aclose()
    conn = sqlite3.connect(tmp_path / "alpha.db")
    try:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
    finally:
        conn.close()


async def test_undeclared_emits_and_refusals_without_a_failure_event_are_dead_lettered(
        transport: MemoryTransport, tmp_path: Path) -> None:
    sink = Sink(transport)
    dead = FLOW.destination("alpha") + ".dead-letter"
    await sink.watch(dead)

    def wrong(e: Command) -> Emit:
        return Emit("B")

    svc = await alpha_with(transport, tmp_path, wrong, max_deliveries=2)
    gamma = ChoreographedService("gamma", transport, f"sqlite:///{tmp_path}/gamma.db",
                                 flow=FLOW, max_deliveries=1)

    @gamma.on("B")
    def cannot(e: Command) -> None:
        raise NonRetryableError("gamma cannot fail by the flow")

    await gamma.open()
    await sink.watch(FLOW.destination("gamma") + ".dead-letter")
    try:
        run_id = await emit_event(transport, FLOW, "Go", {})
        (letter,) = await sink.wait(dead, 1)
        assert letter.dead_letter is not None
        assert "returned Emit('B'), but the flow lets it emit only ['A', 'AFailed']" in \
            letter.dead_letter.reason
        assert letter.envelope.run_id == run_id
        await emit_event(transport, FLOW, "B", {}, run_id=run_id)
        (letter,) = await sink.wait(FLOW.destination("gamma") + ".dead-letter", 1)
        assert letter.dead_letter is not None
        assert "gamma cannot fail by the flow" in letter.dead_letter.reason
    finally:
        await svc.aclose()
        await gamma.aclose()


async def test_a_result_that_is_not_json_emits_the_failure(
        transport: MemoryTransport, tmp_path: Path) -> None:
    sink = Sink(transport)
    await sink.watch(FLOW.tracker_destination)
    svc = await alpha_with(transport, tmp_path, lambda e: {"bad": math.nan})
    try:
        await emit_event(transport, FLOW, "Go", {})
        (_, failed) = await sink.wait(FLOW.tracker_destination, 2)
        assert failed.envelope.type == "AFailed"
        assert "cannot be sent as JSON" in failed.envelope.payload["error"]
    finally:
        await svc.aclose()


async def test_start_is_atomic_with_the_services_row_and_once_per_key(
        transport: MemoryTransport, tmp_path: Path) -> None:
    sink = Sink(transport)
    await sink.watch(FLOW.destination("alpha"), FLOW.tracker_destination)
    gamma = ChoreographedService("gamma", transport, f"sqlite:///{tmp_path}/gamma.db",
                                 flow=FLOW, relay_interval=0.02)
    gamma.on("B")(lambda e: None)
    with pytest.raises(TransportError, match="is not open"):
        await gamma.start({})
    await gamma.open()

    def record(db: Any, run_id: str) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS orders (id, run_id)")
        db.execute("INSERT INTO orders VALUES ('o-1', ?)", (run_id,))

    try:
        first = await gamma.start({"order": 1}, key="o-1", apply=record)
        again = await gamma.start({"order": 1}, key="o-1", apply=record)
        assert first == again
        (go,) = await sink.wait(FLOW.destination("alpha"), 1)
        assert go.envelope.type == "Go" and go.envelope.run_id == first
        await asyncio.sleep(0.2)
        assert len(sink.got[FLOW.destination("alpha")]) == 1
        with pytest.raises(DefinitionError, match="not an event of choreography"):
            await emit_event(transport, FLOW, "Nope", {})
    finally:
        await gamma.aclose()
    conn = sqlite3.connect(tmp_path / "gamma.db")
    try:
        assert conn.execute("SELECT id, run_id FROM orders").fetchall() == [("o-1", first)]
    finally:
        conn.close()


async def test_a_failing_handler_is_retried_with_backoff_then_succeeds(
        transport: MemoryTransport, tmp_path: Path) -> None:
    sink = Sink(transport)
    await sink.watch(FLOW.tracker_destination)
    attempts: list[float] = []

    def flaky(e: Command) -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError("the card processor is down")

    svc = await alpha_with(transport, tmp_path, flaky, retry_backoff=0.2, max_deliveries=5)
    try:
        await emit_event(transport, FLOW, "Go", {})
        (_, done) = await sink.wait(FLOW.tracker_destination, 2)
        assert done.envelope.type == "A"
    finally:
        await svc.aclose()
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) == 3
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps  # 0.2 s, then 0.4 s
    assert svc.backoff(1) == 0.2 and svc.backoff(10) == 10.0
    with pytest.raises(ValueError, match="must be >= 0"):
        ChoreographedService("alpha", transport, f"sqlite:///{tmp_path}/x.db", flow=FLOW,
                             retry_backoff=-1)


async def test_with_a_codec_events_travel_sealed_and_handlers_see_them_open(
        transport: MemoryTransport, tmp_path: Path) -> None:
    from sagaway.protection import AesGcmCodec, generate_key

    codec = AesGcmCodec({"k1": generate_key()})
    canary = "4242-canary-card"
    seen: list[Any] = []
    sink = Sink(transport)
    await sink.watch(FLOW.destination("beta"), FLOW.tracker_destination)

    def handle(e: Any) -> Any:
        seen.append(e.payload)
        return {"card": canary, "step": "a"}

    svc = await alpha_with(transport, tmp_path, handle, codec=codec)
    try:
        await emit_event(transport, FLOW, "Go", {"card": canary}, codec=codec)
        (go, a) = await sink.wait(FLOW.tracker_destination, 2)
        (to_beta,) = await sink.wait(FLOW.destination("beta"), 1)
    finally:
        await svc.aclose()
    assert seen == [{"card": canary}]  # the handler got the opened payload
    for delivery in (go, a, to_beta):
        env = delivery.envelope
        assert codec.is_sealed(env.payload) and canary not in env.to_bytes().decode()
    assert codec.open(a.envelope.payload, aad=f"msg:{a.envelope.id}") == {
        "card": canary, "step": "a"}
