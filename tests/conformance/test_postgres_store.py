"""PostgresStore against the store conformance suite, unchanged, plus what only it has.

Each test gets a fresh schema on the real server (see tests/conftest.py). The suite drives
lease expiry with a test clock; the last tests here check the database clock is used when
none is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sagaway import Store, StoreError
from sagaway.store import open_store
from sagaway.store.migrations import migration_files
from sagaway.store.postgres import PostgresStore
from sagaway.testing import FakeClock
from sagaway.testing.conformance import DEFS, LEASE, OTHER, OWNER, StoreConformance, create, new_run


class TestPostgresStore(StoreConformance):
    @pytest.fixture
    async def store(self, clock: FakeClock, postgres_url: str) -> AsyncIterator[Store]:
        async with PostgresStore(postgres_url, clock=clock) as store:
            yield store


async def test_open_store_builds_postgres_from_its_url(postgres_url: str) -> None:
    store = open_store(postgres_url)
    assert isinstance(store, PostgresStore)
    async with store:
        assert abs(await store.now() - (await store.now())) < 5


async def test_leases_use_the_database_clock(postgres_url: str) -> None:
    async with PostgresStore(postgres_url) as store:
        db_now = await store.now()
        await create(store, new_run("run-1"))
        conn = await asyncpg.connect(postgres_url.split("?")[0])
        try:
            schema = postgres_url.split("schema=")[1]
            expires = await conn.fetchval(
                f"SELECT lease_expires FROM {schema}.sagaway_runs WHERE id = 'run-1'"
            )
        finally:
            await conn.close()
        assert db_now + LEASE - 1 < expires < db_now + LEASE + 5
        assert await store.claim_due(owner=OTHER, lease_seconds=LEASE, limit=10,
                                     definitions=DEFS) == []


async def test_migrations_are_idempotent_and_safe_from_two_processes(postgres_url: str) -> None:
    stores = [PostgresStore(postgres_url, migrate=False) for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        applied = await asyncio.gather(*(s.migrate() for s in stores))
        files = len(migration_files("postgres"))
        assert sorted(len(a) for a in applied) == [0, 0, 0, files]
        assert await stores[0].migrate() == []
        await create(stores[1], new_run("run-1"))
        assert (await stores[2].get_run("run-1")) is not None
    finally:
        for s in stores:
            await s.aclose()


async def test_an_unreachable_server_is_a_store_error() -> None:
    store = PostgresStore("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL at"):
        await store.open()


async def test_a_password_never_appears_in_errors() -> None:
    store = PostgresStore("postgresql://user:s3cret@127.0.0.1:1/none")
    with pytest.raises(StoreError) as info:
        await store.open()
    assert "s3cret" not in str(info.value)


def test_a_bad_schema_name_is_refused() -> None:
    with pytest.raises(StoreError, match="plain identifier"):
        PostgresStore("postgresql://u@h/db?schema=x;drop table y")


async def test_use_before_open_is_a_store_error(postgres_url: str) -> None:
    with pytest.raises(StoreError, match="not open"):
        await PostgresStore(postgres_url).get_run("x")


async def test_claims_by_many_workers_never_overlap(postgres_url: str) -> None:
    async with PostgresStore(postgres_url) as store:
        await store.commit([new_run(f"run-{i}") for i in range(200)], [], owner=OWNER,
                           lease_seconds=LEASE)
        await store.release_leases(owner=OWNER)
        claims = await asyncio.gather(*(
            store.claim_due(owner=f"w{i}", lease_seconds=LEASE, limit=30, definitions=DEFS)
            for i in range(10)
        ))
        ids = [r.id for c in claims for r in c]
        assert len(ids) == len(set(ids)) == 200
