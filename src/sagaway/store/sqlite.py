"""SQLiteStore: the embedded default saga log: one file, WAL, ``synchronous=FULL``.

Every operation runs on one dedicated thread that owns the connection, and each primitive is
one function call there (a whole group-committed batch is one hop and one transaction), so
the event loop never blocks on the disk and no statement costs a thread round-trip of its own.

Durability: ``synchronous=FULL`` (the default) fsyncs the WAL at every commit, so a committed
transition survives a power cut, not only a process crash. ``?synchronous=NORMAL`` in the
URL trades the last commits on power loss (never on a process crash) for speed.
Several processes may share one file (SQLite's locks serialise writers; ``busy_timeout``
waits for them).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from sagaway.errors import StoreError
from sagaway.run import ACTIVE_STATUSES, HistoryEntry, SagaStatus
from sagaway.store.base import (
    ERASABLE_STATUSES,
    RUN_COLUMNS,
    BatchResult,
    CreateResult,
    NewRun,
    OutboxMessage,
    OutboxRecord,
    PayloadRewrite,
    RunRecord,
    RunUpdate,
    Store,
    StoredPayloads,
    created_record,
    history_from_rows,
    history_json,
    list_filters,
    record_from_row,
)
from sagaway.store.migrations import migration_files

__all__ = ["SQLiteStore", "connect"]

T = TypeVar("T")

_ACTIVE = tuple(s.value for s in ACTIVE_STATUSES)
_ACTIVE_SQL = ", ".join(f"'{s}'" for s in _ACTIVE)
_COLUMNS = ", ".join(RUN_COLUMNS)
_ERASABLE_SQL = ", ".join(f"'{s.value}'" for s in ERASABLE_STATUSES)
_SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit our transaction)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending)
            pending = ""
    if pending.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in pending.splitlines()
    ):
        raise sqlite3.OperationalError(f"incomplete statement in migration: {pending[:80]!r}")
    return out


def connect(path: str, *, synchronous: str, busy_timeout: float) -> sqlite3.Connection:
    """A connection in autocommit mode, WAL, with the durability and lock wait asked for.

    Shared by the saga log and the participant's database (``sagaway.participant``).
    """
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                           check_same_thread=False)
    try:
        # Switching a new file to WAL needs an exclusive lock, and SQLite does not call the
        # busy handler for it: when two processes open a new file at once, retry here.
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    except BaseException:
        conn.close()
        raise
    return conn


class SQLiteStore(Store):
    """The embedded saga log in one SQLite file.

    Args:
        path: the database file (created if missing), or ``":memory:"``.
        synchronous: SQLite's ``synchronous`` pragma; FULL (default) survives power loss.
        busy_timeout: seconds to wait for another process's write lock.
        clock: the clock leases are stamped with (the local clock: the file is local).
        migrate: apply pending schema migrations on ``open()``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        migrate: bool = True,
    ) -> None:
        mode = synchronous.upper()
        if mode not in _SYNC_MODES:
            raise StoreError(f"synchronous must be one of {_SYNC_MODES}, got {synchronous!r}")
        self.path = str(path)
        self.url = f"sqlite:///{self.path}"
        self.synchronous = mode
        self.busy_timeout = busy_timeout
        self._clock = clock
        self.migrate_on_open = migrate
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._opening = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        """``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``?synchronous=NORMAL``."""
        parts = urlsplit(url)
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise StoreError(f"no database file in {url!r}; use sqlite:///path/to/sagas.db")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"synchronous", "busy_timeout", "migrate"}
        if unknown:
            raise StoreError(f"unknown SQLite URL option(s) {sorted(unknown)} in {url!r}")
        try:
            busy_timeout = float(query.get("busy_timeout", 10.0))
        except ValueError:
            raise StoreError(
                f"busy_timeout must be a number of seconds, got {query['busy_timeout']!r} "
                f"in {url!r}"
            ) from None
        return cls(path, synchronous=query.get("synchronous", "FULL"), busy_timeout=busy_timeout,
                   migrate=query.get("migrate", "true").lower() not in ("false", "0", "no"))

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None or self._conn is None:
            raise StoreError("the SQLite store is not open; call open() or use the orchestrator")
        conn = self._conn

        def call() -> T:
            try:
                return fn(conn)
            except BaseException as exc:
                # Whatever interrupted it, never leave a transaction open on the shared
                # connection: later statements would join it and later reads see its writes.
                if conn.in_transaction:
                    conn.rollback()
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"SQLite error on {self.path}: {exc}") from exc
                raise

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _connect(self) -> sqlite3.Connection:
        conn = connect(self.path, synchronous=self.synchronous, busy_timeout=self.busy_timeout)
        if self.migrate_on_open:
            try:
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
        return conn

    async def migrate(self) -> list[str]:
        return await self._run(self._migrate)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> list[str]:
        # BEGIN IMMEDIATE takes the write lock first, so two processes opening the same new
        # file cannot both apply a migration.
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS sagaway_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM sagaway_migrations")}
            applied: list[str] = []
            for version, name, sql in migration_files("sqlite"):
                if version in done:
                    continue
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO sagaway_migrations VALUES (?, ?, ?)", (version, name, time.time())
                )
                applied.append(name)
            conn.execute("COMMIT")
            return applied
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def open(self) -> None:
        # Held until the connection exists, so a concurrent open() returns an open store.
        async with self._opening:
            with self._lock:
                if self._executor is not None:
                    return
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="sagaway-sqlite"
                )
            try:
                self._conn = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._connect
                )
            except (sqlite3.Error, OSError) as exc:
                self._executor.shutdown(wait=False)
                self._executor = None
                raise StoreError(f"cannot open SQLite saga log {self.path!r}: {exc}") from exc

    async def aclose(self) -> None:
        with self._lock:
            executor, conn = self._executor, self._conn
            self._executor = self._conn = None
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)

    async def now(self) -> float:
        return self._clock()

    # -- primitives -------------------------------------------------------------------------

    async def commit(
        self,
        creates: Sequence[NewRun],
        updates: Sequence[RunUpdate],
        *,
        owner: str,
        lease_seconds: float,
    ) -> BatchResult:
        clock = self._clock

        def tx(conn: sqlite3.Connection) -> BatchResult:
            result = BatchResult()
            history: list[tuple[Any, ...]] = []
            outbox: list[tuple[Any, ...]] = []
            now = clock()

            def emit(run_id: str, messages: Sequence[OutboxMessage]) -> None:
                outbox.extend((m.id, m.destination, m.body, run_id, now) for m in messages)

            conn.execute("BEGIN IMMEDIATE")
            lease = clock() + lease_seconds
            for new in creates:
                cur = conn.execute(
                    f"INSERT OR IGNORE INTO sagaway_runs ({_COLUMNS}) "
                    f"VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, 1, ?, ?, NULL)",
                    (new.id, new.saga, new.version, new.status.value, new.input_json,
                     new.input_hash, json.dumps(new.state, separators=(",", ":")),
                     new.idempotency_key, owner if new.leased else None,
                     lease if new.leased else None, new.wake_at, new.now, new.now),
                )
                if cur.rowcount == 1:
                    emit(new.id, new.outbox)
                    if new.history:
                        history.append((new.id, 1, history_json(new.history)))
                    result.created.append(CreateResult(
                        created_record(new, owner if new.leased else None,
                                       lease if new.leased else None), True))
                else:
                    row = conn.execute(
                        f"SELECT {_COLUMNS} FROM sagaway_runs "
                        f"WHERE saga = ? AND idempotency_key = ?",
                        (new.saga, new.idempotency_key),
                    ).fetchone()
                    if row is None:  # an id collision, not a key: cannot happen with uuid7
                        raise sqlite3.IntegrityError(f"run id {new.id} already exists")
                    result.created.append(CreateResult(record_from_row(row), False))
            for upd in updates:
                cur = conn.execute(
                    "UPDATE sagaway_runs SET status = ?, state = ?, error = ?, wake_at = ?, "
                    "row_version = row_version + 1, updated_at = ?, "
                    "owner = CASE WHEN ? THEN NULL ELSE owner END, "
                    "lease_expires = CASE WHEN ? THEN NULL ELSE lease_expires END, "
                    "request = CASE WHEN ? THEN NULL ELSE request END "
                    "WHERE id = ? AND row_version = ? AND owner = ?",
                    (upd.status.value, json.dumps(upd.state, separators=(",", ":")), upd.error,
                     upd.wake_at, upd.now, upd.release, upd.release, upd.clear_request,
                     upd.run_id, upd.expected_version, owner),
                )
                ok = cur.rowcount == 1
                result.updated.append(ok)
                if ok:
                    emit(upd.run_id, upd.outbox)
                if ok and upd.history:
                    history.append((upd.run_id, upd.expected_version + 1,
                                    history_json(upd.history)))
            if outbox:
                conn.executemany(
                    "INSERT INTO sagaway_outbox (id, destination, body, run_id, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    outbox,
                )
            if history:
                conn.executemany(
                    "INSERT INTO sagaway_history (run_id, seq, entries) VALUES (?, ?, ?)",
                    history,
                )
            conn.execute("COMMIT")
            return result

        return await self._run(tx)

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
        clock = self._clock

        def tx(conn: sqlite3.Connection) -> list[RunRecord]:
            now = clock()
            pairs = ", ".join("(?, ?)" for _ in defs)
            params: list[Any] = [owner, now + lease_seconds, now, now]
            for saga, version in defs:
                params.extend((saga, version))
            params.append(limit)
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(
                f"UPDATE sagaway_runs SET owner = ?, lease_expires = ?, "
                f"row_version = row_version + 1 WHERE id IN ("
                f" SELECT id FROM sagaway_runs"
                f" WHERE (status IN ({_ACTIVE_SQL}) OR request IS NOT NULL)"
                f" AND (owner IS NULL OR lease_expires IS NULL OR lease_expires <= ?)"
                f" AND (request IS NOT NULL OR wake_at IS NULL OR wake_at <= ?)"
                f" AND (saga, version) IN (VALUES {pairs})"
                f" ORDER BY wake_at LIMIT ?) RETURNING {_COLUMNS}",
                params,
            ).fetchall()
            conn.execute("COMMIT")
            return [record_from_row(r) for r in rows]

        return await self._run(tx)

    async def claim_run(self, run_id: str, *, owner: str, lease_seconds: float
                        ) -> RunRecord | None:
        clock = self._clock

        def tx(conn: sqlite3.Connection) -> RunRecord | None:
            now = clock()
            row = conn.execute(
                f"UPDATE sagaway_runs SET owner = ?, lease_expires = ?, "
                f"row_version = row_version + 1 WHERE id = ? AND status IN ({_ACTIVE_SQL}) "
                f"AND (owner IS NULL OR lease_expires IS NULL OR lease_expires <= ?) "
                f"RETURNING {_COLUMNS}",
                (owner, now + lease_seconds, run_id, now),
            ).fetchone()
            return None if row is None else record_from_row(row)

        return await self._run(tx)

    async def request_operation(
        self,
        run_id: str,
        *,
        allowed: Collection[SagaStatus],
        request: dict[str, Any] | None,
        new_status: SagaStatus | None,
        history: Sequence[HistoryEntry],
        now: float,
    ) -> RunRecord | None:
        statuses = [SagaStatus(s).value for s in allowed]
        if not statuses:
            return None
        marks = ", ".join("?" for _ in statuses)
        request_json = None if request is None else json.dumps(request, separators=(",", ":"))

        def tx(conn: sqlite3.Connection) -> RunRecord | None:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                f"UPDATE sagaway_runs SET status = COALESCE(?, status), request = ?, "
                f"owner = NULL, lease_expires = NULL, row_version = row_version + 1, "
                f"updated_at = ? WHERE id = ? AND status IN ({marks}) AND request IS NULL "
                f"RETURNING {_COLUMNS}",
                (new_status.value if new_status else None, request_json, now, run_id,
                 *statuses),
            ).fetchone()
            if row is not None and history:
                conn.execute(
                    "INSERT INTO sagaway_history (run_id, seq, entries) VALUES (?, ?, ?)",
                    (run_id, row[12], history_json(history)),
                )
            conn.execute("COMMIT")
            return None if row is None else record_from_row(row)

        return await self._run(tx)

    async def claim_outbox(self, *, owner: str, lease_seconds: float, limit: int
                           ) -> list[OutboxRecord]:
        clock = self._clock

        def tx(conn: sqlite3.Connection) -> list[OutboxRecord]:
            now = clock()
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(
                "UPDATE sagaway_outbox SET owner = ?, lease_expires = ?, attempts = attempts + 1"
                " WHERE id IN (SELECT id FROM sagaway_outbox WHERE sent_at IS NULL"
                " AND (lease_expires IS NULL OR lease_expires <= ?)"
                " ORDER BY created_at, id LIMIT ?)"
                " RETURNING id, destination, body, run_id, created_at, attempts - 1",
                (owner, now + lease_seconds, now, limit),
            ).fetchall()
            conn.execute("COMMIT")
            return sorted((OutboxRecord(*r) for r in rows), key=lambda r: (r.created_at, r.id))

        return await self._run(tx)

    async def mark_sent(self, ids: Collection[str], *, now: float) -> None:
        pending = [(now, i) for i in ids]
        if not pending:
            return

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "UPDATE sagaway_outbox SET sent_at = ? WHERE id = ? AND sent_at IS NULL", pending
            )
            conn.execute("COMMIT")

        await self._run(tx)

    async def open_counts(self, *, updated_before: float
                          ) -> dict[tuple[str, SagaStatus], tuple[int, int]]:
        def read(conn: sqlite3.Connection) -> dict[tuple[str, SagaStatus], tuple[int, int]]:
            rows = conn.execute(
                f"SELECT saga, status, count(*), sum(updated_at < ?) FROM sagaway_runs"
                f" WHERE status IN ({_ACTIVE_SQL}, '{SagaStatus.FAILED.value}')"
                f" GROUP BY saga, status",
                (updated_before,),
            )
            return {(saga, SagaStatus(status)): (int(n), int(old or 0))
                    for saga, status, n, old in rows}

        return await self._run(read)

    async def outbox_backlog(self) -> tuple[int, float | None]:
        def read(conn: sqlite3.Connection) -> tuple[int, float | None]:
            n, oldest = conn.execute(
                "SELECT count(*), min(created_at) FROM sagaway_outbox WHERE sent_at IS NULL"
            ).fetchone()
            return int(n), oldest

        return await self._run(read)

    async def renew_leases(self, *, owner: str, lease_seconds: float) -> set[str]:
        clock = self._clock

        def tx(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute(
                f"UPDATE sagaway_runs SET lease_expires = ? "
                f"WHERE owner = ? AND status IN ({_ACTIVE_SQL}) RETURNING id",
                (clock() + lease_seconds, owner),
            ).fetchall()
            return {r[0] for r in rows}

        return await self._run(tx)

    async def release_leases(self, *, owner: str, run_ids: Collection[str] | None = None) -> None:
        ids = list(run_ids) if run_ids is not None else None

        def tx(conn: sqlite3.Connection) -> None:
            if ids is None:
                conn.execute(
                    "UPDATE sagaway_runs SET owner = NULL, lease_expires = NULL WHERE owner = ?",
                    (owner,),
                )
                return
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "UPDATE sagaway_runs SET owner = NULL, lease_expires = NULL "
                "WHERE owner = ? AND id = ?",
                [(owner, i) for i in ids],
            )
            conn.execute("COMMIT")

        await self._run(tx)

    async def find_run(self, saga: str, idempotency_key: str) -> RunRecord | None:
        def read(conn: sqlite3.Connection) -> RunRecord | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM sagaway_runs WHERE saga = ? AND idempotency_key = ?",
                (saga, idempotency_key),
            ).fetchone()
            return None if row is None else record_from_row(row, None)

        return await self._run(read)

    async def get_run(self, run_id: str, *, history: bool = True) -> RunRecord | None:
        def read(conn: sqlite3.Connection) -> RunRecord | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM sagaway_runs WHERE id = ?", (run_id,)
            ).fetchone()
            if row is None:
                return None
            entries = None
            if history:
                entries = history_from_rows([
                    h[0] for h in conn.execute(
                        "SELECT entries FROM sagaway_history WHERE run_id = ? ORDER BY seq",
                        (run_id,),
                    )
                ])
            return record_from_row(row, entries)

        return await self._run(read)

    async def list_runs(
        self,
        *,
        status: Collection[SagaStatus] | None = None,
        saga: str | None = None,
        limit: int = 100,
        before: tuple[float, str] | None = None,
        created_from: float | None = None,
        created_to: float | None = None,
        updated_before: float | None = None,
    ) -> list[RunRecord]:
        filters = list_filters(
            lambda n: "?", status=status, saga=saga, before=before,
            created_from=created_from, created_to=created_to, updated_before=updated_before,
        )
        if filters is None:
            return []
        where, params = filters
        params.append(int(limit))

        def read(conn: sqlite3.Connection) -> list[RunRecord]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM sagaway_runs {where} "
                f"ORDER BY created_at DESC, id DESC LIMIT ?",
                params,
            ).fetchall()
            return [record_from_row(r) for r in rows]

        return await self._run(read)

    async def count_runs(self, *, saga: str | None = None) -> dict[SagaStatus, int]:
        def read(conn: sqlite3.Connection) -> dict[SagaStatus, int]:
            if saga is None:
                rows = conn.execute("SELECT status, count(*) FROM sagaway_runs GROUP BY status")
            else:
                rows = conn.execute(
                    "SELECT status, count(*) FROM sagaway_runs WHERE saga = ? GROUP BY status",
                    (saga,),
                )
            return {SagaStatus(status): n for status, n in rows}

        return await self._run(read)

    # -- erasure, retention and key rotation -------------------------------------------------

    async def load_payloads(self, run_id: str) -> StoredPayloads | None:
        def read(conn: sqlite3.Connection) -> StoredPayloads | None:
            # One read transaction: the run row, its history and outbox from one snapshot.
            conn.execute("BEGIN")
            try:
                row = conn.execute(
                    "SELECT status, row_version, updated_at, erased_at, request IS NOT NULL, "
                    "input, input_hash, state, error FROM sagaway_runs WHERE id = ?",
                    (run_id,),
                ).fetchone()
                if row is None:
                    return None
                history = dict(conn.execute(
                    "SELECT seq, entries FROM sagaway_history WHERE run_id = ?", (run_id,)))
                outbox = dict(conn.execute(
                    "SELECT id, body FROM sagaway_outbox WHERE run_id = ?", (run_id,)))
            finally:
                conn.execute("COMMIT")
            return StoredPayloads(run_id, SagaStatus(row[0]), row[1], row[2], row[3],
                                  bool(row[4]), row[5], row[6], row[7], row[8], history,
                                  outbox)

        return await self._run(read)

    async def rewrite_payloads(self, rewrite: PayloadRewrite) -> bool:
        rw = rewrite

        def tx(conn: sqlite3.Connection) -> bool:
            # secure_delete zeroes the old cells instead of leaving them in free space, and
            # the checkpoint afterwards drops the WAL's older copies of the pages: erased
            # data is then gone from the file, not only from the rows.
            conn.execute("PRAGMA secure_delete=ON")
            try:
                done = write(conn)
            finally:
                conn.execute("PRAGMA secure_delete=OFF")
            if done and rw.erased:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return done

        def write(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            bump = 1 if rw.append else 0
            cur = conn.execute(
                "UPDATE sagaway_runs SET input = ?, input_hash = ?, state = ?, error = ?, "
                "row_version = row_version + ?, "
                "updated_at = CASE WHEN ? THEN ? ELSE updated_at END, "
                "erased_at = CASE WHEN ? THEN ? ELSE erased_at END "
                "WHERE id = ? AND row_version = ?",
                (rw.input_json, rw.input_hash, rw.state_json, rw.error, bump, bool(bump),
                 rw.now, rw.erased, rw.now, rw.run_id, rw.expected_version),
            )
            if cur.rowcount != 1:
                conn.execute("ROLLBACK")
                return False
            conn.executemany(
                "UPDATE sagaway_history SET entries = ? WHERE run_id = ? AND seq = ?",
                [(text, rw.run_id, seq) for seq, text in rw.history.items()],
            )
            conn.executemany(
                "UPDATE sagaway_outbox SET body = ? WHERE id = ? AND run_id = ?",
                [(body, mid, rw.run_id) for mid, body in rw.outbox.items()],
            )
            if rw.append:
                conn.execute(
                    "INSERT INTO sagaway_history (run_id, seq, entries) VALUES (?, ?, ?)",
                    (rw.run_id, rw.expected_version + 1, history_json(rw.append)),
                )
            conn.execute("COMMIT")
            return True

        return await self._run(tx)

    async def payload_run_ids(self, *, after: str | None, limit: int,
                              finished_before: float | None = None) -> list[str]:
        def read(conn: sqlite3.Connection) -> list[str]:
            if finished_before is None:
                rows = conn.execute(
                    "SELECT id FROM sagaway_runs WHERE id > ? ORDER BY id LIMIT ?",
                    (after or "", int(limit)))
            else:
                rows = conn.execute(
                    f"SELECT id FROM sagaway_runs WHERE id > ? AND status IN ({_ERASABLE_SQL}) "
                    f"AND updated_at < ? AND erased_at IS NULL AND request IS NULL "
                    f"ORDER BY id LIMIT ?",
                    (after or "", float(finished_before), int(limit)))
            return [r[0] for r in rows]

        return await self._run(read)
