"""Fixtures for the participant tests: every scenario on each database and each broker.

Databases: a real SQLite file, and PostgreSQL when ``SAGAWAY_TEST_POSTGRES_URL`` is set
(a schema per test; see tests/conftest.py). Brokers: the memory transport, and RabbitMQ
when ``SAGAWAY_TEST_AMQP_URL`` is set (queues deleted after each test). A missing server
skips its tests, or fails them under ``CI=true``, as in tests/messaging/conftest.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable

import pytest
from participant_helpers import Orchestra, PostgresShop, Shop, SQLiteShop, fresh

from sagaway.messaging.base import Transport
from sagaway.messaging.memory import MemoryBroker, MemoryTransport

AMQP_ENV = "SAGAWAY_TEST_AMQP_URL"
AMQP_HINT = (
    f"set {AMQP_ENV}=amqp://guest:guest@127.0.0.1:5672/ to run the RabbitMQ tests "
    f"(start the server with: rabbitmq-server -detached)"
)


async def _probe_amqp(url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=5)
    await connection.close()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    url = os.environ.get(AMQP_ENV)
    problem = None if url else f"{AMQP_ENV} is not set"
    if url:
        try:
            asyncio.run(asyncio.wait_for(_probe_amqp(url), 10))
        except ImportError as exc:
            problem = f"aio-pika is not installed ({exc}): pip install -e '.[dev]'"
        except Exception as exc:
            problem = f"cannot reach RabbitMQ at {AMQP_ENV}: {exc!r}"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"{AMQP_ENV} must name a reachable broker under CI=true: {problem}", pytrace=False
            )
        pytest.skip(f"{problem}; {AMQP_HINT}")
    assert url is not None
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def new_shop(request: pytest.FixtureRequest, tmp_path: object) -> Shop:
    # Sync, so that the PostgreSQL fixtures (which probe with asyncio.run) resolve here.
    if request.param == "sqlite":
        return SQLiteShop(f"{tmp_path}/inventory.db")
    return PostgresShop(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def shop(new_shop: Shop) -> Shop:
    """The service's database with its business tables (``stock``, ``ledger``)."""
    await new_shop.setup()
    return new_shop


@pytest.fixture(params=["memory", "amqp"])
def broker_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("amqp_url")
    return url


@pytest.fixture
async def transports(broker_url: str) -> AsyncIterator[Callable[[], Transport]]:
    """Builds transports on one broker (a memory broker shared by all, or RabbitMQ)."""
    memory = MemoryBroker()
    made: list[Transport] = []

    def make() -> Transport:
        if broker_url == "memory://":
            made.append(MemoryTransport(memory))
        else:
            from sagaway.messaging.rabbitmq import RabbitMQTransport

            made.append(RabbitMQTransport(broker_url))
        return made[-1]

    yield make
    for transport in made:
        await transport.aclose()
    queues = {q for t in made for q in getattr(t, "declared", ())}
    if queues:
        import aio_pika

        connection = await aio_pika.connect(broker_url, timeout=10)
        try:
            channel = await connection.channel()
            for name in sorted(queues):
                await channel.queue_delete(name)
        finally:
            await connection.close()


@pytest.fixture
async def orchestra(transports: Callable[[], Transport]) -> Orchestra:
    """The orchestrator's side, on its own transport, for a fresh service name."""
    side = Orchestra(transports(), fresh("inventory"))
    await side.start()
    return side


@pytest.fixture(params=[True, False], ids=["sync", "async"])
def sync(request: pytest.FixtureRequest) -> bool:
    """Whether the shop's handlers are sync (run on a thread) or async."""
    value: bool = request.param
    return value
