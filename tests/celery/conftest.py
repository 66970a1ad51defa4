"""Fixtures of the Celery integration tests: the RabbitMQ broker and real ``celery worker``s.

The broker comes from ``SAGAWAY_TEST_AMQP_URL`` exactly as the transport tests find it
(tests/messaging/conftest.py): without it these tests skip; under ``CI=true`` they fail.
Every test gets fresh queue names (its Celery queue, its replies' queue) and deletes them
afterwards; worker processes run ``tests/celery/celery_shop.py`` with ``-Q <its queue>``
and are stopped (or SIGKILLed) by the test. Figures are printed in the terminal summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_MESSAGING = HERE.parent / "messaging"


def _load_messaging_conftest() -> object:
    spec = importlib.util.spec_from_file_location("sagaway_tests_messaging_conftest_celery",
                                                  _MESSAGING / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


amqp_url = _load_messaging_conftest().amqp_url  # type: ignore[attr-defined]

if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # celery_helpers, celery_shop

from celery_helpers import FIGURES, Names, Worker  # noqa: E402


async def _delete_queues(url: str, names: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=10)
    try:
        for name in names:
            with contextlib.suppress(Exception):
                channel = await connection.channel()
                await channel.queue_delete(name)
                await channel.close()
            with contextlib.suppress(Exception):  # the direct exchange Celery declares
                channel = await connection.channel()
                await channel.exchange_delete(name)
                await channel.close()
    finally:
        await connection.close()


@pytest.fixture
def names(amqp_url: str) -> Iterator[Names]:
    fresh = Names()
    yield fresh
    with contextlib.suppress(Exception):
        asyncio.run(_delete_queues(amqp_url, fresh.all()))


@pytest.fixture
def workers(amqp_url: str, names: Names, tmp_path: Path) -> Iterator[list[Worker]]:
    """Workers a test starts (``add``); every one still running is stopped afterwards."""
    started: list[Worker] = []
    yield started
    for w in started:
        w.kill()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("sagaway celery figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _close_task_inboxes() -> Iterator[None]:
    """Tasks run in-process here open PostgreSQL inboxes (a pool on a loop thread): close
    them after each test, as a worker process does on shutdown."""
    yield
    from sagaway.integrations.celery import close_inboxes

    close_inboxes()
