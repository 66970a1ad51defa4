"""The participant's configuration, lifecycle and misuse: clear errors, nothing silent.

On a SQLite file and the memory transport unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from participant_helpers import STOCK, Orchestra, PostgresShop, Shop, SQLiteShop, fresh

from sagaway.errors import StoreError, TransportError
from sagaway.messaging.base import Handler, Subscription, Transport
from sagaway.messaging.memory import MemoryBroker, MemoryTransport
from sagaway.participant import Command, Participant, SQLiteDatabase, open_database


@pytest.fixture
async def sqlite_shop(tmp_path: Path) -> Shop:
    shop = SQLiteShop(str(tmp_path / "inventory.db"))
    await shop.setup()
    return shop


@pytest.fixture
async def side() -> Orchestra:
    orchestra = Orchestra(MemoryTransport(MemoryBroker()), fresh("inventory"))
    await orchestra.start()
    return orchestra


def on(orchestra: Orchestra) -> MemoryTransport:
    """A transport on the orchestra's memory broker."""
    assert isinstance(orchestra.transport, MemoryTransport)
    return MemoryTransport(orchestra.transport.broker)


def test_database_urls_and_objects() -> None:
    db = open_database("sqlite:///data/inventory.db?synchronous=NORMAL&busy_timeout=2")
    assert isinstance(db, SQLiteDatabase)
    assert (db.path, db.synchronous, db.busy_timeout) == ("data/inventory.db", "NORMAL", 2.0)
    assert open_database(db) is db
    with pytest.raises(StoreError, match="unknown participant database URL") as info:
        open_database("mysql://app:s3cret@db/inventory")
    assert "s3cret" not in str(info.value)
    with pytest.raises(StoreError, match="unknown SQLite URL option"):
        open_database("sqlite:///x.db?journal=off")
    with pytest.raises(StoreError, match="not dict"):
        open_database({"path": "x.db"})


async def test_registration_mistakes_are_refused(tmp_path: Path) -> None:
    p = Participant("inventory", MemoryTransport(), f"sqlite:///{tmp_path}/x.db")
    with pytest.raises(ValueError, match="no handlers"):
        await p.open()
    p.handler("reserve")(lambda cmd: None)
    with pytest.raises(ValueError, match="already has a handler for 'reserve'"):
        p.handler("reserve")(lambda cmd: None)
    with pytest.raises(TransportError, match="bad destination name"):
        Participant("in ventory", MemoryTransport(), f"sqlite:///{tmp_path}/x.db")


async def test_run_serves_until_stop_and_closes_what_it_opened(
    sqlite_shop: Shop, side: Orchestra
) -> None:
    transport = on(side)
    p = Participant(side.service, transport, sqlite_shop.db_url)
    sqlite_shop.register(p, sync=False)
    task = asyncio.create_task(p.run())
    await side.send(side.command())
    await side.wait_replies(1)
    p.stop()
    await asyncio.wait_for(task, 10)
    assert not transport.is_open and not p.db.is_open
    assert await sqlite_shop.stock() == STOCK - 3


async def test_what_is_passed_open_is_left_open(sqlite_shop: Shop, side: Orchestra) -> None:
    transport = on(side)
    db = SQLiteDatabase(sqlite_shop.db_url.removeprefix("sqlite:///"))
    async with transport, db:
        p = Participant(side.service, transport, db)
        sqlite_shop.register(p, sync=True)
        async with p:
            await side.send(side.command())
            await side.wait_replies(1)
        assert transport.is_open and db.is_open
        assert await db.backlog() == 0


async def test_a_failing_publish_keeps_the_reply_until_the_broker_confirms(
    sqlite_shop: Shop, side: Orchestra
) -> None:
    flaky = RefusingTransport(on(side), refuse=3)
    p = Participant(side.service, flaky, sqlite_shop.db_url)
    sqlite_shop.register(p, sync=False)
    async with p:
        command = side.command()
        await side.send(command)
        [reply] = await side.wait_replies(1)
    assert flaky.refused == 3
    assert reply.correlation_id == command.id
    assert await sqlite_shop.outbox() == [True]


async def test_a_sync_handler_returning_a_coroutine_is_dead_lettered(
    sqlite_shop: Shop, side: Orchestra
) -> None:
    p = Participant(side.service, on(side), sqlite_shop.db_url, max_deliveries=2)

    async def later() -> int:
        return 1

    def wrong(cmd: Command) -> Coroutine[Any, Any, int]:
        return later()

    p.handler("reserve")(wrong)
    async with p:
        await side.send(side.command())
        [dead] = await side.wait_dead(1)
    assert "returned an awaitable: declare it `async def`" in dead.reason
    assert side.replies == []


async def test_cmd_db_after_the_transaction_is_refused(sqlite_shop: Shop, side: Orchestra) -> None:
    kept: list[Any] = []
    p = Participant(side.service, on(side), sqlite_shop.db_url)

    @p.handler("reserve")
    async def keep(cmd: Command) -> None:
        kept.append(cmd.db)

    async with p:
        await side.send(side.command())
        await side.wait_replies(1)
        with pytest.raises(StoreError, match="after its command's transaction ended"):
            await kept[0].execute("DELETE FROM stock")
    assert await sqlite_shop.stock() == STOCK


async def test_a_handler_that_commits_is_not_silently_accepted(
    sqlite_shop: Shop, side: Orchestra
) -> None:
    p = Participant(side.service, on(side), sqlite_shop.db_url, max_deliveries=1)

    @p.handler("reserve")
    def commits(cmd: Command) -> None:
        cmd.db.execute("COMMIT")

    async with p:
        await side.send(side.command())
        [dead] = await side.wait_dead(1)
    assert "the handler ended the command's transaction" in dead.reason
    assert side.replies == []


async def test_an_asyncpg_pool_of_the_service_is_used_and_left_open(
    postgres_url: str,
) -> None:
    import asyncpg

    shop = PostgresShop(postgres_url)
    await shop.setup()
    side = Orchestra(MemoryTransport(MemoryBroker()), fresh("inventory"))
    await side.start()
    pool = await asyncpg.create_pool(
        shop.dsn, min_size=1, max_size=2, server_settings={"search_path": shop.schema}
    )
    try:
        p = Participant(side.service, on(side), pool)
        shop.register(p, sync=True)
        async with p:
            await side.send(side.command())
            [reply] = await side.wait_replies(1)
        assert reply.payload["ok"] is True
        assert await pool.fetchval("SELECT count(*) FROM sagaway_inbox") == 1
    finally:
        await pool.close()
    assert await shop.stock() == STOCK - 3


class RefusingTransport(Transport):
    """Another transport that refuses (TransportError) its first ``refuse`` publishes."""

    def __init__(self, inner: Transport, *, refuse: int) -> None:
        super().__init__()
        self.inner = inner
        self.url = inner.url
        self.refuse = refuse
        self.refused = 0

    async def _connect(self) -> None:
        await self.inner.open()

    async def _disconnect(self) -> None:
        await self.inner.aclose()

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        if self.refused < self.refuse:
            self.refused += 1
            raise TransportError("broker did not confirm")
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
