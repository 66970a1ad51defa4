"""EncryptedStore passes the store conformance suite on memory, a SQLite file and
PostgreSQL: sealing on the port changes nothing a caller can observe (awkward JSON
included), except that outbox bodies handed to the relay stay sealed for the broker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from protection_helpers import codec

from sagaway import MemoryStore, SQLiteStore, Store
from sagaway.protection import EncryptedStore
from sagaway.testing import FakeClock
from sagaway.testing.conformance import StoreConformance


class TestEncryptedMemoryStore(StoreConformance):
    @pytest.fixture
    async def store(self, clock: FakeClock) -> AsyncIterator[Store]:
        async with EncryptedStore(MemoryStore(clock=clock), codec()) as store:
            yield store


class TestEncryptedSQLiteStore(StoreConformance):
    @pytest.fixture
    async def store(self, clock: FakeClock, tmp_path: Path) -> AsyncIterator[Store]:
        async with EncryptedStore(SQLiteStore(tmp_path / "s.db", clock=clock),
                                  codec()) as store:
            yield store


class TestEncryptedPostgresStore(StoreConformance):
    @pytest.fixture
    async def store(self, clock: FakeClock, postgres_url: str) -> AsyncIterator[Store]:
        from sagaway.store.postgres import PostgresStore

        async with EncryptedStore(PostgresStore(postgres_url, clock=clock),
                                  codec()) as store:
            yield store
