"""The store port: the handful of primitives every saga-log backend implements.

Policy (retries, ordering, batching, timers) lives above this port, in the engine. A backend
only has to make each primitive atomic and durable:

* ``commit`` applies a batch of run creations and fenced run updates in **one transaction**
  (group commit). Each update is conditional on the run's row version and on this worker
  owning the lease; a fenced update is reported, not raised, so one stale run cannot fail a
  batch carrying other runs' transitions.
* ``claim_due`` hands unowned or lease-expired active runs to a worker, stamping the lease
  with the *store's* clock.
* ``renew_leases`` / ``release_leases`` keep or drop a worker's claims in one statement.

Every backend passes ``sagaway.testing.conformance``.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagaway.run import HistoryEntry, SagaStatus

__all__ = [
    "ERASABLE_STATUSES",
    "RUN_COLUMNS",
    "BatchResult",
    "CreateResult",
    "NewRun",
    "OutboxMessage",
    "OutboxRecord",
    "PayloadRewrite",
    "RunRecord",
    "RunUpdate",
    "Store",
    "StoredPayloads",
    "created_record",
    "history_from_rows",
    "history_json",
    "list_filters",
    "record_from_row",
]


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run as stored. ``state`` is the decider's state document (JSON data)."""

    id: str
    saga: str
    version: int
    status: SagaStatus
    input: Any
    state: dict[str, Any]
    error: str | None
    idempotency_key: str | None
    input_hash: str
    owner: str | None
    lease_expires: float | None
    wake_at: float | None
    row_version: int
    created_at: float
    updated_at: float
    history: list[HistoryEntry] | None = None
    """Filled only by ``get_run(..., history=True)``."""
    request: dict[str, Any] | None = None
    """An operator request waiting for a worker (see ``Store.request_operation``)."""
    payload_error: str | None = None
    """Set by an encrypting store when the run's payloads cannot be decrypted (a key that
    is not configured): the worker fails the run with this message."""


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message to publish, written in the same transaction as the transition that emits it.

    ``body`` is the encoded envelope (JSON text); ``id`` is the envelope's message id, so a
    republish after a crash carries the same id and consumers can drop the duplicate. The
    store records the emitting run's id with it.
    """

    id: str
    destination: str
    body: str


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """An unsent outbox message, as ``claim_outbox`` hands it to a relay."""

    id: str
    destination: str
    body: str
    run_id: str | None
    created_at: float
    attempts: int
    """How many relays claimed it before (a crash or a failed publish in between)."""


@dataclass(frozen=True, slots=True)
class NewRun:
    """Create a run (already started: its first intents are in ``state`` and ``history``)."""

    id: str
    saga: str
    version: int
    status: SagaStatus
    input_json: str
    input_hash: str
    state: dict[str, Any]
    idempotency_key: str | None
    wake_at: float | None
    now: float
    history: Sequence[HistoryEntry] = ()
    leased: bool = True
    """Lease it to the committing worker; False leaves it unowned for any worker to claim."""
    outbox: Sequence[OutboxMessage] = ()
    """Messages the creation emits, written in the same transaction."""


@dataclass(frozen=True, slots=True)
class RunUpdate:
    """A fenced transition: applied only if the row is at ``expected_version`` and owned."""

    run_id: str
    expected_version: int
    status: SagaStatus
    state: dict[str, Any]
    error: str | None
    wake_at: float | None
    now: float
    history: Sequence[HistoryEntry] = ()
    release: bool = False
    """Drop the lease with this write (the run finished)."""
    clear_request: bool = False
    """The operator request the run carried has been carried out."""
    outbox: Sequence[OutboxMessage] = ()
    """Messages the transition emits: written only if the update applies, atomically."""


@dataclass(frozen=True, slots=True)
class CreateResult:
    record: RunRecord
    created: bool
    """False when a run with the same (saga, idempotency_key) already existed."""


@dataclass(slots=True)
class BatchResult:
    created: list[CreateResult] = field(default_factory=list)
    updated: list[bool] = field(default_factory=list)
    """Per update: True if applied, False if fenced (version moved or lease taken)."""


ERASABLE_STATUSES = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.RESOLVED)
"""Runs in these statuses can have their payloads erased (FAILED still needs an operator)."""


@dataclass(frozen=True, slots=True)
class StoredPayloads:
    """Everything of one run that can hold payload data, as stored (documents as JSON text).

    What erasure, retention and key rotation read (``Store.load_payloads``) and write back
    (``Store.rewrite_payloads``).
    """

    run_id: str
    status: SagaStatus
    row_version: int
    updated_at: float
    erased_at: float | None
    has_request: bool
    input_json: str
    input_hash: str
    state_json: str
    error: str | None
    history: dict[int, str]
    """History rows: the row version after the transition → its entries (JSON array text)."""
    outbox: dict[str, str]
    """The run's outbox messages, sent or not: message id → body."""


@dataclass(frozen=True, slots=True)
class PayloadRewrite:
    """Replace a run's payload-bearing fields, if its row version is still
    ``expected_version`` (a worker's write in between makes it a no-op: read again)."""

    run_id: str
    expected_version: int
    input_json: str
    input_hash: str
    state_json: str
    error: str | None
    history: Mapping[int, str] = field(default_factory=dict)
    """History rows to replace (by their row version); others are left as they are."""
    outbox: Mapping[str, str] = field(default_factory=dict)
    """Outbox bodies to replace, by message id."""
    append: Sequence[HistoryEntry] = ()
    """Timeline lines to append as a transition of their own: bumps the row version and
    ``updated_at`` (erasure records ``run.erased``); without them the version stays."""
    erased: bool = False
    """Stamp ``erased_at`` (the run's payloads are gone; retention skips it)."""
    now: float = 0.0


# -- helpers for SQL backends -------------------------------------------------------------

RUN_COLUMNS = (
    "id", "saga", "version", "status", "input", "input_hash", "state", "error",
    "idempotency_key", "owner", "lease_expires", "wake_at", "row_version", "created_at",
    "updated_at", "request",
)
"""The run columns in the order ``record_from_row`` reads them."""


def record_from_row(row: Sequence[Any], history: list[HistoryEntry] | None = None
                    ) -> RunRecord:
    """A RunRecord from a row of ``RUN_COLUMNS`` (documents as JSON text)."""
    return RunRecord(
        id=row[0],
        saga=row[1],
        version=row[2],
        status=SagaStatus(row[3]),
        input=json.loads(row[4]),
        input_hash=row[5],
        state=json.loads(row[6]),
        error=row[7],
        idempotency_key=row[8],
        owner=row[9],
        lease_expires=row[10],
        wake_at=row[11],
        row_version=row[12],
        created_at=row[13],
        updated_at=row[14],
        history=history,
        request=json.loads(row[15]) if row[15] else None,
    )


def history_json(entries: Sequence[HistoryEntry]) -> str:
    """One transition's timeline lines as the JSON text a history row stores."""
    return json.dumps([h.to_json() for h in entries], separators=(",", ":"))


def history_from_rows(texts: Sequence[str]) -> list[HistoryEntry]:
    """The timeline from history rows' JSON texts, in transition order."""
    return [HistoryEntry.from_json(item) for text in texts for item in json.loads(text)]


def list_filters(
    mark: Callable[[int], str],
    *,
    status: Collection[SagaStatus] | None,
    saga: str | None,
    before: tuple[float, str] | None,
    created_from: float | None,
    created_to: float | None,
    updated_before: float | None,
) -> tuple[str, list[Any]] | None:
    """The WHERE clause and parameters of ``list_runs`` for a SQL backend.

    ``mark(n)`` writes the placeholder of the n-th parameter (``?`` or ``$n``). Every value
    is a parameter, never text in the SQL. None means no run can match (an empty status set).
    """
    clauses: list[str] = []
    params: list[Any] = []

    def add(clause: str, *values: Any) -> None:
        marks = [mark(len(params) + i + 1) for i in range(len(values))]
        params.extend(values)
        clauses.append(clause.format(*marks))

    if status is not None:
        values = [SagaStatus(s).value for s in status]
        if not values:
            return None
        add(f"status IN ({', '.join('{}' for _ in values)})", *values)
    if saga is not None:
        add("saga = {}", saga)
    if before is not None:
        add("(created_at, id) < ({}, {})", float(before[0]), str(before[1]))
    for clause, value in (("created_at >= {}", created_from), ("created_at < {}", created_to),
                          ("updated_at < {}", updated_before)):
        if value is not None:
            add(clause, float(value))
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), params


def created_record(new: NewRun, owner: str | None, lease_expires: float | None) -> RunRecord:
    """The row a creation just wrote, without reading it back."""
    return RunRecord(
        id=new.id,
        saga=new.saga,
        version=new.version,
        status=new.status,
        input=json.loads(new.input_json),
        state=json.loads(json.dumps(new.state)),
        error=None,
        idempotency_key=new.idempotency_key,
        input_hash=new.input_hash,
        owner=owner,
        lease_expires=lease_expires,
        wake_at=new.wake_at,
        row_version=1,
        created_at=new.now,
        updated_at=new.now,
    )


class Store(abc.ABC):
    """A saga log. Async; safe to share between the tasks of one event loop."""

    url: str = ""
    migrate_on_open: bool = True
    """Whether ``open()`` applies pending migrations."""
    commit_lanes: int = 1
    """How many group-commit batches may be in flight at once (a backend with a pool of
    connections and a server doing the work can overlap them)."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and (unless the store was built with ``migrate=False``) apply migrations.

        Idempotent.
        """

    async def migrate(self) -> list[str]:
        """Apply pending schema migrations; return the names applied. Idempotent.

        The default suits stores without a schema (memory).
        """
        return []

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections. Idempotent."""

    @abc.abstractmethod
    async def now(self) -> float:
        """The store's clock (seconds since the epoch), the one leases are stamped with."""

    @abc.abstractmethod
    async def commit(
        self,
        creates: Sequence[NewRun],
        updates: Sequence[RunUpdate],
        *,
        owner: str,
        lease_seconds: float,
    ) -> BatchResult:
        """Apply creations and fenced updates in one durable transaction.

        Created runs are leased to ``owner`` (unless ``leased=False``). A creation whose
        (saga, key) exists returns the existing run with ``created=False``. Applied updates
        bump the row version by one.
        """

    @abc.abstractmethod
    async def claim_due(
        self,
        *,
        owner: str,
        lease_seconds: float,
        limit: int,
        definitions: Collection[tuple[str, int]],
    ) -> list[RunRecord]:
        """Lease up to ``limit`` runs, unowned or with an expired lease, that are due: active
        with no timer or a timer that has come (``wake_at <= now``), or carrying an operator
        request. A run parked on a reply or a backoff is left alone until its timer.

        Only runs whose (saga, version) is in ``definitions`` are claimed, so a worker never
        takes a run it cannot drive. Claiming bumps the row version (fencing the old owner).
        """

    @abc.abstractmethod
    async def claim_run(self, run_id: str, *, owner: str, lease_seconds: float
                        ) -> RunRecord | None:
        """Lease one active run now, whatever its timer, if unowned or its lease expired.

        For a reply that wakes a parked run. None when another worker holds it, or it is
        finished or unknown. Bumps the row version like ``claim_due``.
        """

    @abc.abstractmethod
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
        """Record an operator's request on a run, or apply a status change at once.

        Applied only if the run's status is in ``allowed`` and no other request is pending;
        otherwise nothing changes and None is returned. Either way it fences the current
        owner: the row version is bumped and the lease dropped, so whichever worker claims
        the run next (``claim_due`` also claims finished runs carrying a request) carries
        the request out with the definition it registers.
        """

    @abc.abstractmethod
    async def claim_outbox(self, *, owner: str, lease_seconds: float, limit: int
                           ) -> list[OutboxRecord]:
        """Lease up to ``limit`` unsent messages, oldest first, to one relay.

        A message stays claimed until ``mark_sent`` or until the lease expires (the relay
        died or could not publish), when another relay claims it again: at-least-once.
        """

    @abc.abstractmethod
    async def mark_sent(self, ids: Collection[str], *, now: float) -> None:
        """Record that the broker confirmed these messages."""

    @abc.abstractmethod
    async def outbox_backlog(self) -> tuple[int, float | None]:
        """(unsent messages, created_at of the oldest one or None)."""

    @abc.abstractmethod
    async def renew_leases(self, *, owner: str, lease_seconds: float) -> set[str]:
        """Extend every active lease ``owner`` holds; return the ids of those runs."""

    @abc.abstractmethod
    async def release_leases(self, *, owner: str, run_ids: Collection[str] | None = None) -> None:
        """Give up ``owner``'s leases (all, or those runs) so other workers claim them at once."""

    @abc.abstractmethod
    async def find_run(self, saga: str, idempotency_key: str) -> RunRecord | None:
        """The run of ``saga`` started with ``idempotency_key`` (without its history), or
        None. A unique index lookup: how a refused start still finds the run it asked for."""

    @abc.abstractmethod
    async def get_run(self, run_id: str, *, history: bool = True) -> RunRecord | None:
        """One run, with its history if asked."""

    @abc.abstractmethod
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
        """Runs newest first (by created_at, then id), optionally filtered.

        ``before`` is a cursor: the (created_at, id) of the last run of the previous page.
        ``created_from`` (inclusive) and ``created_to`` (exclusive) bound the start time;
        ``updated_before`` keeps runs whose last transition is older than that time (with
        the active statuses, that is how stuck runs are found).
        """

    @abc.abstractmethod
    async def count_runs(self, *, saga: str | None = None) -> dict[SagaStatus, int]:
        """How many runs there are in each status (statuses with none are left out)."""

    @abc.abstractmethod
    async def open_counts(self, *, updated_before: float
                          ) -> dict[tuple[str, SagaStatus], tuple[int, int]]:
        """Runs that are active or FAILED, by (saga, status): (how many, how many of them
        have had no transition since ``updated_before``). For metrics gauges: it reads the
        status index only, never the finished runs."""
    # -- erasure, retention and key rotation (rare, operator-driven) -------------------------

    @abc.abstractmethod
    async def load_payloads(self, run_id: str) -> StoredPayloads | None:
        """A run's payload-bearing fields as stored (None: no such run)."""

    @abc.abstractmethod
    async def rewrite_payloads(self, rewrite: PayloadRewrite) -> bool:
        """Apply ``rewrite`` in one transaction if the run is still at its expected row
        version; return whether it applied. Never touches the lease, status or request."""

    @abc.abstractmethod
    async def payload_run_ids(self, *, after: str | None, limit: int,
                              finished_before: float | None = None) -> list[str]:
        """Run ids in id order after the cursor ``after``: all runs, or with
        ``finished_before`` only runs in ``ERASABLE_STATUSES``, not erased yet, with no
        operator request, whose last transition is older than that time (what retention
        purges)."""

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
