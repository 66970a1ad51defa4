"""The two sides of the wire for participant tests: a shop (the service and its database)
and an orchestra (a stand-in orchestrator that sends commands and collects replies).

A shop's business tables live in the participant's own database: ``stock(sku, qty)`` and
``ledger``, which gets one row per *application* of a command (no unique key on purpose:
a command applied twice shows as two rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import closing
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sagaway import NonRetryableError
from sagaway.messaging.base import Delivery, Handler, Subscription, Transport
from sagaway.messaging.envelope import DeadLetter, Envelope
from sagaway.participant import Command, Participant
from sagaway.testing.transport_conformance import eventually

SKU = "BOOK-42"
STOCK = 10


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Shop:
    """A service's database, seen from the test (its own connection), and its handlers.

    ``calls`` counts handler invocations per idempotency key; ``fail_until`` makes the
    ``flaky`` command raise RuntimeError until that delivery attempt (inclusive).
    """

    kind = ""
    db_url = ""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.fail_until = 0

    async def setup(self) -> None:
        raise NotImplementedError

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def stock(self) -> int:
        rows = await self.query(f"SELECT qty FROM stock WHERE sku = '{SKU}'")
        return int(rows[0][0])

    async def ledger(self) -> list[str]:
        return [r[0] for r in await self.query("SELECT idempotency_key FROM ledger ORDER BY 1")]

    async def inbox(self) -> list[str]:
        return [r[0] for r in await self.query("SELECT idempotency_key FROM sagaway_inbox")]

    async def outbox(self) -> list[bool]:
        """One entry per outbox row: whether it was sent."""
        rows = await self.query("SELECT sent_at FROM sagaway_participant_outbox ORDER BY id")
        return [r[0] is not None for r in rows]

    def register(self, participant: Participant, *, sync: bool) -> None:
        """``reserve`` (payload sku, qty; a "no" when stock would go negative) and ``flaky``
        (writes to the ledger, then raises while the attempt is at most ``fail_until``)."""
        raise NotImplementedError

    def _count(self, cmd: Command) -> None:
        self.calls[cmd.idempotency_key] += 1

    def _check(self, cmd: Command, left: int) -> dict[str, Any]:
        if cmd.type == "flaky" and cmd.attempt <= self.fail_until:
            raise RuntimeError(f"flaky failure on attempt {cmd.attempt}")
        if left < 0:
            raise NonRetryableError(f"out of stock: {SKU}")
        return {"sku": SKU, "left": left}


class SQLiteShop(Shop):
    kind = "sqlite"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.db_url = f"sqlite:///{path}"

    def _run(self, sql: str) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
            return conn.execute(sql).fetchall()

    async def setup(self) -> None:
        def create() -> None:
            with closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
                conn.execute("CREATE TABLE stock (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL)")
                conn.execute("CREATE TABLE ledger (idempotency_key TEXT NOT NULL, qty INTEGER)")
                conn.execute("INSERT INTO stock VALUES (?, ?)", (SKU, STOCK))

        await asyncio.to_thread(create)

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(self._run, sql)

    def register(self, participant: Participant, *, sync: bool) -> None:
        if sync:

            def apply(cmd: Command) -> dict[str, Any]:
                self._count(cmd)
                qty = cmd.payload.get("qty", 1)
                cmd.db.execute("UPDATE stock SET qty = qty - ? WHERE sku = ?", (qty, SKU))
                cmd.db.execute("INSERT INTO ledger VALUES (?, ?)", (cmd.idempotency_key, qty))
                left = cmd.db.execute("SELECT qty FROM stock WHERE sku = ?", (SKU,)).fetchone()
                return self._check(cmd, left[0])

            participant.handler("reserve")(apply)
            participant.handler("flaky")(apply)
        else:

            async def apply_async(cmd: Command) -> dict[str, Any]:
                self._count(cmd)
                qty = cmd.payload.get("qty", 1)
                await cmd.db.execute("UPDATE stock SET qty = qty - ? WHERE sku = ?", (qty, SKU))
                await cmd.db.execute("INSERT INTO ledger VALUES (?, ?)", (cmd.idempotency_key, qty))
                left = await cmd.db.fetchone("SELECT qty FROM stock WHERE sku = ?", (SKU,))
                return self._check(cmd, left[0])

            participant.handler("reserve")(apply_async)
            participant.handler("flaky")(apply_async)


class PostgresShop(Shop):
    kind = "postgres"

    def __init__(self, url: str) -> None:
        super().__init__()
        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        self.schema = dict(query)["schema"]
        self.dsn = urlunsplit(
            parts._replace(query=urlencode([(k, v) for k, v in query if k != "schema"]))
        )
        self.db_url = url

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[Any]:
        import asyncpg

        conn = await asyncpg.connect(self.dsn, server_settings={"search_path": self.schema})
        try:
            yield conn
        finally:
            await conn.close()

    async def setup(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
        finally:
            await conn.close()
        async with self._connect() as conn:
            await conn.execute("CREATE TABLE stock (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL)")
            await conn.execute("CREATE TABLE ledger (idempotency_key TEXT NOT NULL, qty INTEGER)")
            await conn.execute("INSERT INTO stock VALUES ($1, $2)", SKU, STOCK)

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        async with self._connect() as conn:
            return [tuple(r) for r in await conn.fetch(sql)]

    def register(self, participant: Participant, *, sync: bool) -> None:
        if sync:

            def apply(cmd: Command) -> dict[str, Any]:
                self._count(cmd)
                qty = cmd.payload.get("qty", 1)
                cmd.db.execute("UPDATE stock SET qty = qty - $1 WHERE sku = $2", qty, SKU)
                cmd.db.execute("INSERT INTO ledger VALUES ($1, $2)", cmd.idempotency_key, qty)
                left = cmd.db.fetchval("SELECT qty FROM stock WHERE sku = $1", SKU)
                return self._check(cmd, left)

            participant.handler("reserve")(apply)
            participant.handler("flaky")(apply)
        else:

            async def apply_async(cmd: Command) -> dict[str, Any]:
                self._count(cmd)
                qty = cmd.payload.get("qty", 1)
                await cmd.db.execute("UPDATE stock SET qty = qty - $1 WHERE sku = $2", qty, SKU)
                await cmd.db.execute("INSERT INTO ledger VALUES ($1, $2)", cmd.idempotency_key, qty)
                left = await cmd.db.fetchval("SELECT qty FROM stock WHERE sku = $1", SKU)
                return self._check(cmd, left)

            participant.handler("reserve")(apply_async)
            participant.handler("flaky")(apply_async)


class Orchestra:
    """The orchestrator's side of the wire: sends commands to ``service``, collects what
    comes back on ``replies`` and what lands on the service's dead-letter destination."""

    def __init__(self, transport: Transport, service: str) -> None:
        self.transport = transport
        self.service = service
        self.replies_to = f"{service}.replies"
        self.replies: list[Envelope] = []
        self.dead: list[DeadLetter] = []

    async def start(self) -> None:
        await self.transport.open()
        await self.transport.subscribe(self.replies_to, self._on_reply)
        await self.transport.subscribe(f"{self.service}.dead-letter", self._on_dead)

    async def _on_reply(self, delivery: Delivery) -> None:
        self.replies.append(delivery.envelope)

    async def _on_dead(self, delivery: Delivery) -> None:
        dead = delivery.dead_letter
        assert dead is not None
        self.dead.append(dead)

    def command(
        self,
        type: str = "reserve",
        payload: Any = None,
        *,
        step: str = "reserve",
        run_id: str | None = None,
        **changes: Any,
    ) -> Envelope:
        """A command as the orchestrator sends it (``changes`` override fields)."""
        run_id = run_id or fresh("run")
        message_id = uuid.uuid4().hex
        fields: dict[str, Any] = {
            "type": type,
            "payload": {"qty": 3} if payload is None else payload,
            "id": message_id,
            "run_id": run_id,
            "step": step,
            "idempotency_key": f"{run_id}:{step}:action",
            "reply_to": self.replies_to,
            "correlation_id": message_id,
        }
        fields.update(changes)
        return Envelope(**fields)

    async def send(self, envelope: Envelope) -> None:
        await self.transport.publish(self.service, envelope)

    async def wait_replies(self, n: int) -> list[Envelope]:
        await eventually(lambda: len(self.replies) >= n, what=f"{n} replies")
        return self.replies

    async def wait_dead(self, n: int) -> list[DeadLetter]:
        await eventually(lambda: len(self.dead) >= n, what=f"{n} dead letters")
        return self.dead


class StuckTransport(Transport):
    """Another transport, except that publishing to ``stuck`` never returns: a relay that
    dies before its publish reaches the broker."""

    def __init__(self, inner: Transport, *, stuck: str) -> None:
        super().__init__()
        self.inner = inner
        self.url = inner.url
        self.stuck = stuck
        self.attempts = 0

    async def _connect(self) -> None:
        await self.inner.open()

    async def _disconnect(self) -> None:
        await self.inner.aclose()

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        if destination == self.stuck:
            self.attempts += 1
            await asyncio.Event().wait()
        await self.inner._publish(destination, body, message_id=message_id)

    async def _subscribe(
        self, source: str, handler: Handler, *, prefetch: int, max_deliveries: int, dead_letter: str
    ) -> Subscription:
        return await self.inner._subscribe(
            source,
            handler,
            prefetch=prefetch,
            max_deliveries=max_deliveries,
            dead_letter=dead_letter,
        )
