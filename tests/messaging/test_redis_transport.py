"""RedisTransport against the transport conformance suite, plus what only it has.

Runs on the server ``SAGAWAY_TEST_REDIS_URL`` names (see conftest.py). Every stream a test
creates is deleted after it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio
from messaging_helpers import publish_through_a_restart, redis_down

from sagaway.errors import TransportError
from sagaway.messaging import open_transport
from sagaway.messaging.base import Transport
from sagaway.messaging.redis import RedisTransport
from sagaway.testing.transport_conformance import (
    Recorder,
    TransportConformance,
    eventually,
    full_envelope,
)

pytestmark = pytest.mark.e2e


def fast(url: str, **options: Any) -> RedisTransport:
    """A transport that polls often, so retries and stops are quick."""
    return RedisTransport(url, poll_interval=0.1, **options)


async def _delete_keys(url: str, pattern: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=pattern, count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def ns(redis_url: str) -> AsyncIterator[str]:
    """A namespace for one test's destinations; its streams are deleted afterwards."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    yield namespace
    await _delete_keys(redis_url, f"sagaway:{namespace}*")


class TestRedisTransport(TransportConformance):
    @pytest.fixture
    def transport_factory(  # type: ignore[override]
        self, redis_url: str, namespace: str
    ) -> Iterator[Callable[[], Transport]]:
        yield lambda: fast(redis_url)

    @pytest.fixture(autouse=True)
    async def _cleanup(self, redis_url: str, namespace: str) -> AsyncIterator[None]:
        yield
        await _delete_keys(redis_url, f"sagaway:{namespace}*")


async def test_open_transport_builds_redis(redis_url: str) -> None:
    assert isinstance(open_transport(redis_url), RedisTransport)
    assert isinstance(open_transport("rediss://127.0.0.1:6380/0"), RedisTransport)


async def test_an_unreachable_server_is_a_transport_error_without_the_password() -> None:
    transport = RedisTransport("redis://:s3cret@127.0.0.1:1/0", connect_timeout=1)
    with pytest.raises(TransportError, match="connecting failed") as info:
        await transport.open()
    assert "s3cret" not in str(info.value)


async def test_settled_entries_leave_the_stream(redis_url: str, ns: str) -> None:
    source = f"{ns}.tidy"
    async with fast(redis_url) as transport:
        assert isinstance(transport, RedisTransport)
        r = transport.client
        rec = Recorder(fail=lambda d: d.envelope.payload == "bad")
        await transport.subscribe(source, rec, max_deliveries=2)
        await transport.publish(source, full_envelope(payload="good"))
        await transport.publish(source, full_envelope(payload="bad"))
        await eventually(lambda: len(rec.deliveries) == 3, what="3 deliveries")
        for _ in range(100):
            if await r.xlen(transport.key(source)) == 0:
                break
            await asyncio.sleep(0.05)
        assert await r.xlen(transport.key(source)) == 0
        assert await r.xlen(transport.key(source + ".dead-letter")) == 1
        assert (await r.xpending(transport.key(source), "sagaway"))["pending"] == 0


async def test_entries_a_dead_consumer_left_pending_are_claimed(redis_url: str, ns: str) -> None:
    source = f"{ns}.orphans"
    async with fast(redis_url, claim_idle=0.3) as transport:
        assert isinstance(transport, RedisTransport)
        r = transport.client
        sent = [full_envelope(payload=i) for i in range(3)]
        for env in sent:
            await transport.publish(source, env)
        # A consumer of the group reads them and dies before acking.
        await r.xgroup_create(transport.key(source), "sagaway", id="0", mkstream=True)
        taken = await r.xreadgroup("sagaway", "ghost", {transport.key(source): ">"}, count=3)
        assert len(taken[0][1]) == 3

        rec = Recorder()
        await transport.subscribe(source, rec)
        await rec.wait_for(3)
        assert sorted(rec.ids) == sorted(e.id for e in sent)
        assert [d.attempt for d in rec.deliveries] == [2, 2, 2]  # XPENDING's count


async def test_a_long_handler_keeps_its_entry(redis_url: str, ns: str) -> None:
    """Heartbeats keep a slow handler's entry from being claimed by another consumer."""
    source = f"{ns}.slow"
    async with fast(redis_url, claim_idle=0.4) as a, fast(redis_url, claim_idle=0.4) as b:
        slow, other = Recorder(delay=1.5), Recorder()
        await a.subscribe(source, slow, prefetch=1)
        sent = full_envelope()
        await a.publish(source, sent)
        await slow.wait_for(1)
        await b.subscribe(source, other)
        await eventually(lambda: len(slow.done) == 1, what="the slow handler")
        await asyncio.sleep(0.5)
        assert other.deliveries == []
        assert [d.attempt for d in slow.deliveries] == [1]


async def test_a_lost_stream_and_group_are_made_again(redis_url: str, ns: str) -> None:
    """What a restart of a Redis that keeps nothing looks like to a running consumer."""
    source = f"{ns}.amnesia"
    async with fast(redis_url) as transport:
        assert isinstance(transport, RedisTransport)
        rec = Recorder()
        await transport.subscribe(source, rec)
        await transport.publish(source, full_envelope(payload=1))
        await rec.wait_for(1)
        await transport.client.delete(transport.key(source))  # stream and group gone
        await transport.publish(source, full_envelope(payload=2))
        await rec.wait_for(2)
        assert [d.envelope.payload for d in rec.deliveries] == [1, 2]


async def test_server_restarted_with_a_publisher_and_a_consumer_active(
    redis_url: str, ns: str
) -> None:
    """shutdown nosave, start again: the clients reconnect, nothing confirmed is lost.

    This server keeps nothing across a restart (``--save "" --appendonly no``), so the
    publisher pauses until the consumer has caught up before the shutdown; it then
    publishes through the outage and after it. With persistence (AOF) the pause is not
    needed.
    """
    publisher, consumer = fast(redis_url), fast(redis_url)
    async with publisher, consumer:
        report = await publish_through_a_restart(
            publisher, consumer, f"{ns}.restart", redis_down, drain_before_stop=True
        )
    print(f"Redis restart: {report.summary()}")
    assert report.failed_publishes > 0, "the outage was not noticed: did the server stop?"
    assert report.confirmed_after_restart >= 20
    assert report.lost == []
