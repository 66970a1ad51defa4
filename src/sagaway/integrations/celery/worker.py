"""The Celery worker's side of the integration: :class:`SagaTask` / :func:`saga_task` answer
saga steps (:func:`saga_context` inside a task), exactly once through a SQLite or PostgreSQL
inbox in the service's own database; :func:`close_inboxes` runs on Celery's
``worker_process_shutdown``. How outcomes map to replies: :mod:`sagaway.integrations.celery`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import celery
from celery import signals as celery_signals
from celery.exceptions import SoftTimeLimitExceeded, TaskPredicate, TimeLimitExceeded

from sagaway import NonRetryableError
from sagaway.engine.relay import REPLY_TYPE
from sagaway.errors import InvalidPayload, SagawayError, StoreError, TransportError
from sagaway.integrations.celery._wire import META_KWARG, _describe
from sagaway.messaging import Envelope
from sagaway.messaging.base import check_destination

log = logging.getLogger("sagaway.celery")

_FENCED_ACTION = {"ok": False, "retryable": False,
                  "error": "compensated before it was applied: not applied"}


class CeleryIntegrationError(SagawayError):
    """The Celery integration is misused: a task asking for its saga context outside a saga
    call, a ``db`` URL it does not support, malformed ``_sagaway`` metadata. (Bad step
    definitions raise :class:`~sagaway.DefinitionError`.)"""


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a task running as a saga step knows about itself (:func:`saga_context`)."""

    run_id: str
    step: str
    idempotency_key: str
    """``{run_id}:{step}:action`` or ``:compensation``: the same on every attempt."""
    attempt: int
    compensating: bool
    db: Any
    """With ``db=``: the connection, inside the transaction that records this call in the
    inbox (a ``sqlite3.Connection``, or for PostgreSQL a
    :class:`~sagaway.participant.postgres.SyncPostgresConnection` with asyncpg's methods).
    Write the task's changes through it and do not commit. ``None`` without ``db``."""
    action_applied: bool | None = None
    """For a compensation with ``db=``: whether the inbox recorded its action as done
    (``False``: the action never ran here, so there is nothing to undo)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Headers the orchestrator's listeners sent with the attempt (trace context)."""


_current: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "sagaway_celery_task", default=None)


def saga_context() -> TaskContext:
    """The saga call the current task is running for.

    Raises:
        CeleryIntegrationError: not inside a :class:`SagaTask` run for a saga step.
    """
    ctx = _current.get()
    if ctx is None:
        raise CeleryIntegrationError(
            "saga_context() is only available inside a task declared with @saga_task (or "
            "base=SagaTask) while it runs for a saga step"
        )
    return ctx


@dataclass(frozen=True, slots=True)
class _Call:
    run_id: str
    step: str
    key: str
    attempt: int
    compensation: bool
    reply_to: str
    correlation_id: str
    headers: Mapping[str, str]

    @classmethod
    def parse(cls, meta: Any) -> _Call:
        try:
            call = cls(str(meta["run_id"]), str(meta["step"]), str(meta["key"]),
                       int(meta["attempt"]), bool(meta["compensation"]),
                       check_destination(str(meta["reply_to"])), str(meta["correlation_id"]),
                       {str(k): str(v) for k, v in (meta.get("headers") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError, TransportError) as exc:
            raise CeleryIntegrationError(f"malformed {META_KWARG} metadata {meta!r}: {exc}"
                                         ) from None
        return call

    def reply_body(self, payload: Mapping[str, Any]) -> tuple[str, bytes]:
        envelope = Envelope(type=REPLY_TYPE, payload=dict(payload), run_id=self.run_id,
                            step=self.step, idempotency_key=self.key,
                            correlation_id=self.correlation_id)
        return envelope.id, envelope.to_bytes()


class _Replies:
    """Publishes replies from a worker process (kombu, publisher confirms). One per process:
    a forked child opens its own connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._conn: Any = None
        self._producer: Any = None
        self._checked: set[str] = set()

    def _reset(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self._conn.release()
        self._conn = self._producer = None
        self._checked = set()

    def send(self, app: Any, destination: str, message_id: str, body: bytes) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self._conn = self._producer = None  # inherited across fork: not ours
                self._checked = set()
                self._pid = os.getpid()
            try:
                if self._conn is None:
                    options = dict(app.conf.broker_transport_options or {})
                    options["confirm_publish"] = True
                    self._conn = app.connection_for_write(transport_options=options)
                    self._conn.ensure_connection(max_retries=3)
                    self._producer = self._conn.Producer()
                if destination not in self._checked:
                    # The orchestrator declares its replies' queue; publishing to a queue
                    # that does not exist would drop the reply silently.
                    self._conn.default_channel.queue_declare(queue=destination, passive=True)
                    self._checked.add(destination)
                self._producer.publish(
                    body, exchange="", routing_key=destination,
                    content_type="application/json", content_encoding="utf-8",
                    delivery_mode=2, message_id=message_id, retry=True,
                    retry_policy={"max_retries": 3, "interval_start": 0.2,
                                  "interval_step": 0.5, "interval_max": 2},
                )
            except Exception:
                self._reset()
                raise


_replies = _Replies()


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""


_open_postgres_inboxes: set[_PostgresInbox] = set()


def close_inboxes() -> None:
    """Close every PostgreSQL inbox this process opened for its tasks (their connection
    pools and loop threads). Connected to Celery's ``worker_process_shutdown``; call it
    yourself where tasks ran outside a worker (tests)."""
    for inbox in list(_open_postgres_inboxes):
        inbox.close()


celery_signals.worker_process_shutdown.connect(
    lambda **_: close_inboxes(), weak=False, dispatch_uid="sagaway.close_inboxes")


def _open_inbox(url: str) -> _Inbox | _PostgresInbox:
    scheme = _scheme(url)
    if scheme == "sqlite":
        return _Inbox(url)
    if scheme in ("postgresql", "postgres"):
        return _PostgresInbox(url)
    raise CeleryIntegrationError(
        f"saga_task db must be a sqlite:///path.db or postgresql://… URL, got "
        f"{url.split('://', 1)[0]}://…; without db, make the task idempotent by "
        f"saga_context().idempotency_key"
    )


class _Inbox:
    """The task's SQLite database: the ``sagaway_inbox`` table and the task's own tables."""

    def __init__(self, url: str, busy_timeout: float = 30.0) -> None:
        from sagaway.participant import SQLiteDatabase

        self.url = url
        self.path = SQLiteDatabase.from_url(url).path
        self.busy_timeout = busy_timeout
        self._pid: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._migrated = False

    def connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            from sagaway.participant import SQLiteDatabase
            from sagaway.store.sqlite import connect

            if not self._migrated:
                # The participant's migrations create the same inbox table (once per process).
                async def migrate() -> None:
                    db = SQLiteDatabase(self.path, busy_timeout=self.busy_timeout)
                    await db.open()
                    await db.aclose()

                # On a thread of its own: the caller may be running an event loop.
                failure: list[BaseException] = []

                def run() -> None:
                    try:
                        asyncio.run(migrate())
                    except BaseException as exc:
                        failure.append(exc)

                thread = threading.Thread(target=run, name="sagaway-celery-migrate")
                thread.start()
                thread.join()
                if failure:
                    raise failure[0]
                self._migrated = True
            self._conn = connect(self.path, synchronous="FULL", busy_timeout=self.busy_timeout)
            self._pid = os.getpid()
        return self._conn


class _PostgresInbox:
    """The task's PostgreSQL database, through :class:`sagaway.participant.PostgresDatabase`
    (its inbox, its outbox for replies, asyncpg) on an event loop of this process's own.

    The task keeps running on Celery's thread (so ``self.request``, ``self.retry`` and soft
    time limits behave as usual); its statements and the inbox's run on that loop, each
    call waiting for its result (``saga_context().db`` is a
    :class:`~sagaway.participant.postgres.SyncPostgresConnection`). Replies are recorded in
    the participant outbox in the task's transaction and published from there, so a reply
    lost to a crash is published by the next task (or the redelivered one).
    """

    def __init__(self, url: str) -> None:
        try:
            from sagaway.participant.postgres import PostgresDatabase
        except ImportError as exc:
            raise CeleryIntegrationError(
                f"a postgresql:// db needs asyncpg: pip install 'sagaway[postgres]' ({exc})"
            ) from None
        self.url = url
        self._factory = PostgresDatabase
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.db: Any = None
        self._since_purge = 0

    def run(self, coro: Any, timeout: float | None = 60.0) -> Any:
        """Run a coroutine on this process's loop and wait for it."""
        if self._pid != os.getpid() or self._loop is None:
            self._start()
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _start(self) -> None:
        # A fresh loop and pool in every process: a forked child must not share its
        # parent's connections.
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="sagaway-celery-inbox",
                                  daemon=True)
        thread.start()
        self._loop, self._pid, self._thread = loop, os.getpid(), thread
        db = self._factory(self.url, min_size=1, max_size=2)
        asyncio.run_coroutine_threadsafe(db.open(), loop).result(60)
        self.db = db
        _open_postgres_inboxes.add(self)

    def close(self, timeout: float = 10.0) -> None:
        """Close the pool and stop the loop's thread (a later task opens them again)."""
        _open_postgres_inboxes.discard(self)
        loop, db, thread = self._loop, self.db, self._thread
        self._loop, self.db, self._pid = None, None, None
        if loop is None or thread is None or not thread.is_alive():
            return
        if db is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(db.aclose(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()

    def transaction(self) -> Any:
        """The participant database's transaction scope (an async context manager)."""
        if self._pid != os.getpid() or self._loop is None:
            self._start()
        return self.db.transaction()

    def sync_connection(self, conn: Any) -> Any:
        from sagaway.participant.postgres import SyncPostgresConnection

        return SyncPostgresConnection(conn, self._loop)  # type: ignore[arg-type]

    def flush(self, app: Any) -> None:
        """Publish the replies waiting in the outbox (raise if the broker would not)."""
        loop = self._loop
        assert loop is not None

        async def send(rows: Sequence[Any]) -> list[int]:
            sent = []
            for row in rows:
                await loop.run_in_executor(None, _replies.send, app, row.destination,
                                           f"outbox-{row.id}", row.body.encode())
                sent.append(row.id)
            return sent

        async def flush() -> None:
            while await self.db.flush_outbox(send, limit=100) >= 100:
                pass
            self._since_purge += 1
            if self._since_purge >= 500:
                self._since_purge = 0
                await self.db.purge_sent(time.time() - 3600)

        self.run(flush())


def _plain(value: Any) -> Any:
    """``value`` as JSON data, or InvalidPayload."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(f"the task's result cannot be sent as JSON: {exc}") from None


class SagaTask(celery.Task):  # type: ignore[misc]  # celery ships no type information
    """A Celery task base class that answers saga steps: ``@app.task(base=SagaTask)``.

    Called with the ``_sagaway`` keyword (as :class:`CeleryTransport` sends it), it removes
    it, runs the task (inside its inbox transaction when ``saga_db`` is set) and publishes
    the outcome to the orchestrator; called any other way it is a plain task.

    Class attributes (or ``@app.task(..., saga_db=…)`` options):
        saga_db: ``sqlite:///path.db`` or ``postgresql://…`` for exactly-once effects (see
            :mod:`sagaway.integrations.celery`).
        saga_non_retryable: exception types that are a business "no" (never retried), in
            addition to :class:`~sagaway.NonRetryableError`.
        saga_reply_retries: how often the task is re-run (by ``self.retry``) when its
            reply cannot be published; with ``saga_db`` the re-run re-sends the recorded
            reply.
    """

    acks_late = True
    reject_on_worker_lost = True
    # Celery checks a call's arguments against the function when it sends one; a retry
    # re-sends the saga's ``_sagaway`` keyword, which the function does not take.
    typing = False
    saga_db: str | None = None
    saga_non_retryable: tuple[type[BaseException], ...] = ()
    saga_reply_retries = 10
    _saga_inbox: _Inbox | _PostgresInbox | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        meta = kwargs.pop(META_KWARG, None)
        if meta is None:
            return super().__call__(*args, **kwargs)
        call = _Call.parse(meta)
        redelivered = bool((getattr(self.request, "delivery_info", None) or {})
                           .get("redelivered"))
        if self.saga_db:
            if self._saga_inbox is None or self._saga_inbox.url != self.saga_db:
                self._saga_inbox = _open_inbox(self.saga_db)
            if isinstance(self._saga_inbox, _PostgresInbox):
                return self._run_with_postgres(call, self._saga_inbox, args, kwargs)
            return self._run_with_inbox(call, self._saga_inbox, args, kwargs)
        return self._run_plain(call, args, kwargs, redelivered)

    # -- outcomes -------------------------------------------------------------------------

    def _business_no(self, exc: BaseException) -> bool:
        return isinstance(exc, (NonRetryableError, *self.saga_non_retryable))

    def _send(self, call: _Call, reply: Mapping[str, Any], *, recorded: bool) -> None:
        message_id, body = call.reply_body(reply)
        try:
            _replies.send(self.app, call.reply_to, message_id, body)
        except Exception as exc:
            log.warning("saga task %s (%s): the reply to %s could not be published: %s",
                        self.name, call.correlation_id, call.reply_to, exc)
            if recorded or reply.get("ok"):
                # Run again (with the inbox: only to re-send what it recorded).
                raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                                 ) from exc
            raise
        log.debug("saga task %s (%s): replied %s", self.name, call.correlation_id,
                  "ok" if reply.get("ok") else "failed")

    def _run_plain(self, call: _Call, args: tuple[Any, ...], kwargs: dict[str, Any],
                   redelivered: bool) -> Any:
        token = _current.set(TaskContext(call.run_id, call.step, call.key, call.attempt,
                                         call.compensation, None, None, call.headers))
        try:
            result = super().__call__(*args, **kwargs)
        except TaskPredicate:  # retry, Ignore, Reject: no outcome to report yet
            raise
        except SoftTimeLimitExceeded as exc:
            self._send(call, {"ok": False, "error": _describe(exc), "retryable": True,
                              "maybe_applied": True}, recorded=False)
            raise
        except Exception as exc:
            no = self._business_no(exc)
            # Without an inbox a "no" cannot vouch for an earlier attempt that may have run.
            self._send(call, {"ok": False, "error": _describe(exc), "retryable": not no,
                              "maybe_applied": no and (call.attempt > 1 or redelivered)},
                       recorded=False)
            raise
        finally:
            _current.reset(token)
        try:
            reply = {"ok": True, "result": _plain(result)}
        except InvalidPayload as exc:
            reply = {"ok": False, "error": str(exc), "retryable": False,
                     "maybe_applied": True}
        self._send(call, reply, recorded=False)
        return result

    def _run_with_inbox(self, call: _Call, inbox: _Inbox, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> Any:
        conn = inbox.connection()
        try:
            recorded, args, applied = self._claim(conn, call, args)
        except sqlite3.Error as exc:
            _rollback(conn)
            # The inbox is unusable for now (locked past busy_timeout, disk): run again later.
            raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                             ) from exc
        if recorded is not None:  # done before: answer the same again, do not run
            self._send(call, recorded, recorded=True)
            return recorded.get("result")
        token = _current.set(TaskContext(call.run_id, call.step, call.key, call.attempt,
                                         call.compensation, conn, applied, call.headers))
        try:
            result = super().__call__(*args, **kwargs)
        except TaskPredicate:  # retry, Ignore, Reject: no outcome to report yet
            _rollback(conn)
            raise
        except SoftTimeLimitExceeded as exc:
            _rollback(conn)
            self._send(call, {"ok": False, "error": _describe(exc), "retryable": True,
                              "maybe_applied": True}, recorded=False)
            raise
        except Exception as exc:
            if self._business_no(exc):
                # A business "no": its writes undone, the answer recorded for every retry.
                failure = {"ok": False, "error": _describe(exc), "retryable": False}
                self._commit(conn, call, failure, undo=True)
                self._send(call, failure, recorded=True)
                raise
            _rollback(conn)  # not recorded: the next attempt runs the task again
            self._send(call, {"ok": False, "error": _describe(exc), "retryable": True},
                       recorded=False)
            raise
        except BaseException:
            _rollback(conn)
            raise
        finally:
            _current.reset(token)
        undo = False
        try:
            reply: dict[str, Any] = {"ok": True, "result": _plain(result)}
        except InvalidPayload as exc:
            reply, undo = {"ok": False, "error": str(exc), "retryable": False}, True
        self._commit(conn, call, reply, undo=undo)
        self._send(call, reply, recorded=True)
        return result

    @staticmethod
    def _claim(conn: sqlite3.Connection, call: _Call, args: tuple[Any, ...]
               ) -> tuple[dict[str, Any] | None, tuple[Any, ...], bool | None]:
        """Begin and lock; the recorded reply, or the arguments and ``action_applied``."""
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT reply FROM sagaway_inbox WHERE idempotency_key = ?",
                           (call.key,)).fetchone()
        if row is not None:
            conn.execute("COMMIT")
            recorded: dict[str, Any] = json.loads(row[0])
            return recorded, args, None
        applied = None
        if call.compensation:
            action_key = call.key.removesuffix(":compensation") + ":action"
            action = conn.execute("SELECT reply FROM sagaway_inbox WHERE idempotency_key = ?",
                                  (action_key,)).fetchone()
            if action is None:
                # Fence: an action delivered after its compensation is never applied.
                conn.execute("INSERT INTO sagaway_inbox VALUES (?, ?, ?)",
                             (action_key, json.dumps(_FENCED_ACTION), time.time()))
                applied = False
            else:
                done = json.loads(action[0])
                applied = bool(done.get("ok"))
                if applied and args and args[0] is None:
                    # The orchestrator never heard the action's result; the inbox did.
                    args = (done.get("result"), *args[1:])
        conn.execute("SAVEPOINT sagaway_task")
        return None, args, applied

    def _commit(self, conn: sqlite3.Connection, call: _Call, reply: Mapping[str, Any], *,
                undo: bool) -> None:
        """Record ``reply`` for the key and commit (after undoing the task's writes)."""
        if not conn.in_transaction:
            error = ("the task ended its inbox transaction (COMMIT or ROLLBACK on "
                     "saga_context().db), so its changes were not recorded with its key; "
                     "leave committing to sagaway")
            self._send(call, {"ok": False, "error": error, "retryable": False,
                              "maybe_applied": True}, recorded=False)
            raise CeleryIntegrationError(error)
        try:
            if undo:
                conn.execute("ROLLBACK TO sagaway_task")
            conn.execute("INSERT INTO sagaway_inbox VALUES (?, ?, ?)",
                         (call.key, json.dumps(reply, separators=(",", ":")), time.time()))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                             ) from exc

    def _run_with_postgres(self, call: _Call, inbox: _PostgresInbox, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> Any:
        fence = None
        if call.compensation:
            fence = (call.key.removesuffix(":compensation") + ":action", _FENCED_ACTION)
        try:
            scope = inbox.transaction()
            tx = inbox.run(scope.__aenter__())
        except (StoreError, TimeoutError) as exc:
            raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                             ) from exc
        try:
            return self._in_postgres_tx(call, inbox, tx, fence, args, kwargs)
        finally:
            with contextlib.suppress(Exception):
                inbox.run(scope.__aexit__(None, None, None), timeout=30)

    def _in_postgres_tx(self, call: _Call, inbox: _PostgresInbox, tx: Any,
                        fence: tuple[str, dict[str, Any]] | None, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> Any:
        def commit(reply: Mapping[str, Any] | None, *, undo: bool,
                   answer: Mapping[str, Any]) -> None:
            try:
                inbox.run(tx.commit(call.key, None if reply is None else dict(reply),
                                    undo=undo, messages=[
                                        (call.reply_to, call.reply_body(answer)[1].decode())]))
            except (StoreError, TimeoutError) as exc:
                raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                                 ) from exc
            try:
                inbox.flush(self.app)
            except Exception as exc:  # recorded: a re-run publishes it from the outbox
                log.warning("saga task %s (%s): publishing its reply failed: %s", self.name,
                            call.correlation_id, exc)
                raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                                 ) from exc

        try:
            recorded = inbox.run(tx.claim(call.key, fence=fence))
        except (StoreError, TimeoutError) as exc:
            raise self.retry(exc=exc, countdown=1, max_retries=self.saga_reply_retries
                             ) from exc
        if recorded is not None:  # done before: answer the same again, do not run
            commit(None, undo=False, answer=recorded)
            return recorded.get("result")
        applied = None
        if call.compensation:
            action = inbox.run(tx.connection.fetchval(
                "SELECT reply::text FROM sagaway_inbox WHERE idempotency_key = $1",
                call.key.removesuffix(":compensation") + ":action"))
            done = json.loads(action) if action else {}
            applied = bool(done.get("ok"))
            if applied and args and args[0] is None:
                args = (done.get("result"), *args[1:])
        db = inbox.sync_connection(tx.connection)
        token = _current.set(TaskContext(call.run_id, call.step, call.key, call.attempt,
                                         call.compensation, db, applied, call.headers))
        try:
            result = super().__call__(*args, **kwargs)
        except TaskPredicate:  # retry, Ignore, Reject: no outcome to report yet
            raise
        except SoftTimeLimitExceeded as exc:
            self._send(call, {"ok": False, "error": _describe(exc), "retryable": True,
                              "maybe_applied": True}, recorded=False)
            raise
        except Exception as exc:
            if self._business_no(exc):
                failure = {"ok": False, "error": _describe(exc), "retryable": False}
                commit(failure, undo=True, answer=failure)
                raise
            self._send(call, {"ok": False, "error": _describe(exc), "retryable": True},
                       recorded=False)
            raise
        finally:
            db._live = False
            _current.reset(token)
        undo = False
        try:
            reply: dict[str, Any] = {"ok": True, "result": _plain(result)}
        except InvalidPayload as exc:
            reply, undo = {"ok": False, "error": str(exc), "retryable": False}, True
        commit(reply, undo=undo, answer=reply)
        return result

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        """A hard time limit: the worker's parent process reports it (the child is gone)."""
        super().on_failure(exc, task_id, args, kwargs, einfo)
        if not isinstance(exc, TimeLimitExceeded) or not isinstance(kwargs, dict):
            return
        meta = kwargs.get(META_KWARG)
        if meta is None:
            return
        try:
            call = _Call.parse(meta)
            message_id, body = call.reply_body(
                {"ok": False, "error": _describe(exc) + " (hard time limit: the task was "
                 "killed mid-way and may have taken effect)", "retryable": True,
                 "maybe_applied": True})
            _replies.send(self.app, call.reply_to, message_id, body)
        except Exception as err:  # the step's deadline covers a lost reply
            log.warning("saga task %s (%s): could not report its hard time limit: %s",
                        self.name, task_id, err)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def saga_task(app: Any, *, db: str | None = None,
              non_retryable: Iterable[type[BaseException]] = (),
              **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """Declare a Celery task that can run as a saga step: ``@saga_task(app, name=…)``.

    ``app.task(base=SagaTask, acks_late=True, reject_on_worker_lost=True, **options)`` with
    ``db`` (``sqlite:///path.db`` or ``postgresql://…``: effects written through
    ``saga_context().db`` are applied exactly once) and ``non_retryable`` (exception types
    that are a business "no"). Any Celery task option works (``name``, ``bind``,
    ``autoretry_for``, ``time_limit``, …).

    Raises:
        CeleryIntegrationError: ``db`` is neither a ``sqlite:///`` nor a ``postgresql://``
            URL (or asyncpg is missing for the latter).
    """
    if db is not None:
        _open_inbox(db)  # validate the URL now, not at the first task (connects lazily)
    options.setdefault("acks_late", True)
    options.setdefault("reject_on_worker_lost", True)
    base = options.pop("base", SagaTask)
    if not (isinstance(base, type) and issubclass(base, SagaTask)):
        raise CeleryIntegrationError(f"saga_task's base must subclass SagaTask, got {base!r}")

    def register(fn: Callable[..., Any]) -> Any:
        return app.task(base=base, saga_db=db, saga_non_retryable=tuple(non_retryable),
                        **options)(fn)

    return register
