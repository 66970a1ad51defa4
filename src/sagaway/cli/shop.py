"""The demo's pretend services: inventory, payments and shipping, idempotent by key.

Each service applies its effect at most once per idempotency key, recorded in a small ledger
table (``demo_ledger``) in the same SQLite file as the saga log, so a step re-invoked after
a crash finds its own earlier effect and returns it instead of charging the card twice.
Latencies are short sleeps so the timeline is watchable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sagaway import NonRetryableError

__all__ = ["Effect", "Ledger", "LedgerEntry", "Shop"]

Say = Callable[[str, str, str], None]
"""How a service reports what it did: ``say(idempotency_key, service, message)``."""

SHIPPING_OUTAGE_ATTEMPTS = 2
"""With ``--fail-at arrange_shipping`` the carrier is down for this many attempts."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One effect a service applied, by the idempotency key that asked for it."""

    key: str
    service: str
    effect: dict[str, Any]
    calls: int
    """How many invocations carried this key (the effect was applied on the first)."""


@dataclass(frozen=True, slots=True)
class Effect:
    """What ``Ledger.apply`` did: the effect, and whether the key had been seen before."""

    value: dict[str, Any]
    calls: int

    @property
    def repeated(self) -> bool:
        return self.calls > 1


class Ledger:
    """The services' dedup record: one row per idempotency key, in a SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    @property
    def _conn(self) -> sqlite3.Connection:
        # Connected on first use, after the saga store has created the file and its folder.
        # Used from the event loop thread only: each write is one short transaction, made
        # before the step's first await, so the effect is durable before any crash point.
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS demo_ledger (key TEXT PRIMARY KEY, service TEXT "
                "NOT NULL, effect TEXT NOT NULL, calls INTEGER NOT NULL, first_at REAL NOT "
                "NULL, last_at REAL NOT NULL)"
            )
            self._db = db
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def apply(self, key: str, service: str, make: Callable[[], dict[str, Any]]) -> Effect:
        """Apply ``make()`` once for ``key``; later calls return the first effect."""
        now = time.time()
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            row = self._conn.execute(
                "SELECT effect, calls FROM demo_ledger WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                value, calls = make(), 1
                self._conn.execute(
                    "INSERT INTO demo_ledger VALUES (?, ?, ?, 1, ?, ?)",
                    (key, service, json.dumps(value), now, now),
                )
            else:
                value, calls = json.loads(row[0]), row[1] + 1
                self._conn.execute(
                    "UPDATE demo_ledger SET calls = ?, last_at = ? WHERE key = ?",
                    (calls, now, key),
                )
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return Effect(value, calls)

    def entries(self, run_id: str) -> list[LedgerEntry]:
        """Every effect applied for one saga run, oldest first."""
        rows = self._conn.execute(
            "SELECT key, service, effect, calls FROM demo_ledger WHERE key LIKE ? "
            "ORDER BY first_at", (f"{run_id}:%",)
        ).fetchall()
        return [LedgerEntry(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]


def _ref(prefix: str, key: str) -> str:
    # Derived from the key, so a repeated request names the same reservation/charge/parcel.
    return f"{prefix}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _short(key: str) -> str:
    run_id, _, rest = key.partition(":")
    return f"{run_id[:8]}…:{rest}"


class Shop:
    """The three services the order saga talks to, with optional fault injection.

    Args:
        ledger: where effects are recorded by idempotency key.
        say: called with (idempotency key, service, message) for each thing a service does.
        fail_at: the step whose service fails: ``reserve_inventory`` (out of stock) and
            ``charge_payment`` (card declined) fail for good; ``arrange_shipping`` fails
            its first two attempts (carrier outage), then succeeds.
    """

    def __init__(self, ledger: Ledger, say: Say, *, fail_at: str | None = None) -> None:
        self.ledger = ledger
        self.say = say
        self.fail_at = fail_at

    def _apply(self, service: str, key: str, what: str,
               make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        effect = self.ledger.apply(key, service, make)
        if effect.repeated:
            self.say(key, service, f"key {_short(key)} seen before (call #{effect.calls}): "
                              f"returning the first result, nothing applied twice")
        else:
            self.say(key, service, f"{what} [key {_short(key)}]")
        return effect.value

    async def reserve(self, key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        if self.fail_at == "reserve_inventory":
            await asyncio.sleep(0.08)
            raise NonRetryableError("out of stock: BOOK-42")
        count = sum(int(i["qty"]) for i in items)
        result = self._apply("inventory", key, f"reserved {count} items",
                             lambda: {"reservation": _ref("res", key), "items": count})
        await asyncio.sleep(0.08)
        return result

    async def release(self, key: str, reservation: str | None) -> None:
        what = f"released reservation {reservation}" if reservation else "nothing to release"
        self._apply("inventory", key, what, lambda: {"released": reservation})
        await asyncio.sleep(0.06)

    async def charge(self, key: str, amount: float) -> dict[str, Any]:
        if self.fail_at == "charge_payment":
            await asyncio.sleep(0.15)
            raise NonRetryableError("card declined")
        result = self._apply("payments", key, f"charged ${amount:.2f}",
                             lambda: {"charge": _ref("ch", key), "amount": amount})
        await asyncio.sleep(0.15)
        return result

    async def ship(self, key: str, attempt: int, address: str) -> dict[str, Any]:
        if self.fail_at == "arrange_shipping" and attempt <= SHIPPING_OUTAGE_ATTEMPTS:
            await asyncio.sleep(0.1)
            self.say(key, "shipping", f"carrier API unavailable (attempt {attempt})")
            raise ConnectionError("carrier API unavailable")
        result = self._apply("shipping", key, f"parcel booked to {address}",
                             lambda: {"tracking": _ref("trk", key).upper()})
        await asyncio.sleep(0.12)
        return result
