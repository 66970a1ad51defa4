"""PostgresDatabase: a participant's database in PostgreSQL (asyncpg, the ``[postgres]`` extra).

Each command takes a pooled connection for its transaction, so commands run concurrently.
The idempotency key is locked by inserting its inbox row first (``ON CONFLICT DO NOTHING``):
a second delivery of the same command, on this process or another replica, waits on that
row until the first commits, then finds its reply; if the first rolled back, it runs the
handler itself. The relay claims unsent outbox rows with ``FOR UPDATE SKIP LOCKED``, so
replicas sharing the database do not publish the same reply at once.

An async handler gets the :class:`asyncpg.Connection` itself; a sync handler runs on a
thread with a :class:`SyncPostgresConnection`, whose calls run on that same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sagaway.errors import StoreError
from sagaway.participant.base import Database, OutboxRow, Send, Transaction, _safe_url

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "PostgreSQL support needs the asyncpg driver: pip install 'sagaway[postgres]'"
    ) from exc

__all__ = ["PostgresDatabase", "SyncPostgresConnection"]

T = TypeVar("T")

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Any stable 64-bit number, distinct from the saga store's: serialises migrations.
_MIGRATION_LOCK = 0x5A6A_7761_7900_0002
_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)
_MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "inbox and outbox",
        """
        CREATE TABLE IF NOT EXISTS sagaway_inbox (
            idempotency_key TEXT PRIMARY KEY,
            reply JSON,  -- NULL only inside the transaction that claimed the key
            created_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE IF NOT EXISTS sagaway_participant_outbox (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            destination TEXT NOT NULL,
            body TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            sent_at DOUBLE PRECISION
        );
        CREATE INDEX IF NOT EXISTS sagaway_participant_outbox_unsent
            ON sagaway_participant_outbox (id) WHERE sent_at IS NULL;
    """,
    ),
]
_CLAIM_SQL = """
INSERT INTO sagaway_inbox (idempotency_key, created_at) VALUES ($1, $2)
ON CONFLICT (idempotency_key) DO NOTHING RETURNING true
"""
# One round trip: record the reply (unless it was recorded before) and enqueue it.
_COMMIT_SQL = """
WITH recorded AS (
    UPDATE sagaway_inbox SET reply = $2::text::json
    WHERE idempotency_key = $1 AND $2::text IS NOT NULL
)
INSERT INTO sagaway_participant_outbox (destination, body, created_at) VALUES ($3, $4, $5)
"""
_ENDED = (
    "the handler ended the command's transaction (COMMIT or ROLLBACK on cmd.db), so its "
    "changes are no longer atomic with the inbox record; leave committing to sagaway"
)


class PostgresDatabase(Database):
    """A participant's database in PostgreSQL.

    Args:
        dsn: ``postgresql://user:password@host:5432/dbname``; ``?schema=name`` keeps the
            tables in that schema (created if missing, and the pool's ``search_path``).
        pool: an asyncpg pool the service already has, instead of ``dsn`` (the participant
            then never closes it).
        min_size / max_size: bounds of the pool built from ``dsn``.
        migrate: create sagaway's tables on ``open()`` (under an advisory lock).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: asyncpg.Pool | None = None,
        min_size: int = 1,
        max_size: int = 10,
        migrate: bool = True,
        command_timeout: float = 30.0,
        schema: str | None = None,
    ) -> None:
        if (dsn is None) == (pool is None):
            raise StoreError("PostgresDatabase takes a dsn or a pool (one of them)")
        if dsn is not None:
            parts = urlsplit(dsn)
            query = parse_qsl(parts.query, keep_blank_values=True)
            schema = dict(query).get("schema", schema)
            dsn = urlunsplit(
                parts._replace(query=urlencode([(k, v) for k, v in query if k != "schema"]))
            )
        elif schema is not None:
            raise StoreError(
                "schema applies to a pool built from a dsn; set the search_path "
                "of your own pool instead"
            )
        if schema is not None and not _IDENT.match(schema):
            raise StoreError(f"schema {schema!r} is not a plain identifier ([a-z_][a-z0-9_]*)")
        self.url = dsn or "postgresql://(pool)"
        self.dsn = dsn
        self.schema = schema
        self.min_size = min_size
        self.max_size = max_size
        self.migrate_on_open = migrate
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = pool
        self._owns_pool = pool is None
        self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def _error(self, doing: str, exc: BaseException) -> StoreError:
        return StoreError(
            f"PostgreSQL at {_safe_url(self.url)}: {doing} failed: {type(exc).__name__}: {exc}"
        )

    def _require(self) -> asyncpg.Pool:
        if not self._open or self._pool is None:
            raise StoreError(f"{self!r} is not open: await open() or use the participant")
        return self._pool

    async def open(self) -> None:
        if self._open:
            return
        try:
            if self._owns_pool:
                if self.schema is not None:
                    conn = await asyncpg.connect(self.dsn)
                    try:
                        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
                    except asyncpg.UniqueViolationError:
                        pass  # another replica created it at the same moment (IF NOT EXISTS races)
                    finally:
                        await conn.close()
                settings = {"search_path": self.schema} if self.schema else None
                self._pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    command_timeout=self.command_timeout,
                    server_settings=settings,
                )
            self._open = True
            if self.migrate_on_open:
                await self._migrate()
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, _ERRORS):
                raise self._error("opening", exc) from exc
            raise

    async def _migrate(self) -> None:
        async with self._require().acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS sagaway_participant_migrations (version INTEGER "
                "PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            rows = await conn.fetch("SELECT version FROM sagaway_participant_migrations")
            done = {r[0] for r in rows}
            for version, name, sql in _MIGRATIONS:
                if version not in done:
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO sagaway_participant_migrations "
                        "(version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )

    async def aclose(self) -> None:
        self._open = False
        if self._owns_pool:
            pool, self._pool = self._pool, None
            if pool is not None:
                await pool.close()

    # -- the port ---------------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        pool = self._require()
        try:
            conn = await pool.acquire()
        except _ERRORS as exc:
            raise self._error("acquiring a connection", exc) from exc
        tx = _PostgresTransaction(self, conn)
        try:
            yield tx
        finally:
            try:
                await tx.close()
            finally:
                await pool.release(conn)

    async def flush_outbox(self, send: Send, *, limit: int) -> int:
        try:
            async with self._require().acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    "SELECT id, destination, body FROM sagaway_participant_outbox "
                    "WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                    limit,
                )
                if not rows:
                    return 0
                sent = list(await send([OutboxRow(r[0], r[1], r[2]) for r in rows]))
                if sent:
                    await conn.execute(
                        "UPDATE sagaway_participant_outbox SET sent_at = $2 "
                        "WHERE id = ANY($1::bigint[])",
                        sent,
                        time.time(),
                    )
                return len(rows)
        except _ERRORS as exc:
            raise self._error("relaying the outbox", exc) from exc

    async def purge_sent(self, before: float) -> int:
        try:
            async with self._require().acquire() as conn:
                status = await conn.execute(
                    "DELETE FROM sagaway_participant_outbox WHERE sent_at < $1", before
                )
        except _ERRORS as exc:
            raise self._error("purging the outbox", exc) from exc
        return int(status.split()[-1])

    async def backlog(self) -> int:
        try:
            async with self._require().acquire() as conn:
                n = await conn.fetchval(
                    "SELECT count(*) FROM sagaway_participant_outbox WHERE sent_at IS NULL"
                )
        except _ERRORS as exc:
            raise self._error("counting the outbox", exc) from exc
        return int(n)


class _PostgresTransaction(Transaction):
    def __init__(self, db: PostgresDatabase, conn: asyncpg.Connection) -> None:
        self._db = db
        self.connection = conn
        self._tx: Any = None
        self._savepoint: Any = None
        self._sync: SyncPostgresConnection | None = None
        self.committed = False

    async def claim(self, key: str, *, fence: tuple[str, dict[str, Any]] | None = None
                    ) -> dict[str, Any] | None:
        conn = self.connection
        try:
            self._tx = conn.transaction()
            await self._tx.start()
            if not await conn.fetchval(_CLAIM_SQL, key, time.time()):
                # Committed by another transaction (we waited for it if it was running).
                text = await conn.fetchval(
                    "SELECT reply::text FROM sagaway_inbox WHERE idempotency_key = $1", key
                )
                if text is None:
                    raise StoreError(f"the inbox row of {key!r} has no reply")
                reply: dict[str, Any] = json.loads(text)
                return reply
            if fence is not None:
                # Waits for a transaction still applying the fenced key, then records the
                # fence only if that key has no row.
                await conn.execute(
                    "INSERT INTO sagaway_inbox (idempotency_key, reply, created_at)"
                    " VALUES ($1, $2::text::json, $3) ON CONFLICT (idempotency_key) DO NOTHING",
                    fence[0], json.dumps(fence[1], separators=(",", ":")), time.time(),
                )
            self._savepoint = conn.transaction()
            await self._savepoint.start()
        except _ERRORS as exc:
            raise self._db._error("claiming an idempotency key", exc) from exc
        return None

    async def call_sync(self, fn: Callable[[Any], T]) -> T:
        loop = asyncio.get_running_loop()
        self._sync = SyncPostgresConnection(self.connection, loop)
        future = loop.run_in_executor(None, fn, self._sync)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # Let the thread finish (its next call on cmd.db fails) before the connection
            # is rolled back and returned to the pool under it.
            self._sync._live = False
            await asyncio.gather(future, return_exceptions=True)
            raise

    async def commit(
        self,
        key: str,
        reply: dict[str, Any] | None,
        *,
        undo: bool,
        destination: str | None = None,
        body: str | None = None,
    ) -> None:
        conn = self.connection
        if self._sync is not None:
            self._sync._live = False
        if not conn.is_in_transaction():
            raise StoreError(_ENDED)
        text = None if reply is None else json.dumps(reply, separators=(",", ":"))
        try:
            if self._savepoint is not None:
                await (self._savepoint.rollback() if undo else self._savepoint.commit())
            if destination is not None:
                await conn.execute(_COMMIT_SQL, key, text, destination, body, time.time())
            elif text is not None:
                await conn.execute(
                    "UPDATE sagaway_inbox SET reply = $2::text::json WHERE idempotency_key = $1",
                    key, text,
                )
            await self._tx.commit()
        except _ERRORS as exc:
            raise self._db._error("committing a command", exc) from exc
        self.committed = True

    async def close(self) -> None:
        if self._sync is not None:
            self._sync._live = False
        if self._tx is not None and not self.committed and self.connection.is_in_transaction():
            # A broken connection: the pool discards it and the server rolls back.
            with contextlib.suppress(*_ERRORS):
                await self._tx.rollback()


class SyncPostgresConnection:
    """``cmd.db`` for a sync handler on PostgreSQL: the command's asyncpg connection, inside
    its transaction, called from the handler's thread (each call runs on the event loop and
    the thread waits for it). Method names and arguments are asyncpg's.

    Don't commit or roll back: sagaway commits the handler's changes with the inbox record.
    """

    def __init__(self, conn: asyncpg.Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.connection = conn
        self._loop = loop
        self._live = True

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._live:
            coro.close()
            raise StoreError("cmd.db was used after its command's transaction ended")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            coro.close()
            raise StoreError(
                "SyncPostgresConnection blocks: call it from a sync handler's "
                "thread, not from the event loop (use the asyncpg connection)"
            )
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        """Run a statement; return its status (``"UPDATE 1"``)."""
        result: str = self._wait(self.connection.execute(query, *args, timeout=timeout))
        return result

    def executemany(self, command: str, args: Iterable[Sequence[Any]]) -> None:
        self._wait(self.connection.executemany(command, list(args)))

    def fetch(self, query: str, *args: Any) -> list[Any]:
        rows: list[Any] = self._wait(self.connection.fetch(query, *args))
        return rows

    def fetchrow(self, query: str, *args: Any) -> Any:
        return self._wait(self.connection.fetchrow(query, *args))

    def fetchval(self, query: str, *args: Any, column: int = 0) -> Any:
        return self._wait(self.connection.fetchval(query, *args, column=column))
