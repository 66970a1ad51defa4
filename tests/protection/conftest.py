"""Fixtures for the data-protection tests: keys, a RabbitMQ URL (as in tests/participant)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

AMQP_ENV = "SAGAWAY_TEST_AMQP_URL"


async def _probe_amqp(url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=5)
    await connection.close()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The RabbitMQ URL; skips without it, fails under CI=true."""
    url = os.environ.get(AMQP_ENV)
    problem = None if url else f"{AMQP_ENV} is not set"
    if url:
        try:
            asyncio.run(_probe_amqp(url))
        except Exception as exc:
            problem = f"cannot reach RabbitMQ at {AMQP_ENV}: {exc!r}"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{AMQP_ENV} must name a reachable broker under CI=true: {problem}",
                        pytrace=False)
        pytest.skip(f"{problem}; set {AMQP_ENV}=amqp://guest:guest@127.0.0.1:5672/")
    assert url is not None
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A saga log: a SQLite file in ``tmp_path/log``, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/log/sagas.db"
    url: str = request.getfixturevalue("postgres_url")
    return url
