"""NatsTransport against the transport conformance suite, plus what only it has.

Runs on the server ``SAGAWAY_TEST_NATS_URL`` names (see conftest.py). Every stream a test
creates is deleted after it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import nats
import nats.js.api
import pytest
from messaging_helpers import nats_down, publish_through_a_restart

from sagaway.errors import TransportError
from sagaway.messaging import open_transport
from sagaway.messaging.base import Transport
from sagaway.messaging.nats import NatsTransport, stream_name
from sagaway.testing.transport_conformance import Recorder, TransportConformance, full_envelope

pytestmark = pytest.mark.e2e


def fast(url: str, **options: Any) -> NatsTransport:
    """A transport whose pulls are short, so stopping a subscription is quick."""
    return NatsTransport(url, fetch_timeout=0.25, **options)


async def _delete_streams(url: str, prefix: str) -> None:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name and info.config.name.startswith(prefix):
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()


@pytest.fixture
async def ns(nats_url: str) -> AsyncIterator[str]:
    """A namespace for one test's destinations; its streams are deleted afterwards."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    yield namespace
    await _delete_streams(nats_url, stream_name(namespace))


class TestNatsTransport(TransportConformance):
    @pytest.fixture
    def transport_factory(  # type: ignore[override]
        self, nats_url: str, namespace: str
    ) -> Iterator[Callable[[], Transport]]:
        yield lambda: fast(nats_url)

    @pytest.fixture(autouse=True)
    async def _cleanup(self, nats_url: str, namespace: str) -> AsyncIterator[None]:
        yield
        await _delete_streams(nats_url, stream_name(namespace))


async def test_open_transport_builds_nats(nats_url: str) -> None:
    assert isinstance(open_transport(nats_url), NatsTransport)
    assert isinstance(open_transport("tls://127.0.0.1:4222"), NatsTransport)


async def test_an_unreachable_server_is_a_transport_error_without_the_password() -> None:
    transport = NatsTransport("nats://user:s3cret@127.0.0.1:1", connect_timeout=1)
    with pytest.raises(TransportError, match="connecting failed") as info:
        await transport.open()
    assert "s3cret" not in str(info.value)


async def test_a_destination_is_a_file_backed_work_queue_stream(nats_url: str, ns: str) -> None:
    async with fast(nats_url) as transport:
        assert isinstance(transport, NatsTransport)
        await transport.publish(f"{ns}.orders", full_envelope())
        info = await transport.js.stream_info(stream_name(f"{ns}.orders"))
    assert info.config.subjects == [f"{ns}.orders"]
    assert info.config.retention == nats.js.api.RetentionPolicy.WORK_QUEUE
    assert info.config.storage == nats.js.api.StorageType.FILE
    assert info.state.messages == 1


async def test_names_that_map_to_one_stream_are_refused(nats_url: str, ns: str) -> None:
    async with fast(nats_url) as transport:
        await transport.publish(f"{ns}.a_b", full_envelope())
        with pytest.raises(TransportError, match="share a stream name"):
            await transport.publish(f"{ns}.a.b", full_envelope())


async def test_a_retried_publish_is_stored_once(nats_url: str, ns: str) -> None:
    """Nats-Msg-Id is the envelope id: a publish repeated after a lost PubAck is deduplicated."""
    async with fast(nats_url) as transport:
        assert isinstance(transport, NatsTransport)
        env = full_envelope()
        for _ in range(3):
            await transport.publish(f"{ns}.dedup", env)
        info = await transport.js.stream_info(stream_name(f"{ns}.dedup"))
        assert info.state.messages == 1
        rec = Recorder()
        await transport.subscribe(f"{ns}.dedup", rec)
        await rec.wait_for(1)
        assert rec.ids == [env.id]


async def test_a_consumer_that_dies_holding_a_message_loses_it_after_ack_wait(
    nats_url: str, ns: str
) -> None:
    source = f"{ns}.crashy"
    async with fast(nats_url, ack_wait=1.0) as transport:
        assert isinstance(transport, NatsTransport)
        sent = full_envelope()
        await transport.publish(source, sent)
        # Another process takes it through the same durable consumer and dies.
        sub = await transport.subscribe(source, Recorder())  # creates the durable consumer
        await sub.stop()
        nc = await nats.connect(nats_url)
        psub = await nc.jetstream().pull_subscribe_bind("sagaway", stream_name(source))
        [taken] = await psub.fetch(1, timeout=5)
        await nc.close()
        assert taken.metadata.num_delivered == 1

        rec = Recorder()
        await transport.subscribe(source, rec, max_deliveries=3)
        [delivery] = await rec.wait_for(1)
        assert (delivery.envelope, delivery.attempt) == (sent, 2)


async def test_max_deliveries_must_stay_under_the_delivery_limit(nats_url: str, ns: str) -> None:
    async with fast(nats_url, delivery_limit=4) as transport:
        with pytest.raises(TransportError, match="delivery_limit=4"):
            await transport.subscribe(f"{ns}.x", Recorder(), max_deliveries=4)


async def test_server_killed_and_restarted_with_a_publisher_and_a_consumer_active(
    nats_url: str, ns: str
) -> None:
    """kill -9 nats-server, start it again: the clients reconnect, nothing confirmed is lost."""
    publisher = fast(nats_url, publish_timeout=2.0, ack_wait=5.0)
    consumer = fast(nats_url, publish_timeout=2.0, ack_wait=5.0)
    async with publisher, consumer:
        report = await publish_through_a_restart(
            publisher, consumer, f"{ns}.restart", nats_down, outage=2.0
        )
        reconnects = [t._nc.stats["reconnects"] for t in (publisher, consumer) if t._nc]
    print(f"NATS restart: {report.summary()}, reconnects {reconnects}")
    # Publishes wait for the reconnection (nats-py buffers them), so some may not fail.
    assert reconnects == [1, 1], "the clients did not notice the outage"
    assert report.confirmed_after_restart >= 20
    assert report.lost == []
