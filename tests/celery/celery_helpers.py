"""Helpers of the Celery integration tests (imported by the tests and conftest.py): fresh
queue names, ``celery worker`` processes, and the ledger the tasks write.

Also what ``celery_shop.py`` (run by the workers) expects in its environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
FIGURES: list[str] = []
"""One line per measured test; conftest prints them in the terminal summary."""


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
