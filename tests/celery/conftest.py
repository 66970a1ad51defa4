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
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

HERE = Path(__file__).resolve().parent
_MESSAGING = HERE.parent / "messaging"
FIGURES: list[str] = []


def _load_messaging_conftest() -> object:
    spec = importlib.util.spec_from_file_location("sagaway_tests_messaging_conftest_celery",
                                                  _MESSAGING / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


amqp_url = _load_messaging_conftest().amqp_url  # type: ignore[attr-defined]

if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # celery_shop, for the in-process tests


@dataclass
class Names:
    """One test's queues: the Celery tasks' queue and the orchestrator's replies."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    @property
    def queue(self) -> str:
        return f"celery-test-{self.tag}"

    @property
    def replies(self) -> str:
        return f"celery-test-{self.tag}.replies"

    def all(self) -> list[str]:
        return [self.queue, self.replies, self.replies + ".dead-letter"]


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


class Worker:
    """One ``celery worker`` process (prefork, one child) on one queue."""

    def __init__(self, *, broker: str, ledger: Path, queue: str, name: str,
                 log_dir: Path, concurrency: int = 1, env: dict[str, str] | None = None,
                 app: str = "celery_shop", path: Path = HERE) -> None:
        self.broker, self.ledger, self.queue, self.name = broker, ledger, queue, name
        self.env = env or {}
        self.app, self.path = app, path
        self.log = log_dir / f"{name}.log"
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 60.0) -> Worker:
        env = dict(os.environ)
        env["SHOP_BROKER"] = self.broker
        env["SHOP_LEDGER"] = str(self.ledger)
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.path), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
        offset = self.log.stat().st_size if self.log.exists() else 0
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", self.app, "worker", "-Q", self.queue,
             "-n", f"{self.name}-{uuid.uuid4().hex[:6]}@%h", "-P", "prefork",
             "--concurrency", str(self.concurrency), "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-l", "INFO"],
            cwd=self.log.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode("utf-8", "replace")
            if " ready." in text:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker {self.name} exited {self.proc.returncode}:\n"
                                   f"{text[-4000:]}")
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"celery worker {self.name} was not ready in {timeout}s:\n"
                           f"{self.log.read_text()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the worker and its pool children (its whole process group)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM); SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()
        # The pool children are gone with the parent; make sure of it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def workers(amqp_url: str, names: Names, tmp_path: Path) -> Iterator[list[Worker]]:
    """Workers a test starts (``add``); every one still running is stopped afterwards."""
    started: list[Worker] = []
    yield started
    for w in started:
        w.kill()


def new_worker(started: list[Worker], *, broker: str, names: Names, tmp_path: Path,
               name: str, env: dict[str, str] | None = None) -> Worker:
    w = Worker(broker=broker, ledger=tmp_path / "shop.db", queue=names.queue, name=name,
               log_dir=tmp_path, env=env)
    started.append(w)
    return w


def effects(ledger: Path) -> Counter[tuple[str, str]]:
    """(idempotency key, task) → rows in the ledger."""
    if not ledger.exists():
        return Counter()
    with closing(sqlite3.connect(ledger)) as conn:
        try:
            rows = conn.execute("SELECT key, task FROM effects").fetchall()
        except sqlite3.OperationalError:  # no task has written yet
            return Counter()
    return Counter((k, t) for k, t in rows)


EFFECTS_DDL = ("CREATE TABLE IF NOT EXISTS effects (key TEXT, task TEXT, order_id TEXT, "
               "extra TEXT, at DOUBLE PRECISION)")


async def pg_connect(url: str) -> Any:
    """An asyncpg connection to a ``postgres_url`` (its ``?schema=`` as the search path,
    created if missing)."""
    import asyncpg

    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", None)
    dsn = urlunsplit(parts._replace(query=urlencode(query)))
    conn = await asyncpg.connect(dsn, timeout=10)
    if schema:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(f"SET search_path TO {schema}")
    return conn


async def pg_prepare(url: str) -> None:
    conn = await pg_connect(url)
    try:
        await conn.execute(EFFECTS_DDL)
    finally:
        await conn.close()


async def pg_effects(url: str) -> Counter[tuple[str, str]]:
    conn = await pg_connect(url)
    try:
        rows = await conn.fetch("SELECT key, task FROM effects")
    finally:
        await conn.close()
    return Counter((r[0], r[1]) for r in rows)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("sagaway celery figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
