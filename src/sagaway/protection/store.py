"""EncryptedStore: any Store, with payloads sealed on the way in and opened on the way out.

The engine hands plaintext to the store port and reads plaintext back; this wrapper sits on
that port (``Orchestrator(codec=…)`` puts it there), so no backend and almost no engine code
knows about encryption. Sealed, each with its own nonce and bound to its place:

* the run's input (``run:<id>:input``);
* each step's result (``run:<id>:result:<step>``) and error text (``…:step-error:<step>``),
  and the run's error (``run:<id>:error``): error texts come from user code and can quote
  data;
* the ``error`` and ``reason`` of history entries (``run:<id>:history``); kinds, steps,
  attempts, times, statuses and operator names stay readable;
* the payload of every outbox message (``msg:<message id>``): commands, events, and so the
  broker's copy too; participants open it with the same codec and seal their replies.

Ids, saga names, versions, statuses, times, leases and step names stay plaintext, so every
query and index works as before. The idempotency fingerprint becomes a keyed HMAC
(``hmac:<kid>:…``): a guessed input cannot be confirmed from the database.

A run whose values cannot be opened (a key that is not configured) is returned with its
unreadable values as :class:`~sagaway.protection.codec.Sealed` strings and
``RunRecord.payload_error`` set; the worker fails that run with the message and goes on.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Sequence
from typing import Any

from sagaway.engine.payload import fingerprint
from sagaway.errors import PayloadCodecError
from sagaway.protection.codec import PayloadCodec, Sealed
from sagaway.run import HistoryEntry, SagaStatus
from sagaway.store.base import (
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

__all__ = ["SEALED_HISTORY_KEYS", "EncryptedStore", "RunSealer"]

SEALED_HISTORY_KEYS = ("error", "reason")
"""History entry data keys that can hold payload data (exception texts, and reasons, which
quote them or are free text)."""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _Opener:
    """Opens one run's values, remembering the first failure instead of raising."""

    def __init__(self, codec: PayloadCodec) -> None:
        self.codec = codec
        self.problem: str | None = None

    def open(self, value: Any, aad: str) -> Any:
        if not self.codec.is_sealed(value):
            return value
        try:
            return json.loads(self.codec.open_text(value, aad=aad))
        except PayloadCodecError as exc:
            self.problem = self.problem or str(exc)
            return Sealed(value)


class RunSealer:
    """Seals and opens the payload-bearing parts of runs and messages with one codec."""

    def __init__(self, codec: PayloadCodec) -> None:
        self.codec = codec

    # -- sealing --------------------------------------------------------------------------

    def seal_input(self, run_id: str, input_json: str) -> str:
        """The stored input column: the JSON string of the sealed canonical text."""
        return _dumps(self.codec.seal_text(input_json, aad=f"run:{run_id}:input"))

    def seal_state(self, run_id: str, state: dict[str, Any]) -> dict[str, Any]:
        seal = self.codec.seal
        out = dict(state)
        steps = {}
        for name, step in state.get("steps", {}).items():
            step = dict(step)
            if "result" in step:
                step["result"] = seal(step["result"], aad=f"run:{run_id}:result:{name}")
            if step.get("error") is not None:
                step["error"] = seal(step["error"], aad=f"run:{run_id}:step-error:{name}")
            steps[name] = step
        if "steps" in state:
            out["steps"] = steps
        if state.get("error") is not None:
            out["error"] = seal(state["error"], aad=f"run:{run_id}:error")
        return out

    def seal_error(self, run_id: str, error: str | None) -> str | None:
        if error is None:
            return None
        sealed: str = self.codec.seal(error, aad=f"run:{run_id}:error")
        return sealed

    def seal_history(self, run_id: str, entries: Sequence[HistoryEntry]
                     ) -> list[HistoryEntry]:
        out = []
        for entry in entries:
            if entry.data and any(entry.data.get(k) is not None for k in SEALED_HISTORY_KEYS):
                data = dict(entry.data)
                for key in SEALED_HISTORY_KEYS:
                    if data.get(key) is not None:
                        data[key] = self.codec.seal(data[key], aad=f"run:{run_id}:history")
                entry = dataclasses.replace(entry, data=data)
            out.append(entry)
        return out

    def seal_body(self, body: str) -> str:
        """An envelope's JSON text with its payload sealed to its message id."""
        doc = json.loads(body)
        if isinstance(doc, dict) and doc.get("payload") is not None and isinstance(
                doc.get("id"), str):
            doc["payload"] = self.codec.seal(doc["payload"], aad=f"msg:{doc['id']}")
            return _dumps(doc)
        return body

    def seal_messages(self, messages: Sequence[OutboxMessage]) -> list[OutboxMessage]:
        return [dataclasses.replace(m, body=self.seal_body(m.body)) for m in messages]

    # -- opening --------------------------------------------------------------------------

    def open_state(self, o: _Opener, rid: str, stored: dict[str, Any]) -> dict[str, Any]:
        state = dict(stored)
        if "steps" in state:
            steps = {}
            for name, step in state["steps"].items():
                step = dict(step)
                if "result" in step:
                    step["result"] = o.open(step["result"], f"run:{rid}:result:{name}")
                if step.get("error") is not None:
                    step["error"] = o.open(step["error"], f"run:{rid}:step-error:{name}")
                steps[name] = step
            state["steps"] = steps
        if state.get("error") is not None:
            state["error"] = o.open(state["error"], f"run:{rid}:error")
        return state

    def open_input(self, o: _Opener, rid: str, value: Any, input_hash: str
                   ) -> tuple[Any, str]:
        """(input, the plaintext fingerprint the engine compares) of a stored input."""
        if not self.codec.is_sealed(value):
            return value, input_hash
        try:
            text = self.codec.open_text(value, aad=f"run:{rid}:input")
        except PayloadCodecError as exc:
            o.problem = o.problem or str(exc)
            return Sealed(value), input_hash
        return json.loads(text), fingerprint(text)

    def open_record(self, record: RunRecord) -> RunRecord:
        """The record with its values opened; ``payload_error`` set if some could not be."""
        rid = record.id
        o = _Opener(self.codec)
        state = self.open_state(o, rid, record.state)
        history = record.history
        if history is not None:
            history = [self._open_entry(o, rid, h) for h in history]
        value, input_hash = self.open_input(o, rid, record.input, record.input_hash)
        return dataclasses.replace(
            record,
            input=value,
            input_hash=input_hash,
            state=state,
            error=o.open(record.error, f"run:{rid}:error"),
            history=history,
            payload_error=o.problem,
        )

    def open_stored(self, stored: StoredPayloads) -> StoredPayloads:
        """``load_payloads``'s answer with its values opened (unreadable ones left sealed)."""
        rid = stored.run_id
        o = _Opener(self.codec)
        value, input_hash = self.open_input(o, rid, json.loads(stored.input_json),
                                            stored.input_hash)
        history = {}
        for seq, text in stored.history.items():
            entries = [self._open_entry(o, rid, HistoryEntry.from_json(e))
                       for e in json.loads(text)]
            history[seq] = _dumps([e.to_json() for e in entries])
        outbox = {mid: self.open_body(body) for mid, body in stored.outbox.items()}
        return dataclasses.replace(
            stored, input_json=_dumps(value), input_hash=input_hash,
            state_json=_dumps(self.open_state(o, rid, json.loads(stored.state_json))),
            error=o.open(stored.error, f"run:{rid}:error"), history=history, outbox=outbox)

    def seal_rewrite(self, rw: PayloadRewrite) -> PayloadRewrite:
        """A rewrite of plaintext values, sealed as ``commit`` would seal them."""
        rid = rw.run_id
        history = {}
        for seq, text in rw.history.items():
            entries = self.seal_history(rid, [HistoryEntry.from_json(e)
                                              for e in json.loads(text)])
            history[seq] = _dumps([e.to_json() for e in entries])
        return dataclasses.replace(
            rw, input_json=self.seal_input(rid, rw.input_json),
            input_hash=self.codec.fingerprint(rw.input_json),
            state_json=_dumps(self.seal_state(rid, json.loads(rw.state_json))),
            error=self.seal_error(rid, rw.error), history=history,
            outbox={mid: self.seal_body(body) for mid, body in rw.outbox.items()},
            append=self.seal_history(rid, rw.append))

    def open_body(self, body: str) -> str:
        """An envelope's JSON text with its payload opened (left sealed if it cannot be)."""
        doc = json.loads(body)
        if isinstance(doc, dict) and self.codec.is_sealed(doc.get("payload")):
            try:
                doc["payload"] = self.codec.open(doc["payload"], aad=f"msg:{doc.get('id')}")
            except PayloadCodecError:
                return body
            return _dumps(doc)
        return body

    @staticmethod
    def _open_entry(o: _Opener, run_id: str, entry: HistoryEntry) -> HistoryEntry:
        if not entry.data or not any(o.codec.is_sealed(entry.data.get(k))
                                     for k in SEALED_HISTORY_KEYS):
            return entry
        data = dict(entry.data)
        for key in SEALED_HISTORY_KEYS:
            if key in data:
                data[key] = o.open(data[key], f"run:{run_id}:history")
        return dataclasses.replace(entry, data=data)

    def open_payload(self, message_id: str, payload: Any) -> Any:
        """A received envelope's payload, opened (strict: raises PayloadCodecError)."""
        return self.codec.open(payload, aad=f"msg:{message_id}")

    def seal_payload(self, message_id: str, payload: Any) -> Any:
        return None if payload is None else self.codec.seal(payload, aad=f"msg:{message_id}")

    # -- whole stored runs (rotation) -----------------------------------------------------

    def reseal(self, stored: StoredPayloads) -> PayloadRewrite | None:
        """``stored`` with every value sealed again under the active key; None when all of
        it already is (nothing to write). Raises UnknownKey for a value it cannot open."""
        codec = self.codec
        active = codec.active

        def stale(value: Any) -> bool:
            return codec.is_sealed(value) and codec.key_id(value) != active

        def again(value: Any, aad: str) -> Any:
            if value is None or (codec.is_sealed(value) and not stale(value)):
                return value
            return codec.seal(codec.open(value, aad=aad), aad=aad)

        rid = stored.run_id
        changed = False
        input_value = json.loads(stored.input_json)
        new_input = again(input_value, f"run:{rid}:input")
        changed |= new_input is not input_value
        state = json.loads(stored.state_json)
        for name, step in state.get("steps", {}).items():
            for key, aad in (("result", f"run:{rid}:result:{name}"),
                             ("error", f"run:{rid}:step-error:{name}")):
                if key in step:
                    value = again(step[key], aad)
                    changed |= value is not step[key]
                    step[key] = value
        if state.get("error") is not None:
            value = again(state["error"], f"run:{rid}:error")
            changed |= value is not state["error"]
            state["error"] = value
        error = again(stored.error, f"run:{rid}:error")
        changed |= error is not stored.error
        history: dict[int, str] = {}
        for seq, text in stored.history.items():
            entries = json.loads(text)
            dirty = False
            for entry in entries:
                data = entry.get("data") or {}
                for key in SEALED_HISTORY_KEYS:
                    if data.get(key) is not None:
                        value = again(data[key], f"run:{rid}:history")
                        dirty |= value is not data[key]
                        data[key] = value
            if dirty:
                history[seq] = _dumps(entries)
        outbox: dict[str, str] = {}
        for mid, body in stored.outbox.items():
            doc = json.loads(body)
            if isinstance(doc, dict) and doc.get("payload") is not None:
                value = again(doc["payload"], f"msg:{mid}")
                if value is not doc["payload"]:
                    doc["payload"] = value
                    outbox[mid] = _dumps(doc)
        input_hash = stored.input_hash
        if codec.is_sealed(new_input) and not input_hash.startswith(f"hmac:{active}:"):
            input_hash = codec.fingerprint(codec.open_text(new_input, aad=f"run:{rid}:input"))
            changed = True
        if not (changed or history or outbox):
            return None
        return PayloadRewrite(
            run_id=rid, expected_version=stored.row_version, input_json=_dumps(new_input),
            input_hash=input_hash, state_json=_dumps(state), error=error, history=history,
            outbox=outbox,
        )


class EncryptedStore(Store):
    """Wraps ``inner``: payloads are sealed with ``codec`` before they are stored and opened
    when read back. Every other call passes straight through."""

    def __init__(self, inner: Store, codec: PayloadCodec) -> None:
        self.inner = inner
        self.codec = codec
        self.sealer = RunSealer(codec)
        self.url = inner.url
        self.commit_lanes = inner.commit_lanes

    @property
    def migrate_on_open(self) -> bool:
        return self.inner.migrate_on_open

    @migrate_on_open.setter
    def migrate_on_open(self, value: bool) -> None:
        self.inner.migrate_on_open = value

    def __repr__(self) -> str:
        return f"<EncryptedStore {self.inner!r} {self.codec!r}>"

    async def open(self) -> None:
        await self.inner.open()

    async def migrate(self) -> list[str]:
        return await self.inner.migrate()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def now(self) -> float:
        return await self.inner.now()

    def _seal_new(self, new: NewRun) -> NewRun:
        s = self.sealer
        return dataclasses.replace(
            new,
            input_json=s.seal_input(new.id, new.input_json),
            input_hash=self.codec.fingerprint(new.input_json),
            state=s.seal_state(new.id, new.state),
            history=s.seal_history(new.id, new.history),
            outbox=s.seal_messages(new.outbox),
        )

    def _seal_update(self, upd: RunUpdate) -> RunUpdate:
        s = self.sealer
        return dataclasses.replace(
            upd,
            state=s.seal_state(upd.run_id, upd.state),
            error=s.seal_error(upd.run_id, upd.error),
            history=s.seal_history(upd.run_id, upd.history),
            outbox=s.seal_messages(upd.outbox),
        )

    def _open(self, record: RunRecord | None) -> RunRecord | None:
        return None if record is None else self.sealer.open_record(record)

    async def commit(self, creates: Sequence[NewRun], updates: Sequence[RunUpdate], *,
                     owner: str, lease_seconds: float) -> BatchResult:
        result = await self.inner.commit(
            [self._seal_new(n) for n in creates], [self._seal_update(u) for u in updates],
            owner=owner, lease_seconds=lease_seconds)
        # Opening gives back the plaintext fingerprint the engine compares on a reused key.
        result.created = [CreateResult(self.sealer.open_record(c.record), c.created)
                          for c in result.created]
        return result

    async def claim_due(self, *, owner: str, lease_seconds: float, limit: int,
                        definitions: Collection[tuple[str, int]]) -> list[RunRecord]:
        records = await self.inner.claim_due(owner=owner, lease_seconds=lease_seconds,
                                             limit=limit, definitions=definitions)
        return [self.sealer.open_record(r) for r in records]

    async def claim_run(self, run_id: str, *, owner: str, lease_seconds: float
                        ) -> RunRecord | None:
        return self._open(await self.inner.claim_run(run_id, owner=owner,
                                                     lease_seconds=lease_seconds))

    async def request_operation(self, run_id: str, *, allowed: Collection[SagaStatus],
                                request: dict[str, Any] | None, new_status: SagaStatus | None,
                                history: Sequence[HistoryEntry], now: float
                                ) -> RunRecord | None:
        return self._open(await self.inner.request_operation(
            run_id, allowed=allowed, request=request, new_status=new_status,
            history=self.sealer.seal_history(run_id, history), now=now))

    async def claim_outbox(self, *, owner: str, lease_seconds: float, limit: int
                           ) -> list[OutboxRecord]:
        # Bodies stay sealed: the broker gets the ciphertext.
        return await self.inner.claim_outbox(owner=owner, lease_seconds=lease_seconds,
                                             limit=limit)

    async def mark_sent(self, ids: Collection[str], *, now: float) -> None:
        await self.inner.mark_sent(ids, now=now)

    async def outbox_backlog(self) -> tuple[int, float | None]:
        return await self.inner.outbox_backlog()

    async def renew_leases(self, *, owner: str, lease_seconds: float) -> set[str]:
        return await self.inner.renew_leases(owner=owner, lease_seconds=lease_seconds)

    async def release_leases(self, *, owner: str, run_ids: Collection[str] | None = None
                             ) -> None:
        await self.inner.release_leases(owner=owner, run_ids=run_ids)

    async def find_run(self, saga: str, idempotency_key: str) -> RunRecord | None:
        return self._open(await self.inner.find_run(saga, idempotency_key))

    async def get_run(self, run_id: str, *, history: bool = True) -> RunRecord | None:
        return self._open(await self.inner.get_run(run_id, history=history))

    async def list_runs(self, *, status: Collection[SagaStatus] | None = None,
                        saga: str | None = None, limit: int = 100,
                        before: tuple[float, str] | None = None,
                        created_from: float | None = None, created_to: float | None = None,
                        updated_before: float | None = None) -> list[RunRecord]:
        records = await self.inner.list_runs(
            status=status, saga=saga, limit=limit, before=before, created_from=created_from,
            created_to=created_to, updated_before=updated_before)
        return [self.sealer.open_record(r) for r in records]

    async def count_runs(self, *, saga: str | None = None) -> dict[SagaStatus, int]:
        return await self.inner.count_runs(saga=saga)

    async def open_counts(self, *, updated_before: float
                          ) -> dict[tuple[str, SagaStatus], tuple[int, int]]:
        return await self.inner.open_counts(updated_before=updated_before)

    # Transparent like the rest: plaintext out, sealed in. Erasure and rotation work on the
    # stored form and so go to ``inner`` (see ``protection.erasure``).

    async def load_payloads(self, run_id: str) -> StoredPayloads | None:
        stored = await self.inner.load_payloads(run_id)
        return None if stored is None else self.sealer.open_stored(stored)

    async def rewrite_payloads(self, rewrite: PayloadRewrite) -> bool:
        return await self.inner.rewrite_payloads(self.sealer.seal_rewrite(rewrite))

    async def payload_run_ids(self, *, after: str | None, limit: int,
                              finished_before: float | None = None) -> list[str]:
        return await self.inner.payload_run_ids(after=after, limit=limit,
                                                finished_before=finished_before)
