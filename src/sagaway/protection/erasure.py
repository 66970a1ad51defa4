"""Erasure, retention and key rotation: operator work on stored runs, above the store port.

* :func:`erase_run` removes a finished run's payloads (input, results, error texts, the
  error and reason texts of its timeline, its messages' payloads) and keeps its timeline:
  kinds, steps, attempts, times and statuses, plus a ``run.erased`` entry saying who erased
  it and why. Only COMPLETED, COMPENSATED and RESOLVED runs: a FAILED run still needs an
  operator (compensate or resolve it first), an active one still needs its data.
* :func:`purge_finished` erases every such run whose last transition is older than a
  cutoff (``sagaway purge --older-than 30d``, ``Orchestrator(retention_days=…)``).
* :func:`rotate_keys` seals every stored value again under the codec's active key, run by
  run in id order: resumable (``after=``), idempotent (runs already under the active key
  are not written), and safe next to running workers (each rewrite is conditional on the
  run's row version; a run that moved is read again).

Each works on any :class:`~sagaway.store.base.Store` (memory, SQLite, PostgreSQL).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sagaway.errors import InvalidTransition, PayloadCodecError, RunNotFound, StoreError
from sagaway.protection.codec import PayloadCodec
from sagaway.protection.store import SEALED_HISTORY_KEYS, EncryptedStore, RunSealer
from sagaway.run import HistoryEntry
from sagaway.store.base import ERASABLE_STATUSES, PayloadRewrite, Store, StoredPayloads

__all__ = [
    "ERASABLE",
    "ERASED",
    "RotationReport",
    "erase_run",
    "parse_age",
    "purge_finished",
    "rotate_keys",
]

log = logging.getLogger("sagaway.protection")

ERASABLE = ERASABLE_STATUSES
"""The statuses a run can be erased in."""
ERASED = "[erased]"
"""What an erased text reads as."""
_RACES = 20


def _stored(store: Store) -> Store:
    """The store that holds the stored form (an EncryptedStore's inner one): erasure writes
    plain markers, rotation re-seals what is stored."""
    return store.inner if isinstance(store, EncryptedStore) else store


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _scrub(stored: StoredPayloads, entry: HistoryEntry, now: float) -> PayloadRewrite:
    state = json.loads(stored.state_json)
    for step in state.get("steps", {}).values():
        step.pop("result", None)
        if step.get("error") is not None:
            step["error"] = ERASED
    if state.get("error") is not None:
        state["error"] = ERASED
    history: dict[int, str] = {}
    for seq, text in stored.history.items():
        entries = json.loads(text)
        dirty = False
        for item in entries:
            data = item.get("data") or {}
            for key in SEALED_HISTORY_KEYS:
                if data.get(key) not in (None, ERASED):
                    data[key] = ERASED
                    dirty = True
        if dirty:
            history[seq] = _dumps(entries)
    outbox: dict[str, str] = {}
    for mid, body in stored.outbox.items():
        doc = json.loads(body)
        if isinstance(doc, dict) and doc.get("payload") is not None:
            doc["payload"] = None
            outbox[mid] = _dumps(doc)
    return PayloadRewrite(
        run_id=stored.run_id, expected_version=stored.row_version, input_json="null",
        input_hash=ERASED, state_json=_dumps(state),
        error=None if stored.error is None else ERASED, history=history, outbox=outbox,
        append=[entry], erased=True, now=now,
    )


async def erase_run(store: Store, run_id: str, *, actor: str, reason: str,
                    now: float | None = None) -> bool:
    """Erase a finished run's payloads, keeping its timeline; return False if it already
    was (nothing changes then).

    Raises:
        RunNotFound: no such run.
        InvalidTransition: the run is not COMPLETED, COMPENSATED or RESOLVED, or an
            operator request is pending on it (HTTP 409).
        ValueError: no actor or reason.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("erase: a reason is required (it goes into the history)")
    if not isinstance(actor, str) or not actor.strip():
        raise ValueError("erase: the actor (who does it) is required")
    store = _stored(store)
    for _ in range(_RACES):
        stored = await store.load_payloads(run_id)
        if stored is None:
            raise RunNotFound(f"no saga run with id {run_id!r}")
        if stored.erased_at is not None:
            return False
        if stored.status not in ERASABLE or stored.has_request:
            why = ("an operator request is pending on it" if stored.has_request
                   else f"it is {stored.status.value}")
            raise InvalidTransition(
                f"cannot erase run {run_id}: {why}; only finished runs "
                f"({', '.join(s.value for s in ERASABLE)}) can be erased (compensate or "
                f"resolve a FAILED run first)",
                run_id=run_id, status=stored.status.value,
            )
        at = time.time() if now is None else now
        entry = HistoryEntry(at, "run.erased", data={"actor": actor, "reason": reason})
        if await store.rewrite_payloads(_scrub(stored, entry, at)):
            log.info("run %s: payloads erased by %s (%s)", run_id, actor, reason)
            return True
    raise StoreError(f"run {run_id} kept changing while it was being erased; try again")


async def purge_finished(store: Store, *, older_than: float, now: float | None = None,
                         batch: int = 200, actor: str = "retention",
                         reason: str | None = None) -> int:
    """Erase the payloads of every finished run whose last transition is more than
    ``older_than`` seconds old. Returns how many runs were erased."""
    if older_than < 0:
        raise ValueError("older_than must be >= 0 seconds")
    at = time.time() if now is None else now
    cutoff = at - older_than
    store = _stored(store)
    why = reason or f"retention: finished more than {older_than / 86400:g} days ago"
    erased = 0
    after: str | None = None
    while True:
        ids = await store.payload_run_ids(after=after, limit=batch, finished_before=cutoff)
        if not ids:
            return erased
        for run_id in ids:
            try:
                erased += await erase_run(store, run_id, actor=actor, reason=why, now=at)
            except (InvalidTransition, RunNotFound):
                continue  # taken back into work, or gone, since it was listed
        after = ids[-1]


@dataclass(slots=True)
class RotationReport:
    """What :func:`rotate_keys` did."""

    scanned: int = 0
    rewritten: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)
    """Runs it could not re-seal (a key that is not configured, tampered data): id → why."""
    last_id: str | None = None
    """The cursor to resume from (``after=``) if it was interrupted."""


async def rotate_keys(store: Store, codec: PayloadCodec, *, after: str | None = None,
                      batch: int = 200,
                      progress: Callable[[RotationReport], None] | None = None
                      ) -> RotationReport:
    """Seal every stored value again under ``codec.active`` (plaintext ones too, written
    before the codec was on). Old keys must still be configured to open old values."""
    sealer = RunSealer(codec)
    store = _stored(store)
    report = RotationReport(last_id=after)
    while True:
        ids = await store.payload_run_ids(after=report.last_id, limit=batch)
        if not ids:
            return report
        for run_id in ids:
            report.scanned += 1
            for _ in range(_RACES):
                stored = await store.load_payloads(run_id)
                if stored is None:
                    break
                try:
                    rewrite = sealer.reseal(stored)
                except PayloadCodecError as exc:
                    report.unreadable[run_id] = str(exc)
                    break
                if rewrite is None:
                    break
                if await store.rewrite_payloads(rewrite):
                    report.rewritten += 1
                    break
            report.last_id = run_id
        if progress is not None:
            progress(report)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or plain seconds → seconds."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:]) if value else None
    number = value[:-1] if unit else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ValueError(f"{text!r} is not an age: use e.g. 30d, 12h, 90m or 3600") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{text!r} is not an age >= 0")
    return seconds
