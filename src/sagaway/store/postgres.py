"""PostgresStore: the production saga log, shared by many workers on many machines.

Driver: asyncpg (the ``[postgres]`` extra). A group-committed batch is one transaction of at
most four statements whatever its size: creations and history rows go in through
``unnest`` arrays, and every fenced update of the batch is a single ``UPDATE … FROM unnest``.

Leases are stamped with the database clock (``clock_timestamp()``), never a worker's, and
claims use ``FOR UPDATE SKIP LOCKED`` so workers polling at once never wait on each other.
Every update is conditional on the row version and on the lease owner (fencing): a worker
paused past its lease cannot record anything for a run another worker took.

Connection loss (a database restart) surfaces as StoreError; the pool opens new
connections on the next call, so workers reconnect by themselves.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sagaway.errors import StoreError
from sagaway.run import ACTIVE_STATUSES, HistoryEntry, SagaStatus
from sagaway.store.base import (
    RUN_COLUMNS,
    BatchResult,
    CreateResult,
    NewRun,
    RunRecord,
    RunUpdate,
    Store,
    created_record,
    history_from_row,
    record_from_row,
)
from sagaway.store.migrations import migration_files

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "PostgreSQL support needs the asyncpg driver: pip install 'sagaway[postgres]'"
    ) from exc

__all__ = ["PostgresStore"]

_ACTIVE = [s.value for s in ACTIVE_STATUSES]
_COLUMNS = ", ".join(
    f"{c}::text" if c in ("input", "state") else c for c in RUN_COLUMNS
)
_RCOLUMNS = ", ".join(
    f"r.{c.strip()}" for c in _COLUMNS.split(",")
)
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_DB_NOW = "extract(epoch from clock_timestamp())::double precision"


def _now(param: int) -> str:
    """The lease clock: the database's, unless a test clock passed its time as ``$param``."""
    return f"COALESCE(${param}::float8, {_DB_NOW})"
# Any stable 64-bit number: the advisory lock that serialises migrations across processes.
_MIGRATION_LOCK = 0x5A6A_7761_7900_0001
_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class PostgresStore(Store):
    """The saga log in PostgreSQL.

    Args:
        dsn: ``postgresql://user:password@host:5432/dbname``.
        min_size / max_size: connection pool bounds.
        migrate: apply the schema migrations on ``open()`` (under an advisory lock).
        command_timeout: seconds before a statement is abandoned.
        schema: a PostgreSQL schema to keep sagaway's tables in (created if missing);
            also ``?schema=name`` in the URL. Default: the connection's search_path.
            ``?migrate=false`` in the URL is ``migrate=False``.
        clock: stamp leases with this clock instead of the database's (for tests with
            virtual time only: several workers must share one clock).
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        migrate: bool = True,
        command_timeout: float = 30.0,
        schema: str | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        parts = urlsplit(dsn)
        query = parse_qsl(parts.query, keep_blank_values=True)
        for key, value in query:
            if key == "schema":
                schema = value
            elif key == "migrate":
                migrate = value.lower() not in ("false", "0", "no")
        if schema is not None and not _IDENT.match(schema):
            raise StoreError(f"schema {schema!r} is not a plain identifier ([a-z_][a-z0-9_]*)")
        self.url = dsn
        self.dsn = urlunsplit(
            parts._replace(query=urlencode(
                [(k, v) for k, v in query if k not in ("schema", "migrate")]))
        )
        self.schema = schema
        self._clock = clock
        self.min_size = min_size
        self.max_size = max_size
        self.migrate_on_open = migrate
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise StoreError("the PostgreSQL store is not open; call open() first")
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except _ERRORS as exc:
            raise StoreError(f"PostgreSQL error: {type(exc).__name__}: {exc}") from exc

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            if self.schema is not None:
                conn = await asyncpg.connect(self.dsn)
                try:
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
                finally:
                    await conn.close()
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                command_timeout=self.command_timeout,
                server_settings={"search_path": self.schema} if self.schema else None,
            )
        except _ERRORS as exc:
            raise StoreError(f"cannot connect to PostgreSQL at {self._safe_dsn()}: {exc}") from exc
        if self.migrate_on_open:
            try:
                await self.migrate()
            except BaseException:
                await self.aclose()
                raise

    def _safe_dsn(self) -> str:
        # Never echo a password into logs or errors.
        if "@" in self.dsn and "://" in self.dsn:
            scheme, rest = self.dsn.split("://", 1)
            creds, host = rest.rsplit("@", 1)
            return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
        return self.dsn

    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the names applied. Safe from many processes."""
        applied: list[str] = []
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS sagaway_migrations (version INTEGER PRIMARY KEY, "
                "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in await conn.fetch("SELECT version FROM sagaway_migrations")}
            for version, name, sql in migration_files("postgres"):
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO sagaway_migrations (version, name) VALUES ($1, $2)",
                    version, name,
                )
                applied.append(name)
        return applied

    def _test_now(self) -> float | None:
        return None if self._clock is None else self._clock()

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await pool.close()
            except _ERRORS:
                pool.terminate()

    async def now(self) -> float:
        async with self._conn() as conn:
            value = await conn.fetchval(f"SELECT {_now(1)}", self._test_now())
            return float(value)

    # -- primitives -------------------------------------------------------------------------

    async def commit(
        self,
        creates: Sequence[NewRun],
        updates: Sequence[RunUpdate],
        *,
        owner: str,
        lease_seconds: float,
    ) -> BatchResult:
        result = BatchResult()
        history: list[tuple[str, HistoryEntry]] = []
        async with self._conn() as conn, conn.transaction():
            if creates:
                inserted = {
                    r[0]: (r[1], r[2])
                    for r in await conn.fetch(
                        f"INSERT INTO sagaway_runs (id, saga, version, status, input, input_hash,"
                        f" state, idempotency_key, owner, lease_expires, wake_at, row_version,"
                        f" created_at, updated_at)"
                        f" SELECT u.id, u.saga, u.version, u.status, u.input::json, u.input_hash,"
                        f" u.state::json, u.key, CASE WHEN u.leased THEN $9 END,"
                        f" CASE WHEN u.leased THEN {_now(14)} + $10 END, u.wake_at, 1, u.now, u.now"
                        f" FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[],"
                        f" $6::text[], $7::text[], $8::text[], $11::float8[], $12::float8[],"
                        f" $13::bool[])"
                        f" AS u(id, saga, version, status, input, input_hash, state, key,"
                        f" wake_at, now, leased)"
                        f" ON CONFLICT DO NOTHING RETURNING id, owner, lease_expires",
                        [n.id for n in creates],
                        [n.saga for n in creates],
                        [n.version for n in creates],
                        [n.status.value for n in creates],
                        [n.input_json for n in creates],
                        [n.input_hash for n in creates],
                        [_dump(n.state) for n in creates],
                        [n.idempotency_key for n in creates],
                        owner,
                        lease_seconds,
                        [n.wake_at for n in creates],
                        [n.now for n in creates],
                        [n.leased for n in creates],
                        self._test_now(),
                    )
                }
                for new in creates:
                    if new.id in inserted:
                        history.extend((new.id, h) for h in new.history)
                        owner_, lease = inserted[new.id]
                        result.created.append(CreateResult(created_record(new, owner_, lease),
                                                           True))
                        continue
                    row = await conn.fetchrow(
                        f"SELECT {_COLUMNS} FROM sagaway_runs "
                        f"WHERE saga = $1 AND idempotency_key = $2",
                        new.saga, new.idempotency_key,
                    )
                    if row is None:
                        raise StoreError(f"run id {new.id} already exists")
                    result.created.append(CreateResult(record_from_row(row), False))
            if updates:
                applied = {
                    r[0]
                    for r in await conn.fetch(
                        "UPDATE sagaway_runs AS r SET status = u.status, state = u.state::json,"
                        " error = u.error, wake_at = u.wake_at, row_version = r.row_version + 1,"
                        " updated_at = u.now,"
                        " owner = CASE WHEN u.release THEN NULL ELSE r.owner END,"
                        " lease_expires = CASE WHEN u.release THEN NULL ELSE r.lease_expires END"
                        " FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[],"
                        " $5::text[], $6::float8[], $7::float8[], $8::bool[])"
                        " AS u(id, expected, status, state, error, wake_at, now, release)"
                        " WHERE r.id = u.id AND r.row_version = u.expected AND r.owner = $9"
                        " RETURNING r.id",
                        [u.run_id for u in updates],
                        [u.expected_version for u in updates],
                        [u.status.value for u in updates],
                        [_dump(u.state) for u in updates],
                        [u.error for u in updates],
                        [u.wake_at for u in updates],
                        [u.now for u in updates],
                        [u.release for u in updates],
                        owner,
                    )
                }
                for upd in updates:
                    ok = upd.run_id in applied
                    result.updated.append(ok)
                    if ok:
                        history.extend((upd.run_id, h) for h in upd.history)
            if history:
                await conn.execute(
                    "INSERT INTO sagaway_history (run_id, at, kind, step, attempt, data)"
                    " SELECT * FROM unnest($1::text[], $2::float8[], $3::text[], $4::text[],"
                    " $5::int[], $6::json[])",
                    [rid for rid, _ in history],
                    [h.at for _, h in history],
                    [h.kind for _, h in history],
                    [h.step for _, h in history],
                    [h.attempt for _, h in history],
                    [_dump(h.data) if h.data else None for _, h in history],
                )
        return result

    async def claim_due(
        self,
        *,
        owner: str,
        lease_seconds: float,
        limit: int,
        definitions: Collection[tuple[str, int]],
    ) -> list[RunRecord]:
        defs = list(definitions)
        if not defs:
            return []
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"WITH due AS ("
                f" SELECT id FROM sagaway_runs"
                f" WHERE status = ANY($1::text[])"
                f" AND (owner IS NULL OR lease_expires IS NULL OR lease_expires <= {_now(7)})"
                f" AND (saga, version) IN (SELECT * FROM unnest($2::text[], $3::int[]))"
                f" ORDER BY wake_at NULLS FIRST LIMIT $4 FOR UPDATE SKIP LOCKED)"
                f" UPDATE sagaway_runs AS r SET owner = $5, lease_expires = {_now(7)} + $6,"
                f" row_version = r.row_version + 1 FROM due WHERE r.id = due.id"
                f" RETURNING {_RCOLUMNS}",
                _ACTIVE,
                [s for s, _ in defs],
                [v for _, v in defs],
                limit,
                owner,
                lease_seconds,
                self._test_now(),
            )
        return [record_from_row(r) for r in rows]

    async def renew_leases(self, *, owner: str, lease_seconds: float) -> set[str]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"UPDATE sagaway_runs SET lease_expires = {_now(4)} + $1"
                f" WHERE owner = $2 AND status = ANY($3::text[]) RETURNING id",
                lease_seconds, owner, _ACTIVE, self._test_now(),
            )
        return {r[0] for r in rows}

    async def release_leases(self, *, owner: str, run_ids: Collection[str] | None = None) -> None:
        async with self._conn() as conn:
            if run_ids is None:
                await conn.execute(
                    "UPDATE sagaway_runs SET owner = NULL, lease_expires = NULL WHERE owner = $1",
                    owner,
                )
            else:
                await conn.execute(
                    "UPDATE sagaway_runs SET owner = NULL, lease_expires = NULL"
                    " WHERE owner = $1 AND id = ANY($2::text[])",
                    owner, list(run_ids),
                )

    async def get_run(self, run_id: str, *, history: bool = True) -> RunRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM sagaway_runs WHERE id = $1",
                                      run_id)
            if row is None:
                return None
            entries = None
            if history:
                entries = [
                    history_from_row(h)
                    for h in await conn.fetch(
                        "SELECT at, kind, step, attempt, data::text FROM sagaway_history"
                        " WHERE run_id = $1 ORDER BY id",
                        run_id,
                    )
                ]
        return record_from_row(row, entries)

    async def list_runs(
        self,
        *,
        status: Collection[SagaStatus] | None = None,
        saga: str | None = None,
        limit: int = 100,
        before: tuple[float, str] | None = None,
    ) -> list[RunRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        if status is not None:
            values = [SagaStatus(s).value for s in status]
            if not values:
                return []
            params.append(values)
            clauses.append(f"status = ANY(${len(params)}::text[])")
        if saga is not None:
            params.append(saga)
            clauses.append(f"saga = ${len(params)}")
        if before is not None:
            params.extend(before)
            clauses.append(f"(created_at, id) < (${len(params) - 1}, ${len(params)})")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(int(limit))
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM sagaway_runs {where}"
                f" ORDER BY created_at DESC, id DESC LIMIT ${len(params)}",
                *params,
            )
        return [record_from_row(r) for r in rows]
