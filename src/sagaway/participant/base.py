"""The participant's database port: one transaction per command, an inbox and an outbox.

A participant owns its database; its business tables and sagaway's two tables live there::

    sagaway_inbox(idempotency_key PRIMARY KEY, reply JSON, created_at)
    sagaway_participant_outbox(id, destination, body, created_at, sent_at)

A backend implements a handful of primitives; the policy (what to run, what to reply) lives
above them in :mod:`sagaway.participant.core`:

* :meth:`Database.transaction` yields a :class:`Transaction`;
  :meth:`Transaction.claim` begins it and locks the idempotency key: it returns the reply
  recorded for the key, or ``None`` when this transaction is the one to run the handler
  (a savepoint is then set, so a business "no" undoes the handler's writes alone);
  :meth:`Transaction.commit` records the reply in the inbox, enqueues the reply envelope
  in the outbox and commits — the business change, the dedup record and the message to
  send become durable together, or not at all.
* :meth:`Database.flush_outbox` hands unsent rows to the relay and marks the ones it
  published as sent.

Every backend, SQLite and PostgreSQL, passes the same tests (tests/participant).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from sagaway.errors import StoreError

__all__ = ["Database", "OutboxRow", "Send", "Transaction", "open_database"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An unsent reply, as :meth:`Database.flush_outbox` hands it to the relay."""

    id: int
    destination: str
    body: str
    """The encoded reply envelope (UTF-8 JSON)."""


Send = Callable[[Sequence[OutboxRow]], Awaitable[Collection[int]]]
"""Publishes rows; returns the ids the broker confirmed (the others stay unsent)."""


class Transaction(abc.ABC):
    """One command's transaction. Obtained from :meth:`Database.transaction`."""

    connection: Any
    """What an async handler gets as ``cmd.db``: the backend's async connection, inside
    this transaction."""

    @abc.abstractmethod
    async def claim(self, key: str, *, fence: tuple[str, dict[str, Any]] | None = None
                    ) -> dict[str, Any] | None:
        """Begin, and lock ``key``: its recorded reply payload, or ``None`` when this
        transaction runs the handler (a savepoint is then set before it).

        ``fence`` = (another key, a reply): when this transaction runs the handler, also
        record that reply for the other key unless it has one (a compensation fences its
        action, so an action delivered after its compensation is never applied). On
        PostgreSQL this waits for a transaction still running the other key.
        """

    @abc.abstractmethod
    async def call_sync(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(connection)`` on a thread with a sync connection inside this
        transaction (what a sync handler gets as ``cmd.db``)."""

    @abc.abstractmethod
    async def commit(
        self,
        key: str,
        reply: dict[str, Any] | None,
        *,
        undo: bool,
        destination: str | None = None,
        body: str | None = None,
    ) -> None:
        """Roll back to the savepoint if ``undo``; record ``reply`` for ``key`` (``None``:
        it is already recorded); enqueue ``body`` for ``destination`` (none: an HTTP
        endpoint answers in its response); commit."""


class Database(abc.ABC):
    """A participant's own database (the port). Open it before use; ``aclose`` releases it."""

    url: str = ""

    @property
    @abc.abstractmethod
    def is_open(self) -> bool: ...

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create sagaway's tables if needed (migrations). Idempotent.

        Raises:
            StoreError: the database cannot be reached or migrated.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the connection(s). Idempotent."""

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """A transaction for one command; rolled back on leaving unless committed."""

    @abc.abstractmethod
    async def flush_outbox(self, send: Send, *, limit: int) -> int:
        """Pass up to ``limit`` unsent rows (oldest first) to ``send``, mark the ids it
        returns as sent; return how many rows were passed (0: nothing was pending)."""

    @abc.abstractmethod
    async def purge_sent(self, before: float) -> int:
        """Delete outbox rows sent before ``before`` (epoch seconds); return how many."""

    @abc.abstractmethod
    async def backlog(self) -> int:
        """How many replies wait in the outbox, unsent."""

    async def __aenter__(self) -> Database:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {_safe_url(self.url)}>"


def _safe_url(url: str) -> str:
    if "@" in url and "://" in url:  # never echo a password
        return url.split("://", 1)[0] + "://…@" + url.rsplit("@", 1)[1]
    return url


def open_database(db: Database | str | Any) -> Database:
    """The database ``db`` names (built, not yet open).

    ``sqlite:///inventory.db`` (a path relative to the working directory; four slashes for
    an absolute one), ``postgresql://user@host/db`` (the ``[postgres]`` extra), a
    :class:`Database`, or an ``asyncpg`` pool the service already has.

    Raises:
        StoreError: a URL of another scheme, or an object of another kind.
    """
    if isinstance(db, Database):
        return db
    if isinstance(db, str):
        scheme = db.split(":", 1)[0].lower() if ":" in db else ""
        if scheme == "sqlite":
            from sagaway.participant.sqlite import SQLiteDatabase

            return SQLiteDatabase.from_url(db)
        if scheme in ("postgresql", "postgres"):
            from sagaway.participant.postgres import PostgresDatabase

            return PostgresDatabase(db)
        raise StoreError(
            f"unknown participant database URL {_safe_url(db)!r}: use sqlite:///path/to/"
            f"service.db or postgresql://user@host/db"
        )
    if type(db).__module__.startswith("asyncpg"):
        from sagaway.participant.postgres import PostgresDatabase

        return PostgresDatabase(pool=db)
    raise StoreError(
        f"a participant's db must be a URL, a sagaway.participant Database or an asyncpg "
        f"pool, not {type(db).__name__}"
    )
