"""MemoryStore: the saga log in a dict. For tests and users' own unit tests.

It keeps documents as JSON text, exactly as a database would, so nothing a caller holds can
alias stored state, and it passes the same conformance suite as the durable backends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sagaway.errors import StoreError
from sagaway.run import ACTIVE_STATUSES, HistoryEntry, SagaStatus
from sagaway.store.base import (
    ERASABLE_STATUSES,
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
)

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Message:
    id: str
    destination: str
    body: str
    run_id: str | None
    created_at: float
    owner: str | None = None
    lease_expires: float | None = None
    attempts: int = 0
    sent_at: float | None = None


@dataclass(slots=True)
class _Row:
    record: RunRecord
    state_json: str
    history: list[str] = field(default_factory=list)
    erased_at: float | None = None


class MemoryStore(Store):
    """An in-process saga log. Not durable: a crash loses it.

    Args:
        clock: the store's clock (seconds since the epoch); the testing kit passes a
            virtual clock here.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.url = "memory://"
        self._clock = clock
        self._rows: dict[str, _Row] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._outbox: dict[str, _Message] = {}

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def now(self) -> float:
        return self._clock()

    def _load(self, row: _Row, *, history: bool = False) -> RunRecord:
        return replace(
            row.record,
            state=json.loads(row.state_json),
            input=json.loads(json.dumps(row.record.input)),
            request=json.loads(json.dumps(row.record.request))
            if row.record.request is not None
            else None,
            history=[HistoryEntry.from_json(json.loads(h)) for h in row.history]
            if history
            else None,
        )

    async def commit(
        self,
        creates: Sequence[NewRun],
        updates: Sequence[RunUpdate],
        *,
        owner: str,
        lease_seconds: float,
    ) -> BatchResult:
        now = self._clock()
        result = BatchResult()
        # Stage the batch on copies and swap them in at the end: a batch that raises (an id
        # collision, a document JSON cannot encode) leaves the store untouched, as a
        # database transaction would. Rows are replaced, never mutated, so copies are shallow.
        rows = dict(self._rows)
        outbox = dict(self._outbox)

        def emit(run_id: str, messages: Sequence[OutboxMessage]) -> None:
            for m in messages:
                if m.id in outbox:
                    raise StoreError(f"outbox message {m.id} already exists")
                outbox[m.id] = _Message(m.id, m.destination, m.body, run_id, now)
        keys = dict(self._keys)
        for new in creates:
            if new.idempotency_key is not None:
                existing = keys.get((new.saga, new.idempotency_key))
                if existing is not None:
                    result.created.append(CreateResult(self._load(rows[existing]), False))
                    continue
            if new.id in rows:
                raise StoreError(f"run id {new.id} already exists")
            record = RunRecord(
                id=new.id,
                saga=new.saga,
                version=new.version,
                status=new.status,
                input=json.loads(new.input_json),
                state={},
                error=None,
                idempotency_key=new.idempotency_key,
                input_hash=new.input_hash,
                owner=owner if new.leased else None,
                lease_expires=now + lease_seconds if new.leased else None,
                wake_at=new.wake_at,
                row_version=1,
                created_at=new.now,
                updated_at=new.now,
            )
            history = [json.dumps(h.to_json()) for h in new.history]
            row = _Row(record, json.dumps(new.state), history)
            rows[new.id] = row
            if new.idempotency_key is not None:
                keys[(new.saga, new.idempotency_key)] = new.id
            emit(new.id, new.outbox)
            result.created.append(CreateResult(self._load(row), True))
        for upd in updates:
            current = rows.get(upd.run_id)
            if (
                current is None
                or current.record.row_version != upd.expected_version
                or current.record.owner != owner
            ):
                result.updated.append(False)
                continue
            rows[upd.run_id] = _Row(
                replace(
                    current.record,
                    status=upd.status,
                    error=upd.error,
                    wake_at=upd.wake_at,
                    row_version=current.record.row_version + 1,
                    updated_at=upd.now,
                    owner=None if upd.release else current.record.owner,
                    lease_expires=None if upd.release else current.record.lease_expires,
                    request=None if upd.clear_request else current.record.request,
                ),
                json.dumps(upd.state),
                [*current.history, *(json.dumps(h.to_json()) for h in upd.history)],
                current.erased_at,
            )
            emit(upd.run_id, upd.outbox)
            result.updated.append(True)
        self._rows, self._keys, self._outbox = rows, keys, outbox
        return result

    async def claim_due(
        self,
        *,
        owner: str,
        lease_seconds: float,
        limit: int,
        definitions: Collection[tuple[str, int]],
    ) -> list[RunRecord]:
        now = self._clock()
        wanted = set(definitions)
        claimed: list[RunRecord] = []
        for row in sorted(self._rows.values(), key=lambda r: (r.record.wake_at or 0.0)):
            if len(claimed) >= limit:
                break
            rec = row.record
            if (rec.status not in ACTIVE_STATUSES and rec.request is None) or (
                rec.saga, rec.version) not in wanted:
                continue
            if rec.owner is not None and rec.lease_expires is not None and rec.lease_expires > now:
                continue
            if rec.request is None and rec.wake_at is not None and rec.wake_at > now:
                continue
            row.record = replace(
                rec, owner=owner, lease_expires=now + lease_seconds, row_version=rec.row_version + 1
            )
            claimed.append(self._load(row))
        return claimed

    async def claim_run(self, run_id: str, *, owner: str, lease_seconds: float
                        ) -> RunRecord | None:
        now = self._clock()
        row = self._rows.get(run_id)
        if row is None or row.record.status not in ACTIVE_STATUSES:
            return None
        rec = row.record
        if rec.owner is not None and rec.lease_expires is not None and rec.lease_expires > now:
            return None
        row.record = replace(rec, owner=owner, lease_expires=now + lease_seconds,
                             row_version=rec.row_version + 1)
        return self._load(row)

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
        row = self._rows.get(run_id)
        if row is None or row.record.status not in set(allowed) or row.record.request is not None:
            return None
        rec = row.record
        self._rows[run_id] = _Row(
            replace(
                rec,
                status=new_status or rec.status,
                request=json.loads(json.dumps(request)) if request is not None else None,
                owner=None,
                lease_expires=None,
                row_version=rec.row_version + 1,
                updated_at=now,
            ),
            row.state_json,
            [*row.history, *(json.dumps(h.to_json()) for h in history)],
            row.erased_at,
        )
        return self._load(self._rows[run_id])

    async def claim_outbox(self, *, owner: str, lease_seconds: float, limit: int
                           ) -> list[OutboxRecord]:
        now = self._clock()
        claimed: list[OutboxRecord] = []
        for m in sorted(self._outbox.values(), key=lambda m: (m.created_at, m.id)):
            if len(claimed) >= limit:
                break
            if m.sent_at is not None or (m.lease_expires is not None and m.lease_expires > now):
                continue
            claimed.append(OutboxRecord(m.id, m.destination, m.body, m.run_id, m.created_at,
                                        m.attempts))
            m.owner, m.lease_expires, m.attempts = owner, now + lease_seconds, m.attempts + 1
        return claimed

    async def mark_sent(self, ids: Collection[str], *, now: float) -> None:
        for i in ids:
            m = self._outbox.get(i)
            if m is not None and m.sent_at is None:
                m.sent_at = now

    async def open_counts(self, *, updated_before: float
                          ) -> dict[tuple[str, SagaStatus], tuple[int, int]]:
        counts: dict[tuple[str, SagaStatus], tuple[int, int]] = {}
        for row in self._rows.values():
            rec = row.record
            if rec.status in ACTIVE_STATUSES or rec.status is SagaStatus.FAILED:
                n, old = counts.get((rec.saga, rec.status), (0, 0))
                counts[(rec.saga, rec.status)] = (n + 1, old + (rec.updated_at < updated_before))
        return counts

    async def outbox_backlog(self) -> tuple[int, float | None]:
        unsent = [m.created_at for m in self._outbox.values() if m.sent_at is None]
        return len(unsent), (min(unsent) if unsent else None)

    async def renew_leases(self, *, owner: str, lease_seconds: float) -> set[str]:
        now = self._clock()
        held: set[str] = set()
        for row in self._rows.values():
            if row.record.owner == owner and row.record.status in ACTIVE_STATUSES:
                row.record = replace(row.record, lease_expires=now + lease_seconds)
                held.add(row.record.id)
        return held

    async def release_leases(self, *, owner: str, run_ids: Collection[str] | None = None) -> None:
        ids = set(run_ids) if run_ids is not None else None
        for row in self._rows.values():
            if row.record.owner == owner and (ids is None or row.record.id in ids):
                row.record = replace(row.record, owner=None, lease_expires=None)

    async def find_run(self, saga: str, idempotency_key: str) -> RunRecord | None:
        run_id = self._keys.get((saga, idempotency_key))
        return None if run_id is None else await self.get_run(run_id, history=False)

    async def get_run(self, run_id: str, *, history: bool = True) -> RunRecord | None:
        row = self._rows.get(run_id)
        return None if row is None else self._load(row, history=history)

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
        rows = sorted(
            self._rows.values(), key=lambda r: (r.record.created_at, r.record.id), reverse=True
        )
        statuses = set(status) if status is not None else None
        out: list[RunRecord] = []
        for row in rows:
            if len(out) >= limit:
                break
            rec = row.record
            if statuses is not None and rec.status not in statuses:
                continue
            if saga is not None and rec.saga != saga:
                continue
            if before is not None and (rec.created_at, rec.id) >= before:
                continue
            if created_from is not None and rec.created_at < created_from:
                continue
            if created_to is not None and rec.created_at >= created_to:
                continue
            if updated_before is not None and rec.updated_at >= updated_before:
                continue
            out.append(self._load(row))
        return out

    async def count_runs(self, *, saga: str | None = None) -> dict[SagaStatus, int]:
        counts: dict[SagaStatus, int] = {}
        for row in self._rows.values():
            if saga is None or row.record.saga == saga:
                counts[row.record.status] = counts.get(row.record.status, 0) + 1
        return counts

    # -- erasure, retention and key rotation -------------------------------------------------
    # History is kept one line per entry here, so each line is presented as a "row" of one
    # (keyed by its position): callers treat the keys as opaque and pass them back.

    async def load_payloads(self, run_id: str) -> StoredPayloads | None:
        row = self._rows.get(run_id)
        if row is None:
            return None
        rec = row.record
        return StoredPayloads(
            run_id, rec.status, rec.row_version, rec.updated_at, row.erased_at,
            rec.request is not None, json.dumps(rec.input), rec.input_hash, row.state_json,
            rec.error, {i: f"[{line}]" for i, line in enumerate(row.history)},
            {m.id: m.body for m in self._outbox.values() if m.run_id == run_id},
        )

    async def rewrite_payloads(self, rewrite: PayloadRewrite) -> bool:
        rw = rewrite
        row = self._rows.get(rw.run_id)
        if row is None or row.record.row_version != rw.expected_version:
            return False
        history = list(row.history)
        for i, text in rw.history.items():
            if 0 <= i < len(history):
                history[i] = "\n".join(json.dumps(e) for e in json.loads(text))
        # A replaced row may hold no entry or several; keep one line per entry.
        lines = [line for text in history for line in text.split("\n") if line]
        lines += [json.dumps(h.to_json()) for h in rw.append]
        rec = row.record
        self._rows[rw.run_id] = _Row(
            replace(rec, input=json.loads(rw.input_json), input_hash=rw.input_hash,
                    error=rw.error,
                    row_version=rec.row_version + (1 if rw.append else 0),
                    updated_at=rw.now if rw.append else rec.updated_at),
            rw.state_json, lines, rw.now if rw.erased else row.erased_at,
        )
        for mid, body in rw.outbox.items():
            m = self._outbox.get(mid)
            if m is not None and m.run_id == rw.run_id:
                m.body = body
        return True

    async def payload_run_ids(self, *, after: str | None, limit: int,
                              finished_before: float | None = None) -> list[str]:
        out: list[str] = []
        for run_id in sorted(self._rows):
            if len(out) >= limit:
                break
            if after is not None and run_id <= after:
                continue
            row = self._rows[run_id]
            if finished_before is not None and not (
                    row.record.status in ERASABLE_STATUSES
                    and row.record.updated_at < finished_before
                    and row.erased_at is None and row.record.request is None):
                continue
            out.append(run_id)
        return out
