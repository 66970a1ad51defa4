"""SQLiteStore against the store conformance suite, on a real file, plus what only SQLite has."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path

import pytest

from sagaway import SQLiteStore, Store, StoreError
from sagaway.run import SagaStatus
from sagaway.store import open_store
from sagaway.testing import FakeClock
from sagaway.testing.conformance import (
    AWKWARD_HISTORY,
    DEFS,
    LEASE,
    OTHER,
    OWNER,
    StoreConformance,
    apply,
    create,
    fetch,
    new_run,
    update,
)

SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


class TestSQLiteStore(StoreConformance):
    @pytest.fixture
    async def store(self, clock: FakeClock, tmp_path: Path) -> AsyncIterator[Store]:
        async with SQLiteStore(tmp_path / "sagas.db", clock=clock) as store:
            yield store





# -- what only SQLite has -------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sagas.db"


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to the same file, as another process would have."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


async def pragma(store: SQLiteStore, name: str) -> object:
    # The synchronous pragma is per connection: ask the store's own connection.
    return await store._run(lambda conn: conn.execute(f"PRAGMA {name}").fetchone()[0])


async def test_wal_and_synchronous_full_by_default(db: Path) -> None:
    async with SQLiteStore(db) as store:
        assert store.synchronous == "FULL"
        assert SYNCHRONOUS[await pragma(store, "synchronous")] == "FULL"  # type: ignore[index]
        assert await pragma(store, "journal_mode") == "wal"
        assert await pragma(store, "busy_timeout") == 10_000
    with raw(db) as conn:  # WAL is a property of the file: it stays after close
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("value", ["NORMAL", "normal"])
async def test_synchronous_normal_from_the_url(db: Path, value: str) -> None:
    store = SQLiteStore.from_url(f"sqlite:///{db}?synchronous={value}&busy_timeout=2.5")
    assert (store.path, store.synchronous, store.busy_timeout) == (str(db), "NORMAL", 2.5)
    async with store:
        assert SYNCHRONOUS[await pragma(store, "synchronous")] == "NORMAL"  # type: ignore[index]
        assert await pragma(store, "busy_timeout") == 2500
        assert await pragma(store, "journal_mode") == "wal"


@pytest.mark.parametrize("value", ["FAST", "2", "", "full; DROP TABLE x"])
def test_a_bad_synchronous_value_raises_store_error(db: Path, value: str) -> None:
    with pytest.raises(StoreError, match="synchronous must be one of"):
        SQLiteStore(db, synchronous=value)
    with pytest.raises(StoreError, match="synchronous must be one of"):
        SQLiteStore.from_url(f"sqlite:///{db}?synchronous={value or 'x'}")


def test_an_unknown_url_option_raises_store_error(db: Path) -> None:
    with pytest.raises(StoreError, match=r"unknown SQLite URL option\(s\) \['journal', 'mode'\]"):
        SQLiteStore.from_url(f"sqlite:///{db}?mode=ro&synchronous=FULL&journal=off")


def test_a_bad_busy_timeout_raises_store_error(db: Path) -> None:
    with pytest.raises(StoreError, match="busy_timeout"):
        SQLiteStore.from_url(f"sqlite:///{db}?busy_timeout=soon")


async def test_two_stores_on_one_file_see_each_others_writes(db: Path) -> None:
    clock = FakeClock()
    async with SQLiteStore(db, clock=clock) as a, SQLiteStore(db, clock=clock) as b:
        await create(a, new_run("run-1", history=AWKWARD_HISTORY[:1]), owner=OWNER)
        assert await b.get_run("run-1") == await a.get_run("run-1")
        assert [r.id for r in await b.list_runs()] == ["run-1"]
        assert await b.claim_due(owner=OTHER, lease_seconds=LEASE, limit=10, definitions=DEFS) == []

        clock.advance(LEASE + 1)  # worker a stalls; worker b takes the run over
        [claimed] = await b.claim_due(owner=OTHER, lease_seconds=LEASE, limit=10, definitions=DEFS)
        assert (claimed.owner, claimed.row_version) == (OTHER, 2)
        assert await apply(a, update("run-1", 1, status=SagaStatus.FAILED)) == [False]
        assert await apply(b, update("run-1", 2, history=AWKWARD_HISTORY[1:2]), owner=OTHER) == [
            True
        ]
        assert await a.renew_leases(owner=OWNER, lease_seconds=LEASE) == set()
        assert (await fetch(a, "run-1")).history == AWKWARD_HISTORY[:2]


async def test_runs_survive_closing_and_reopening(db: Path) -> None:
    async with SQLiteStore(db) as store:
        [run] = await create(store, new_run("run-1", key="k", history=AWKWARD_HISTORY))
        before = await fetch(store, "run-1")
    async with SQLiteStore(db) as store:
        assert await fetch(store, "run-1") == before
        result = await store.commit(
            [new_run("run-2", key="k")], [], owner=OTHER, lease_seconds=LEASE
        )
        assert (result.created[0].created, result.created[0].record.id) == (False, run.id)


async def test_migrations_are_idempotent(db: Path) -> None:
    files = sorted(
        e.name
        for e in resources.files("sagaway.store.migrations.sqlite").iterdir()
        if e.name.endswith(".sql")
    )
    assert files
    async with SQLiteStore(db) as store:
        await store.open()  # again, on the open store
        await create(store, new_run("run-1"))
    for _ in range(2):
        async with SQLiteStore(db) as store:
            assert (await fetch(store, "run-1")).row_version == 1
    with raw(db) as conn:
        applied = [r[0] for r in conn.execute("SELECT name FROM sagaway_migrations ORDER BY 1")]
    assert applied == files


async def test_two_stores_migrating_a_new_file_at_once(db: Path) -> None:
    a, b = SQLiteStore(db), SQLiteStore(db)
    await asyncio.gather(a.open(), b.open())
    try:
        await create(a, new_run("run-1"))
        assert (await fetch(b, "run-1")).owner == OWNER
    finally:
        await a.aclose()
        await b.aclose()
    with raw(db) as conn:
        assert conn.execute("SELECT count(*) FROM sagaway_migrations").fetchone()[0] == len(
            [
                e
                for e in resources.files("sagaway.store.migrations.sqlite").iterdir()
                if e.name.endswith(".sql")
            ]
        )


async def test_concurrent_opens_all_wait_for_the_connection(db: Path) -> None:
    store = SQLiteStore(db)

    async def open_and_read() -> None:
        await store.open()
        assert await store.get_run("run-1") is None

    try:
        await asyncio.gather(open_and_read(), open_and_read())
    finally:
        await store.aclose()


async def test_using_a_store_before_open_or_after_close_raises_store_error(db: Path) -> None:
    store = SQLiteStore(db)
    with pytest.raises(StoreError, match="not open"):
        await store.get_run("run-1")
    with pytest.raises(StoreError, match="not open"):
        await store.commit([new_run()], [], owner=OWNER, lease_seconds=LEASE)
    await store.aclose()  # closing a store that was never opened is fine
    async with store:
        await create(store, new_run("run-1"))
    with pytest.raises(StoreError, match="not open"):
        await store.list_runs()


async def test_a_driver_error_is_translated_to_store_error(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await create(store, new_run("run-1"))
        with raw(db) as conn:
            conn.execute("DROP TABLE sagaway_history")
        with pytest.raises(StoreError, match="no such table: sagaway_history") as info:
            await store.get_run("run-1")
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        # A failing transaction is rolled back, not left open: the run was not updated.
        with pytest.raises(StoreError, match="no such table"):
            await apply(store, update("run-1", 1, history=AWKWARD_HISTORY))
        assert (await fetch(store, "run-1", history=False)).row_version == 1
        assert await apply(store, update("run-1", 1)) == [True]


async def test_a_locked_database_raises_store_error_then_recovers(db: Path) -> None:
    async with SQLiteStore(db, busy_timeout=0.05) as store:
        with raw(db) as conn:
            conn.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            with pytest.raises(StoreError, match="database is locked"):
                await create(store, new_run("run-1"))
            with pytest.raises(StoreError, match="database is locked"):
                await store.renew_leases(owner=OWNER, lease_seconds=LEASE)
            conn.execute("ROLLBACK")
        assert await store.get_run("run-1") is None
        await create(store, new_run("run-1"))


@pytest.fixture
def garbage(db: Path) -> Path:
    db.write_bytes(b"this is not an SQLite database\n" * 64)
    return db


async def test_opening_a_file_that_is_not_a_database_raises_store_error(garbage: Path) -> None:
    with pytest.raises(StoreError, match=r"cannot open SQLite saga log .*not a database") as info:
        await SQLiteStore(garbage).open()
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


async def test_opening_under_a_path_that_is_a_file_raises_store_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    store = SQLiteStore(tmp_path / "a-file" / "sagas.db")
    with pytest.raises(StoreError, match="cannot open SQLite saga log"):
        await store.open()
    with pytest.raises(StoreError, match="not open"):  # and it did not half-open
        await store.get_run("run-1")


async def test_open_store_builds_a_working_sqlite_store(db: Path) -> None:
    store = open_store(f"sqlite:///{db}")
    assert isinstance(store, SQLiteStore)
    assert store.path == str(db)
    async with store:
        await create(store, new_run("run-1"))
    async with SQLiteStore(db) as again:
        assert (await fetch(again, "run-1")).row_version == 1
