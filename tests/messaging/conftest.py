"""Fixtures for the transport tests: real brokers, found from the environment.

RabbitMQ, NATS and Redis tests read ``SAGAWAY_TEST_AMQP_URL``, ``SAGAWAY_TEST_NATS_URL`` and
``SAGAWAY_TEST_REDIS_URL`` (``.ci/run`` sets them to the local servers). Without one, that
broker's tests skip and say how to enable them; under ``CI=true`` a missing or unreachable
broker fails the run instead of skipping silently, as PostgreSQL does in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import pytest

AMQP_ENV = "SAGAWAY_TEST_AMQP_URL"
NATS_ENV = "SAGAWAY_TEST_NATS_URL"
REDIS_ENV = "SAGAWAY_TEST_REDIS_URL"

HINTS = {
    AMQP_ENV: (
        f"set {AMQP_ENV}=amqp://guest:guest@127.0.0.1:5672/ to run the RabbitMQ tests "
        f"(start the server with: rabbitmq-server -detached)"
    ),
    NATS_ENV: (
        f"set {NATS_ENV}=nats://127.0.0.1:4222 to run the NATS tests (start the server "
        f"with: start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server "
        f"-- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log)"
    ),
    REDIS_ENV: (
        f"set {REDIS_ENV}=redis://127.0.0.1:6379/0 to run the Redis tests (start the server "
        f'with: redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
        f"--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log)"
    ),
}


def _missing(env: str, reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{env} must name a reachable broker under CI=true: {reason}", pytrace=False)
    pytest.skip(f"{reason}; {HINTS[env]}")


async def _probe_amqp(url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=5)
    await connection.close()


async def _probe_nats(url: str) -> None:
    # Through the transport: a bare nats.connect() retries a refused connection forever.
    from sagaway.messaging.nats import NatsTransport

    async with NatsTransport(url, connect_timeout=3):  # also checks JetStream is enabled
        pass


async def _probe_redis(url: str) -> None:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=3)
    try:
        await client.ping()
    finally:
        await client.aclose()


def _broker_url(env: str, probe: Callable[[str], Awaitable[None]]) -> str:
    url = os.environ.get(env)
    if not url:
        _missing(env, f"{env} is not set")
    assert url is not None
    try:
        asyncio.run(asyncio.wait_for(probe(url), 10))
    except ImportError as exc:
        _missing(env, f"the driver is not installed ({exc}): pip install -e '.[dev]'")
    except Exception as exc:
        _missing(env, f"cannot reach {env.split('_')[-2]} at its URL: {exc!r}")
    return url


@pytest.fixture(scope="session")
def amqp_url() -> str:
    return _broker_url(AMQP_ENV, _probe_amqp)


@pytest.fixture(scope="session")
def nats_url() -> str:
    return _broker_url(NATS_ENV, _probe_nats)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _broker_url(REDIS_ENV, _probe_redis)
