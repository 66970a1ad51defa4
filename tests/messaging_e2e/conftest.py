"""Fixtures of the messaging end-to-end tests: one suite, parametrised over the transport.

``broker_url`` is ``memory://`` or the URL of a real broker, found exactly as the transport
tests find it (tests/messaging/conftest.py, reused here): ``SAGAWAY_TEST_AMQP_URL``,
``SAGAWAY_TEST_NATS_URL``, ``SAGAWAY_TEST_REDIS_URL``; without one, that broker's tests skip;
under ``CI=true`` they fail. Each test uses fresh destination names (``Names``) and deletes
them from the broker afterwards. The figures (sagas, lost, double-applied, stuck per
transport) are printed in the terminal summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from msg_e2e_shop import FIGURES, Names

_MESSAGING = Path(__file__).resolve().parent.parent / "messaging"
if str(_MESSAGING) not in sys.path:
    sys.path.insert(0, str(_MESSAGING))  # messaging_helpers: broker control


def _load_messaging_conftest() -> object:
    spec = importlib.util.spec_from_file_location("sagaway_tests_messaging_conftest",
                                                  _MESSAGING / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_brokers = _load_messaging_conftest()
amqp_url = _brokers.amqp_url  # type: ignore[attr-defined]
nats_url = _brokers.nats_url  # type: ignore[attr-defined]
redis_url = _brokers.redis_url  # type: ignore[attr-defined]

TRANSPORTS = ("memory", "rabbitmq", "nats", "redis")
BROKERS = TRANSPORTS[1:]
_FIXTURE = {"rabbitmq": "amqp_url", "nats": "nats_url", "redis": "redis_url"}


def url_for(request: pytest.FixtureRequest, name: str) -> str:
    if name == "memory":
        return "memory://"
    url: str = request.getfixturevalue(_FIXTURE[name])
    return url


@pytest.fixture(params=TRANSPORTS)
def broker_url(request: pytest.FixtureRequest) -> str:
    """Every transport: memory, RabbitMQ, NATS JetStream, Redis Streams."""
    return url_for(request, request.param)


@pytest.fixture(params=BROKERS)
def real_broker_url(request: pytest.FixtureRequest) -> str:
    """The brokers that run as servers (can be stopped and restarted)."""
    return url_for(request, request.param)


async def delete_destinations(url: str, names: list[str]) -> None:
    """Remove what a test left on the broker (queues, streams)."""
    scheme = url.split("://", 1)[0]
    if scheme == "amqp":
        import aio_pika

        connection = await aio_pika.connect(url, timeout=10)
        try:
            for name in names:
                with contextlib.suppress(Exception):
                    channel = await connection.channel()
                    await channel.queue_delete(name)
                    await channel.close()
        finally:
            await connection.close()
    elif scheme == "nats":
        from sagaway.messaging.nats import NatsTransport, stream_name

        async with NatsTransport(url, connect_timeout=3) as t:
            for name in names:
                with contextlib.suppress(Exception):
                    await t.js.delete_stream(stream_name(name))
    elif scheme == "redis":
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=3)
        try:
            await client.delete(*[f"sagaway:{n}" for n in names])
        finally:
            await client.aclose()


@pytest.fixture
def names(request: pytest.FixtureRequest) -> Iterator[Names]:
    """Fresh destination names, deleted from the test's broker afterwards."""
    fresh = Names.fresh()
    yield fresh
    for fixture in ("broker_url", "real_broker_url"):
        if fixture in request.fixturenames:
            url = request.getfixturevalue(fixture)
            if not url.startswith("memory://"):
                with contextlib.suppress(Exception):
                    asyncio.run(asyncio.wait_for(delete_destinations(url, fresh.all()), 30))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("sagaway messaging end-to-end figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
