"""A choreographed shop for the tests: the example's services in this process, a tracker,
a SQLite saga log, each part with its own broker connection so one can be stopped alone."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from examples.ecommerce.choreography.flow import order_flow
from examples.ecommerce.choreography.services import (
    SERVICES,
    Audit,
    build_service,
    check_invariants,
    place_order,
)

from sagaway import Orchestrator, RunNotFound, SagaRun, SagaStatus, open_store
from sagaway.choreography import TRACKER, ChoreographedService, Choreography, Tracker
from sagaway.messaging import Envelope, Transport, open_transport
from sagaway.store.base import Store

STOCK = 100


def order(i: int | str, **changes: Any) -> dict[str, Any]:
    return {"order_id": f"o-{i}", "sku": "sku-1", "qty": 1, "amount": 10, "country": "FR",
            **changes}


class Duplicating(Transport):
    """Publishes every message twice (the same envelope, so the same id)."""

    def __init__(self, inner: Transport) -> None:
        super().__init__()
        self.inner = inner
        self.url = inner.url
        self.max_message_bytes = inner.max_message_bytes

    async def _connect(self) -> None:
        await self.inner.open()

    async def _disconnect(self) -> None:
        await self.inner.aclose()

    async def publish(self, destination: str, envelope: Envelope) -> None:
        await self.inner.publish(destination, envelope)
        await self.inner.publish(destination, envelope)

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        raise AssertionError("unused")

    async def _subscribe(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unused")

    async def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.subscribe(*args, **kwargs)


class Shop:
    """The four services, a tracker and a saga log, over one broker URL."""

    def __init__(self, url: str, directory: Path, *, deadline: float = 30.0,
                 duplicate: bool = False, store_url: str | None = None) -> None:
        self.url = url
        self.directory = directory
        self.prefix = f"t{uuid.uuid4().hex[:10]}.order"
        self.flow: Choreography = order_flow(prefix=self.prefix, deadline=deadline)
        self.dbs = {s: f"sqlite:///{directory / s}.db" for s in SERVICES}
        self.store_url = store_url or f"sqlite:///{directory / 'sagas.db'}"
        self.store: Store = open_store(self.store_url)
        self.reader = Orchestrator(self.store_url, worker=False)
        self.duplicate = duplicate
        self.services: dict[str, ChoreographedService] = {}
        self.trackers: list[Tracker] = []

    def transport(self) -> Transport:
        t = open_transport(self.url)
        return Duplicating(t) if self.duplicate else t

    def build(self, service: str) -> ChoreographedService:
        return build_service(service, self.transport(), self.dbs[service], self.flow,
                             stock={"sku-1": STOCK}, relay_interval=0.05, grace=5.0)

    async def start_service(self, service: str) -> ChoreographedService:
        svc = self.build(service)
        await svc.open()
        self.services[service] = svc
        return svc

    async def stop_service(self, service: str) -> None:
        svc = self.services.pop(service)
        await svc.aclose()

    async def start_tracker(self, **options: Any) -> Tracker:
        tracker = Tracker(self.store, self.transport(), [self.flow], poll_interval=0.1,
                          **options)
        await tracker.open()
        self.trackers.append(tracker)
        return tracker

    async def open(self, *, without: Iterable[str] = (), tracker: bool = True) -> Shop:
        await self.store.open()
        await self.reader.open()
        if tracker:
            await self.start_tracker()
        for service in SERVICES:
            if service not in without:
                await self.start_service(service)
        return self

    async def aclose(self) -> None:
        for service in list(self.services):
            await self.stop_service(service)
        for tracker in self.trackers:
            await tracker.aclose()
        self.trackers.clear()
        await self.reader.aclose()
        await self.store.aclose()
        await delete_queues(self.url, self.queues())

    def queues(self) -> list[str]:
        names = [self.flow.destination(c) for c in (*SERVICES, TRACKER)]
        return names + [n + ".dead-letter" for n in names]

    async def place(self, data: dict[str, Any]) -> str:
        return await place_order(self.services["orders"], data)

    async def wait(self, run_ids: Iterable[str], *, timeout: float = 30.0,
                   until: Any = None) -> list[SagaRun]:
        """Wait until every run is finished (or ``until(run)`` holds for each)."""
        ids = list(run_ids)
        check = until or (lambda r: r.status.finished)
        deadline = time.monotonic() + timeout
        while True:
            runs = [await self.get(i) for i in ids]
            if all(r is not None and check(r) for r in runs):
                return [r for r in runs if r is not None]
            if time.monotonic() > deadline:
                raise AssertionError(f"not reached within {timeout}s: "
                                     f"{[(r.id, r.status, r.error) if r else None for r in runs]}")
            await asyncio.sleep(0.1)

    async def get(self, run_id: str) -> SagaRun | None:
        try:
            return await self.reader.get(run_id)
        except RunNotFound:
            return None

    async def settle_outboxes(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while any([await s.db.backlog() for s in self.services.values()]):
            assert time.monotonic() < deadline, "outboxes did not drain"
            await asyncio.sleep(0.05)

    def audit(self, runs: Iterable[SagaRun]) -> Audit:
        return check_invariants(self.dbs, {r.id: r.status for r in runs}, {"sku-1": STOCK})


def events_of(run: SagaRun) -> list[str]:
    return [h.data["event"] for h in run.history if h.data and "id" in h.data
            and h.kind != "event.ignored"]


def kinds(run: SagaRun) -> list[tuple[str, str | None]]:
    return [(h.kind, h.step) for h in run.history]


def effects(shop: Shop, run_id: str) -> dict[str, Any]:
    import sqlite3

    def rows(service: str, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(shop.dbs[service].removeprefix("sqlite:///"))
        try:
            return conn.execute(sql, (run_id,)).fetchall()
        finally:
            conn.close()

    return {
        "reservations": rows("inventory", "SELECT qty, released FROM reservations "
                                          "WHERE run_id = ?"),
        "payments": rows("payment", "SELECT amount, status FROM payments WHERE run_id = ?"),
        "shipments": rows("shipping", "SELECT country FROM shipments WHERE run_id = ?"),
        "order": rows("orders", "SELECT status FROM orders WHERE run_id = ?"),
    }


async def delete_queues(url: str, names: list[str]) -> None:
    scheme = url.split("://", 1)[0]
    if scheme == "amqp":
        import aio_pika

        connection = await aio_pika.connect(url, timeout=10)
        try:
            for name in names:
                with contextlib.suppress(Exception):
                    channel = await connection.channel()
                    await channel.queue_delete(name)
                    await channel.close()
        finally:
            await connection.close()
    elif scheme == "nats":
        from sagaway.messaging.nats import NatsTransport, stream_name

        async with NatsTransport(url, connect_timeout=3) as t:
            for name in names:
                with contextlib.suppress(Exception):
                    await t.js.delete_stream(stream_name(name))


__all__ = [
    "STOCK",
    "Duplicating",
    "SagaStatus",
    "Shop",
    "effects",
    "events_of",
    "kinds",
    "order",
]
