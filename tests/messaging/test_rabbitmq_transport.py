"""RabbitMQTransport against the transport conformance suite, plus what only it has.

Runs on the server ``SAGAWAY_TEST_AMQP_URL`` names (see conftest.py). Every queue a test
declares is deleted after it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import aio_pika
import pytest
from messaging_helpers import publish_through_a_restart, rabbitmq_down, run

from sagaway.errors import TransportError
from sagaway.messaging import open_transport
from sagaway.messaging.base import Transport
from sagaway.messaging.rabbitmq import RabbitMQTransport
from sagaway.testing.transport_conformance import (
    Recorder,
    TransportConformance,
    full_envelope,
)

pytestmark = pytest.mark.e2e


async def _delete_queues(url: str, names: set[str]) -> None:
    if not names:
        return
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        for name in sorted(names):
            await channel.queue_delete(name)
    finally:
        await connection.close()


@pytest.fixture
async def made(amqp_url: str) -> AsyncIterator[list[RabbitMQTransport]]:
    """RabbitMQ transports a test builds; their queues are deleted afterwards."""
    transports: list[RabbitMQTransport] = []
    yield transports
    for t in transports:
        await t.aclose()
    await _delete_queues(amqp_url, {q for t in transports for q in t.declared})


class TestRabbitMQTransport(TransportConformance):
    @pytest.fixture
    def transport_factory(  # type: ignore[override]
        self, amqp_url: str, made: list[RabbitMQTransport]
    ) -> Callable[[], Transport]:
        def make() -> Transport:
            made.append(RabbitMQTransport(amqp_url))
            return made[-1]

        return make


async def test_open_transport_builds_rabbitmq(amqp_url: str) -> None:
    transport = open_transport(amqp_url)
    assert isinstance(transport, RabbitMQTransport)
    assert "guest:guest" not in repr(transport)


async def test_an_unreachable_broker_is_a_transport_error_without_the_password() -> None:
    transport = RabbitMQTransport("amqp://guest:s3cret@127.0.0.1:1/", connect_timeout=3)
    with pytest.raises(TransportError, match="connecting failed") as info:
        await transport.open()
    assert "s3cret" not in str(info.value)
    assert "amqp://guest:***@127.0.0.1:1/" in str(info.value)


async def test_queues_are_durable_quorum_queues_with_a_delivery_limit(
    amqp_url: str, made: list[RabbitMQTransport]
) -> None:
    made.append(transport := RabbitMQTransport(amqp_url, delivery_limit=7))
    name = f"t{id(transport)}.kind"
    async with transport:
        await transport.publish(name, full_envelope())
    text = await run("rabbitmqctl", "-q", "list_queues", "name", "type", "durable",
                     "arguments", "--formatter", "json")
    [queue] = [q for q in json.loads(text) if q["name"] == name]
    assert (queue["type"], queue["durable"]) == ("quorum", True)
    args = {a[0]: a[2] for a in queue["arguments"]} if isinstance(queue["arguments"], list) \
        else queue["arguments"]
    assert args["x-delivery-limit"] == 7
    assert args["x-dead-letter-exchange"] == "sagaway.dead-letter"


async def test_max_deliveries_over_the_delivery_limit_is_refused(
    amqp_url: str, made: list[RabbitMQTransport]
) -> None:
    made.append(transport := RabbitMQTransport(amqp_url, delivery_limit=3))
    async with transport:
        with pytest.raises(TransportError, match="delivery_limit=3"):
            await transport.subscribe(f"t{id(transport)}.x", Recorder(), max_deliveries=4)


async def test_a_consumer_that_dies_holding_a_message_counts_as_a_delivery(
    amqp_url: str, made: list[RabbitMQTransport]
) -> None:
    made.append(transport := RabbitMQTransport(amqp_url))
    source = f"t{id(transport)}.crashy"
    async with transport:
        sent = full_envelope()
        await transport.publish(source, sent)
        # Another process takes the message and dies before acking it.
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel()
        queue = await channel.get_queue(source, ensure=False)
        message = await queue.get(no_ack=False, fail=True)
        assert message is not None
        await connection.close()

        rec = Recorder()
        await transport.subscribe(source, rec, max_deliveries=2)
        [delivery] = await rec.wait_for(1)
        assert (delivery.envelope, delivery.attempt) == (sent, 2)


async def test_the_broker_dead_letters_what_consumers_never_settle(
    amqp_url: str, made: list[RabbitMQTransport]
) -> None:
    """x-delivery-limit is the backstop: consumers that keep dying cannot loop a message."""
    made.append(transport := RabbitMQTransport(amqp_url, delivery_limit=1))
    source = f"t{id(transport)}.doomed"
    async with transport:
        sub = await transport.subscribe(source, Recorder(), max_deliveries=1)
        await sub.stop()  # the source and its dead-letter queue exist and are bound
        sent = full_envelope()
        await transport.publish(source, sent)

        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(source, ensure=False)
            for _ in range(2):  # give it back twice: over a limit of one
                message = None
                for _ in range(50):
                    message = await queue.get(no_ack=False, fail=False)
                    if message is not None:
                        break
                    await asyncio.sleep(0.05)
                assert message is not None
                await message.nack(requeue=True)
        finally:
            await connection.close()

        dead = Recorder()
        await transport.subscribe(source + ".dead-letter", dead, max_deliveries=1)
        [letter] = await dead.wait_for(1)
        info = letter.dead_letter
        assert info is not None
        assert info.source == source
        assert "dead-lettered by RabbitMQ" in info.reason and "limit" in info.reason
        assert info.envelope() == sent


async def test_broker_restart_with_a_publisher_and_a_consumer_active(
    amqp_url: str, made: list[RabbitMQTransport]
) -> None:
    """rabbitmqctl stop_app / start_app: connect_robust reconnects, nothing confirmed is lost."""
    made.append(publisher := RabbitMQTransport(amqp_url, reconnect_interval=0.5))
    made.append(consumer := RabbitMQTransport(amqp_url, reconnect_interval=0.5))
    async with publisher, consumer:
        report = await publish_through_a_restart(
            publisher, consumer, f"t{id(publisher)}.restart", rabbitmq_down
        )
    print(f"RabbitMQ restart: {report.summary()}")
    assert report.failed_publishes > 0, "the outage was not noticed: did the broker stop?"
    assert report.confirmed_after_restart >= 20
    assert report.lost == []
