"""Fixtures for the observability tests: OpenTelemetry's in-memory exporter, RabbitMQ."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

AMQP_ENV = "SAGAWAY_TEST_AMQP_URL"


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A tracer provider of the test's own (never the global one) and its exported spans."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


async def _probe_amqp(url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=5)
    await connection.close()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """RabbitMQ's URL; skips without SAGAWAY_TEST_AMQP_URL, fails under CI=true."""
    url = os.environ.get(AMQP_ENV)
    problem = None if url else f"{AMQP_ENV} is not set"
    if url:
        try:
            asyncio.run(asyncio.wait_for(_probe_amqp(url), 10))
        except Exception as exc:
            problem = f"cannot reach RabbitMQ at {url}: {exc!r}"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"RabbitMQ is required under CI=true: {problem}", pytrace=False)
        pytest.skip(f"{problem}; set {AMQP_ENV}=amqp://guest:guest@127.0.0.1:5672/")
    assert url is not None
    return url
