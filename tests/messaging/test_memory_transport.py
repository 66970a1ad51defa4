"""MemoryTransport against the transport conformance suite, plus what only it has."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from sagaway.messaging import open_transport
from sagaway.messaging.base import Transport
from sagaway.messaging.memory import MemoryBroker, MemoryTransport
from sagaway.testing.transport_conformance import Recorder, TransportConformance, full_envelope


class TestMemoryTransport(TransportConformance):
    @pytest.fixture
    def transport_factory(self, namespace: str) -> Iterator[Callable[[], Transport]]:
        broker = MemoryBroker()  # shared by every transport of one test, like a server
        yield lambda: MemoryTransport(broker)


def test_memory_url_builds_a_fresh_transport() -> None:
    a, b = open_transport("memory://"), open_transport("MEMORY://")
    assert isinstance(a, MemoryTransport) and isinstance(b, MemoryTransport)
    assert a.broker is not b.broker
    assert a.url == "memory://" and repr(a) == "<MemoryTransport memory://>"


async def test_a_shared_broker_connects_transports() -> None:
    broker = MemoryBroker()
    async with MemoryTransport(broker) as producer, MemoryTransport(broker) as consumer:
        await producer.publish("orders", full_envelope())
        assert broker.depth("orders") == (1, 0)
        rec = Recorder()
        await consumer.subscribe("orders", rec)
        await rec.wait_for(1)
    assert broker.destinations() == ["orders"]
    assert broker.depth("orders") == (0, 0)
    assert broker.depth("nowhere") == (0, 0)
