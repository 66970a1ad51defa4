"""MemoryStore against the store conformance suite."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sagaway import MemoryStore, Store
from sagaway.testing import FakeClock
from sagaway.testing.conformance import StoreConformance


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    async def store(self, clock: FakeClock) -> AsyncIterator[Store]:
        async with MemoryStore(clock=clock) as store:
            yield store




