"""SQLiteDatabase: a participant's database in one SQLite file (stdlib ``sqlite3``).

One connection, owned by one dedicated thread: every statement runs there, so the event loop
never blocks on the disk. Commands take turns on it (an asyncio lock), which costs nothing
SQLite would not impose anyway: it has one writer at a time. ``BEGIN IMMEDIATE`` takes the
write lock before the inbox is read, so two processes sharing the file cannot both decide
to run the same command.

A sync handler runs *on that thread*, with the :class:`sqlite3.Connection` itself, so the
whole command is a few hops. An async handler gets an :class:`AsyncSQLiteConnection` whose
calls hop to the thread. (aiosqlite would do the same with a thread of its own and a new
dependency, and could not hand sync handlers its connection.)
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from sagaway.errors import StoreError
from sagaway.participant.base import Database, OutboxRow, Send, Transaction
from sagaway.store.sqlite import connect

__all__ = ["AsyncSQLiteConnection", "SQLiteDatabase"]

T = TypeVar("T")

_SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
_MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "inbox and outbox",
        [
            "CREATE TABLE IF NOT EXISTS sagaway_inbox (idempotency_key TEXT PRIMARY KEY, "
            "reply TEXT NOT NULL, created_at REAL NOT NULL) WITHOUT ROWID",
            "CREATE TABLE IF NOT EXISTS sagaway_participant_outbox (id INTEGER PRIMARY KEY, "
            "destination TEXT NOT NULL, body TEXT NOT NULL, created_at REAL NOT NULL, "
            "sent_at REAL)",
            "CREATE INDEX IF NOT EXISTS sagaway_participant_outbox_unsent "
            "ON sagaway_participant_outbox (id) WHERE sent_at IS NULL",
        ],
    ),
]
_ENDED = (
    "the handler ended the command's transaction (COMMIT or ROLLBACK on cmd.db), so its "
    "changes are no longer atomic with the inbox record; leave committing to sagaway"
)


class SQLiteDatabase(Database):
    """A participant's database in one SQLite file (WAL mode).

    Args:
        path: the database file (created if missing).
        synchronous: SQLite's ``synchronous`` pragma; FULL (default) survives power loss.
        busy_timeout: seconds to wait for another process's write lock.
        migrate: create sagaway's tables on ``open()``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 10.0,
        migrate: bool = True,
    ) -> None:
        mode = synchronous.upper()
        if mode not in _SYNC_MODES:
            raise StoreError(f"synchronous must be one of {_SYNC_MODES}, got {synchronous!r}")
        self.path = str(path)
        self.url = f"sqlite:///{self.path}"
        self.synchronous = mode
        self.busy_timeout = busy_timeout
        self.migrate_on_open = migrate
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        # One transaction at a time on the one connection; the relay takes it too.
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> SQLiteDatabase:
        """``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``?synchronous=NORMAL``,
        ``?busy_timeout=5``."""
        parts = urlsplit(url)
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise StoreError(f"no database file in {url!r}; use sqlite:///path/to/service.db")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"synchronous", "busy_timeout"}
        if unknown:
            raise StoreError(f"unknown SQLite URL option(s) {sorted(unknown)} in {url!r}")
        try:
            busy_timeout = float(query.get("busy_timeout", 10.0))
        except ValueError:
            raise StoreError(f"busy_timeout must be a number of seconds in {url!r}") from None
        return cls(path, synchronous=query.get("synchronous", "FULL"), busy_timeout=busy_timeout)

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, wrap: bool = True) -> T:
        """Run ``fn(connection)`` on the connection's thread (sqlite3 errors: StoreError)."""
        executor, conn = self._executor, self._conn
        if executor is None or conn is None:
            raise StoreError(f"{self!r} is not open: await open() or use the participant")

        def call() -> T:
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                if wrap:
                    raise StoreError(f"SQLite error on {self.path}: {exc}") from exc
                raise

        return await asyncio.get_running_loop().run_in_executor(executor, call)

    def _connect(self) -> sqlite3.Connection:
        conn = connect(self.path, synchronous=self.synchronous, busy_timeout=self.busy_timeout)
        try:
            if self.migrate_on_open:
                _migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        async with self._lock:
            if self._executor is not None:
                return
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sagaway-participant")
            try:
                self._conn = await asyncio.get_running_loop().run_in_executor(
                    executor, self._connect
                )
            except (sqlite3.Error, OSError) as exc:
                executor.shutdown(wait=False)
                raise StoreError(
                    f"cannot open the participant database {self.path!r}: {exc}"
                ) from exc
            self._executor = executor

    async def aclose(self) -> None:
        async with self._lock:
            executor, conn = self._executor, self._conn
            self._executor = self._conn = None
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)

    # -- the port ---------------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self._lock:
            tx = _SQLiteTransaction(self)
            try:
                yield tx
            finally:
                tx.connection._live = False
                if not tx.committed:
                    # The single-thread executor runs this after anything the handler
                    # still has queued there, so the rollback is the last word.
                    await self._call(_rollback)

    async def flush_outbox(self, send: Send, *, limit: int) -> int:
        def unsent(conn: sqlite3.Connection) -> list[OutboxRow]:
            rows = conn.execute(
                "SELECT id, destination, body FROM sagaway_participant_outbox "
                "WHERE sent_at IS NULL ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
            return [OutboxRow(*row) for row in rows]

        async with self._lock:
            rows = await self._call(unsent)
        if not rows:
            return 0
        # Published without holding the connection: commands keep flowing meanwhile.
        sent = list(await send(rows))
        if sent:

            def mark(conn: sqlite3.Connection) -> None:
                conn.executemany(
                    "UPDATE sagaway_participant_outbox SET sent_at = ? WHERE id = ?",
                    [(time.time(), i) for i in sent],
                )

            async with self._lock:
                await self._call(mark)
        return len(rows)

    async def purge_sent(self, before: float) -> int:
        def purge(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM sagaway_participant_outbox WHERE sent_at < ?", (before,)
            ).rowcount

        async with self._lock:
            return await self._call(purge)

    async def backlog(self) -> int:
        def count(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT count(*) FROM sagaway_participant_outbox WHERE sent_at IS NULL"
            ).fetchone()
            return int(row[0])

        async with self._lock:
            return await self._call(count)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _migrate(conn: sqlite3.Connection) -> None:
    # BEGIN IMMEDIATE: two processes opening a new file cannot both apply a migration.
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS sagaway_participant_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        done = {r[0] for r in conn.execute("SELECT version FROM sagaway_participant_migrations")}
        for version, name, statements in _MIGRATIONS:
            if version in done:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO sagaway_participant_migrations VALUES (?, ?, ?)",
                (version, name, time.time()),
            )
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


class _SQLiteTransaction(Transaction):
    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db
        self.connection = AsyncSQLiteConnection(db)
        self.committed = False

    async def claim(self, key: str, *, fence: tuple[str, dict[str, Any]] | None = None
                    ) -> dict[str, Any] | None:
        def claim(conn: sqlite3.Connection) -> dict[str, Any] | None:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "SELECT reply FROM sagaway_inbox WHERE idempotency_key = ?", (key,)
            ).fetchone()
            if row is not None:
                reply: dict[str, Any] = json.loads(row[0])
                return reply
            if fence is not None:
                conn.execute(
                    "INSERT OR IGNORE INTO sagaway_inbox VALUES (?, ?, ?)",
                    (fence[0], json.dumps(fence[1], separators=(",", ":")), time.time()),
                )
            conn.execute("SAVEPOINT sagaway_handler")
            return None

        return await self._db._call(claim)

    async def call_sync(self, fn: Callable[[Any], T]) -> T:
        return await self._db._call(fn, wrap=False)

    async def commit(
        self,
        key: str,
        reply: dict[str, Any] | None,
        *,
        undo: bool,
        destination: str | None = None,
        body: str | None = None,
    ) -> None:
        def commit(conn: sqlite3.Connection) -> None:
            if not conn.in_transaction:
                raise StoreError(_ENDED)
            if undo:
                conn.execute("ROLLBACK TO sagaway_handler")
            now = time.time()
            if reply is not None:
                conn.execute(
                    "INSERT INTO sagaway_inbox VALUES (?, ?, ?)",
                    (key, json.dumps(reply, separators=(",", ":")), now),
                )
            if destination is not None:
                conn.execute(
                    "INSERT INTO sagaway_participant_outbox (destination, body, created_at) "
                    "VALUES (?, ?, ?)",
                    (destination, body, now),
                )
            conn.execute("COMMIT")

        self.connection._live = False
        await self._db._call(commit)
        self.committed = True


class AsyncSQLiteConnection:
    """``cmd.db`` for an async handler on SQLite: the participant's connection, inside the
    command's transaction. Each call runs on the thread that owns the connection.

    Don't commit or roll back: sagaway commits the handler's changes with the inbox record.
    """

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db
        self._live = True

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the connection's thread: several statements in one hop."""
        if not self._live:
            raise StoreError("cmd.db was used after its command's transaction ended")
        return await self._db._call(fn, wrap=False)

    async def execute(self, sql: str, parameters: Sequence[Any] | dict[str, Any] = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        return await self.run(lambda conn: conn.execute(sql, parameters).rowcount)

    async def executemany(
        self, sql: str, seq_of_parameters: Iterable[Sequence[Any] | dict[str, Any]]
    ) -> int:
        rows = list(seq_of_parameters)
        return await self.run(lambda conn: conn.executemany(sql, rows).rowcount)

    async def fetchall(
        self, sql: str, parameters: Sequence[Any] | dict[str, Any] = ()
    ) -> list[Any]:
        return await self.run(lambda conn: conn.execute(sql, parameters).fetchall())

    async def fetchone(self, sql: str, parameters: Sequence[Any] | dict[str, Any] = ()) -> Any:
        """The first row (a tuple), or ``None``."""
        return await self.run(lambda conn: conn.execute(sql, parameters).fetchone())
