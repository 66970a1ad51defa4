"""The e-commerce world of the messaging end-to-end tests (tests/messaging_e2e).

* The saga ``order``: ``reserve`` (service *inventory*, compensation ``release``) →
  ``charge`` (service *payments*, the pivot) → ``ship`` (service *shipping*). An input with
  ``"decline": true`` makes payments say no, so the order compensates.
* Three real :class:`~sagaway.participant.Participant` s, each with its own SQLite file and
  transport. Their handlers write business rows keyed by the command's idempotency key, in
  the transaction the Participant gives them, with **no unique constraint**: an effect
  applied twice shows up as two rows.
* Transport wrappers: :class:`Duplicating` publishes every message twice (and counts what
  its consumers receive); :class:`KillSwitch` SIGKILLs its own process right before, or
  right after, the N-th ``publish_raw`` (what the orchestrator's outbox relay calls).
* :func:`verify` reads the saga log and the three databases and gives the figure: sagas,
  lost, double-applied, stuck, wrong status.

Also imported by ``msg_e2e_worker.py`` (a separate process), so nothing here needs pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sqlite3
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagaway import NonRetryableError, Orchestrator, RetryPolicy, Saga, SagaRun, SagaStatus
from sagaway.messaging import open_transport
from sagaway.messaging.base import Delivery, Handler, Subscription, Transport
from sagaway.messaging.memory import MemoryBroker, MemoryTransport
from sagaway.participant import Command, Participant

SAGA = "order"
SERVICES = ("inventory", "payments", "shipping")
FIGURES: list[str] = []
"""One line per test and transport; conftest prints them in the terminal summary."""


# -- names and transports -----------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    """Destinations of one test: fresh, so tests never see each other's messages."""

    tag: str

    @classmethod
    def fresh(cls) -> Names:
        return cls(uuid.uuid4().hex[:10])

    @property
    def inventory(self) -> str:
        return f"inventory-{self.tag}"

    @property
    def payments(self) -> str:
        return f"payments-{self.tag}"

    @property
    def shipping(self) -> str:
        return f"shipping-{self.tag}"

    @property
    def replies(self) -> str:
        return f"replies-{self.tag}"

    def service(self, name: str) -> str:
        return f"{name}-{self.tag}"

    def all(self) -> list[str]:
        base = [self.inventory, self.payments, self.shipping, self.replies]
        out = []
        for name in base:
            out += [name, f"{name}.dead-letter", f"{name}.dead-letter.dead-letter"]
        return out


def transport_factory(url: str) -> Callable[[], Transport]:
    """Builds transports on one broker (for ``memory://``: one in-process broker shared by
    every transport the factory makes)."""
    if url.startswith("memory://"):
        broker = MemoryBroker()
        return lambda: MemoryTransport(broker)
    return lambda: open_transport(url)


def transport_name(url: str) -> str:
    scheme = url.split("://", 1)[0]
    return {"memory": "memory", "amqp": "rabbitmq", "nats": "nats", "redis": "redis"}[scheme]


class Proxy(Transport):
    """A transport that forwards to another (subclasses change what passes through)."""

    def __init__(self, inner: Transport) -> None:
        super().__init__()
        self.inner = inner
        self.url = inner.url

    async def _connect(self) -> None:
        await self.inner.open()
        # NATS learns its limit from the server on connect.
        self.max_message_bytes = self.inner.max_message_bytes
        self._broker_max_bytes = self.inner._broker_max_bytes

    async def _disconnect(self) -> None:
        await self.inner.aclose()

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        await self.inner._publish(destination, body, message_id=message_id)

    async def _subscribe(self, source: str, handler: Handler, *, prefetch: int,
                         max_deliveries: int, dead_letter: str) -> Subscription:
        return await self.inner.subscribe(source, handler, prefetch=prefetch,
                                          max_deliveries=max_deliveries,
                                          dead_letter=dead_letter)


class Duplicating(Proxy):
    """Every message published is delivered twice: the same bytes, published again.

    The copy gets its own broker message id, or JetStream (which deduplicates on
    ``Nats-Msg-Id``) would store it once. ``received`` counts, per envelope id, the
    deliveries this transport's consumers got, to show the duplicates really arrived.
    """

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner)
        self.published = 0
        self.received: Counter[str] = Counter()

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        await self.inner._publish(destination, body, message_id=message_id)
        await self.inner._publish(destination, body,
                                  message_id=f"{message_id}.copy" if message_id else None)
        self.published += 1

    async def _subscribe(self, source: str, handler: Handler, *, prefetch: int,
                         max_deliveries: int, dead_letter: str) -> Subscription:
        async def counting(delivery: Delivery) -> object:
            self.received[delivery.envelope.id] += 1
            return await handler(delivery)

        return await super()._subscribe(source, counting, prefetch=prefetch,
                                        max_deliveries=max_deliveries, dead_letter=dead_letter)


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillSwitch(Proxy):
    """SIGKILLs this process at the ``nth`` ``publish_raw`` (the outbox relay's publish):
    ``before`` it reaches the broker (the command is committed in the outbox, not sent) or
    ``after`` the broker confirmed it (sent, not yet marked sent)."""

    def __init__(self, inner: Transport, *, when: str, nth: int) -> None:
        super().__init__(inner)
        if when not in ("before", "after"):
            raise ValueError(f"when must be 'before' or 'after', got {when!r}")
        self.when = when
        self.nth = nth
        self.calls = 0

    async def publish_raw(self, destination: str, body: bytes, *,
                          message_id: str | None = None) -> None:
        self.calls += 1
        hit = self.calls == self.nth
        if hit and self.when == "before":
            die()
        await super().publish_raw(destination, body, message_id=message_id)
        if hit and self.when == "after":
            die()


# -- the saga -------------------------------------------------------------------------------


def order_saga(names: Names, *, timeout: float, retry: RetryPolicy,
               compensation_retry: RetryPolicy | None = None) -> Saga:
    saga = Saga(SAGA)
    saga.command_step("reserve", service=names.inventory, command="reserve",
                      compensation="release", timeout=timeout, retry=retry,
                      compensation_retry=compensation_retry or retry)
    saga.command_step("charge", service=names.payments, command="charge", pivot=True,
                      timeout=timeout, retry=retry)
    saga.command_step("ship", service=names.shipping, command="ship", timeout=timeout,
                      retry=retry)
    return saga


def order_input(i: int, *, decline_every: int = 5, **extra: Any) -> dict[str, Any]:
    return {"order": i, "sku": f"SKU-{i % 7}", "amount": 10 + i,
            "decline": decline_every > 0 and i % decline_every == 0, **extra}


def expected_status(data: dict[str, Any]) -> SagaStatus:
    return SagaStatus.COMPENSATED if data.get("decline") else SagaStatus.COMPLETED


# -- the participants -----------------------------------------------------------------------

SCHEMAS = {
    "inventory": [
        "CREATE TABLE IF NOT EXISTS reservations (key TEXT NOT NULL, order_no INTEGER, "
        "sku TEXT, released INTEGER NOT NULL DEFAULT 0, at REAL)",
        "CREATE TABLE IF NOT EXISTS releases (key TEXT NOT NULL, order_no INTEGER, "
        "undone INTEGER NOT NULL, at REAL)",
    ],
    "payments": ["CREATE TABLE IF NOT EXISTS charges (key TEXT NOT NULL, order_no INTEGER, "
                 "amount INTEGER, at REAL)"],
    "shipping": ["CREATE TABLE IF NOT EXISTS shipments (key TEXT NOT NULL, order_no INTEGER, "
                 "at REAL)"],
}


def db_path(directory: Path, service: str) -> Path:
    return directory / f"{service}.db"


def create_schemas(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for service, statements in SCHEMAS.items():
        with closing(sqlite3.connect(db_path(directory, service))) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            for sql in statements:
                conn.execute(sql)
            conn.commit()


class Behaviour:
    """Knobs the tests turn on the participants (in the process that hosts them)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        """Handler runs per idempotency key (a key the inbox answers is not counted)."""
        self.reserve_delay: Callable[[Command], float] = lambda cmd: 0.0
        """Seconds ``reserve`` sleeps, inside its transaction, before it writes."""
        self.reserve_fails: Callable[[Command], bool] = lambda cmd: False
        """``reserve`` raises a transient error (after its sleep) when this says so."""
        self.work = 0.0
        """Seconds every handler spends (in its transaction) on each command it applies."""


def _action_key(compensation_key: str) -> str:
    return compensation_key.rsplit(":", 1)[0] + ":action"


def build_participants(
    names: Names,
    directory: Path,
    make_transport: Callable[[], Transport],
    *,
    behaviour: Behaviour | None = None,
    max_deliveries: int = 5,
    prefetch: int = 10,
) -> list[Participant]:
    """inventory, payments and shipping, each on its own transport and SQLite file."""
    b = behaviour or Behaviour()
    create_schemas(directory)

    def participant(service: str) -> Participant:
        return Participant(names.service(service), make_transport(),
                           db=f"sqlite:///{db_path(directory, service)}?synchronous=NORMAL",
                           prefetch=prefetch, max_deliveries=max_deliveries,
                           relay_interval=0.2, grace=5.0)

    inventory, payments, shipping = (participant(s) for s in SERVICES)

    @inventory.handler("reserve")
    async def reserve(cmd: Command) -> dict[str, Any]:
        b.calls[cmd.idempotency_key] += 1
        data = cmd.payload
        if data.get("poison"):
            raise RuntimeError(f"poison order {data.get('order')}: this handler always fails")
        delay = b.reserve_delay(cmd) + b.work
        if delay:
            await asyncio.sleep(delay)
        if b.reserve_fails(cmd):
            raise RuntimeError(f"transient failure of delivery {cmd.attempt}")
        await cmd.db.execute(
            "INSERT INTO reservations (key, order_no, sku, released, at) VALUES (?, ?, ?, 0, ?)",
            (cmd.idempotency_key, data.get("order"), data.get("sku"), time.time()))
        return {"reservation": cmd.idempotency_key}

    @inventory.handler("release")
    def release(cmd: Command) -> dict[str, Any]:
        b.calls[cmd.idempotency_key] += 1
        time.sleep(b.work)
        undone = cmd.db.execute(
            "UPDATE reservations SET released = released + 1 WHERE key = ?",
            (_action_key(cmd.idempotency_key),)).rowcount
        cmd.db.execute("INSERT INTO releases (key, order_no, undone, at) VALUES (?, ?, ?, ?)",
                       (cmd.idempotency_key, cmd.payload.get("order"), undone, time.time()))
        return {"released": undone}

    @payments.handler("charge")
    def charge(cmd: Command) -> dict[str, Any]:
        b.calls[cmd.idempotency_key] += 1
        time.sleep(b.work)
        data = cmd.payload
        if data.get("decline"):
            raise NonRetryableError(f"card declined for order {data.get('order')}")
        cmd.db.execute("INSERT INTO charges (key, order_no, amount, at) VALUES (?, ?, ?, ?)",
                       (cmd.idempotency_key, data.get("order"), data.get("amount"), time.time()))
        return {"charged": data.get("amount")}

    @shipping.handler("ship")
    def ship(cmd: Command) -> dict[str, Any]:
        b.calls[cmd.idempotency_key] += 1
        time.sleep(b.work)
        cmd.db.execute("INSERT INTO shipments (key, order_no, at) VALUES (?, ?, ?)",
                       (cmd.idempotency_key, cmd.payload.get("order"), time.time()))
        return {"shipped": cmd.payload.get("order")}

    return [inventory, payments, shipping]


@contextlib.asynccontextmanager
async def running(participants: Iterable[Participant]) -> Any:
    opened: list[Participant] = []
    try:
        for p in participants:
            await asyncio.wait_for(p.open(), 30)
            opened.append(p)
        yield opened
    finally:
        await asyncio.gather(*(asyncio.wait_for(p.aclose(), 30) for p in opened),
                             return_exceptions=True)


# -- starting and waiting ---------------------------------------------------------------------


async def start_orders(orch: Orchestrator, inputs: dict[str, dict[str, Any]],
                       *, pace: float = 0.0) -> dict[str, str]:
    """Start one run per client key; return run id by key (a retried start is idempotent)."""
    ids: dict[str, str] = {}
    for key, data in inputs.items():
        handle = await orch.start(SAGA, data, key=key)
        ids[key] = handle.id
        if pace:
            await asyncio.sleep(pace)
    return ids


async def wait_all(orch: Orchestrator, run_ids: Iterable[str], timeout: float) -> list[str]:
    """Wait for every run, all within ``timeout`` seconds; return the ids still unfinished."""
    ids = list(run_ids)

    async def one(run_id: str) -> str | None:
        with contextlib.suppress(Exception):
            await orch.wait(run_id, timeout=timeout)
            return None
        return run_id

    results = await asyncio.gather(*(one(i) for i in ids))
    return [r for r in results if r is not None]


async def drain_outbox(orch: Orchestrator, timeout: float) -> tuple[int, float | None]:
    deadline = time.monotonic() + timeout
    while True:
        backlog = await orch.store.outbox_backlog()
        if backlog == (0, None) or time.monotonic() > deadline:
            return backlog
        await asyncio.sleep(0.1)


async def dead_letters(make_transport: Callable[[], Transport], destination: str, *,
                       expect: int = 0, timeout: float = 1.0) -> list[Delivery]:
    """What sits on a dead-letter destination: consumed for ``timeout`` seconds, or until
    ``expect`` messages arrived."""
    got: list[Delivery] = []
    enough = asyncio.Event()

    async def collect(delivery: Delivery) -> None:
        got.append(delivery)
        if expect and len(got) >= expect:
            enough.set()

    transport = make_transport()
    async with transport:
        await transport.subscribe(destination, collect, prefetch=100)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), timeout)
    return got


async def read_runs(store_url: str) -> list[SagaRun]:
    """Every run in the log, with history (an orchestrator with no sagas claims nothing)."""
    async with Orchestrator(store_url, poll_interval=60.0) as orch:
        return [await orch.get(r.id) for r in await orch.list(limit=100_000)]


# -- checking -------------------------------------------------------------------------------


@dataclass
class Figure:
    """The verdict on one scenario with one transport."""

    title: str
    sagas: int = 0
    lost: int = 0
    double_applied: int = 0
    stuck: int = 0
    wrong_status: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.double_applied or self.stuck or self.wrong_status
                    or self.problems)

    def render(self) -> str:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        notes = f"; {'; '.join(self.notes)}" if self.notes else ""
        return (f"{self.title}: sagas {self.sagas} | lost {self.lost} | double-applied "
                f"{self.double_applied} | stuck {self.stuck} | wrong status "
                f"{self.wrong_status} ({statuses}; {self.seconds:.1f}s{notes})")

    def report(self) -> str:
        text = self.render()
        FIGURES.append(text)
        if self.problems:
            text += "\n" + "\n".join(self.problems[:40])
        return text


def _rows(directory: Path, service: str, sql: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(db_path(directory, service), timeout=30)) as conn:
        return list(conn.execute(sql))


def verify(figure: Figure, runs: list[SagaRun], inputs: dict[str, dict[str, Any]],
           acked: dict[str, str], directory: Path,
           expect: Callable[[dict[str, Any]], set[SagaStatus]] | None = None) -> Figure:
    """Check the log against the business rows.

    * lost: a client key with no run (or another run than the client was told), or an
      effect a finished run needs that is not in the service's database;
    * double-applied: a key with more than one business row, a reservation released twice;
    * stuck: a run not finished;
    * wrong status: not what the input asks for (COMPLETED, or COMPENSATED when declined),
      or an effect that should not be there (a charge of a declined order, a reservation a
      compensated order kept).
    """
    expect = expect or (lambda data: {expected_status(data)})
    reservations = _rows(directory, "inventory", "SELECT key, released FROM reservations")
    releases = _rows(directory, "inventory", "SELECT key, undone FROM releases")
    charges = _rows(directory, "payments", "SELECT key FROM charges")
    shipments = _rows(directory, "shipping", "SELECT key FROM shipments")
    rows: Counter[str] = Counter(r[0] for r in reservations + releases + charges + shipments)
    released = {r[0]: r[1] for r in reservations}
    doubled = sorted(k for k, n in rows.items() if n > 1)
    doubled += sorted(k for k, n in released.items() if n > 1 and k not in doubled)
    figure.double_applied += len(doubled)
    for key in doubled:
        figure.problems.append(f"double-applied: {key} ({rows[key]} rows, released "
                               f"{released.get(key)})")

    by_key: dict[str, list[SagaRun]] = {}
    for run in runs:
        by_key.setdefault(run.idempotency_key or "", []).append(run)
    figure.sagas += len(inputs)
    for key, data in inputs.items():
        found = by_key.get(key, [])
        if len(found) != 1 or (key in acked and acked[key] != found[0].id):
            figure.lost += 1
            figure.problems.append(f"lost: client key {key} maps to {len(found)} runs "
                                   f"(client was told {acked.get(key)})")
            continue
        run = found[0]
        figure.statuses[run.status.value] += 1
        if not run.finished:
            figure.stuck += 1
            steps = {n: s.get("status") for n, s in (run.steps or {}).items()}
            figure.problems.append(f"stuck: {key} {run.id} {run.status.value} steps {steps}")
            continue
        allowed = expect(data)
        if run.status not in allowed:
            figure.wrong_status += 1
            figure.problems.append(f"wrong status: {key} {run.id} {run.status.value}, "
                                   f"expected {sorted(s.value for s in allowed)}: {run.error}")
            continue
        if run.status is SagaStatus.FAILED:
            continue  # left for an operator: the caller decides what it expects of those
        k = f"{run.id}:{{}}:{{}}"
        have = {name: rows[k.format(*name.split("/"))] for name in
                ("reserve/action", "reserve/compensation", "charge/action", "ship/action")}
        is_released = released.get(k.format("reserve", "action"), 0) >= 1
        if run.status is SagaStatus.COMPLETED:
            want = {"reserve/action": 1, "reserve/compensation": 0, "charge/action": 1,
                    "ship/action": 1}
            kept = not is_released
        else:
            # Compensated: the reservation (if it was applied) undone, no charge, no parcel.
            want = {"reserve/compensation": 1, "charge/action": 0, "ship/action": 0}
            kept = have["reserve/action"] == 0 or is_released
        missing = [n for n, v in want.items() if have.get(n, 0) < v]
        extra = [n for n, v in want.items() if have.get(n, 0) > v and v == 0]
        if missing:
            figure.lost += 1
            figure.problems.append(f"lost effect: {key} {run.id} {run.status.value} is "
                                   f"missing {missing} (rows {have})")
        if extra or not kept:
            figure.wrong_status += 1
            figure.problems.append(f"effect left standing: {key} {run.id} "
                                   f"{run.status.value} has {extra or have} (released "
                                   f"{is_released})")
    return figure


def declines_may_fail(data: dict[str, Any]) -> set[SagaStatus]:
    """What verify() accepts for an order: a declined one must end COMPENSATED.

    (A decline whose first reply missed its deadline once ended FAILED — "pivot gave up with
    an unknown outcome" — until the decider learned that a participant's definite "no"
    proves no attempt took effect; this keeps that fixed.)
    """
    if data.get("decline"):
        return {SagaStatus.COMPENSATED}
    return {SagaStatus.COMPLETED}


def count_known_bug(figure: Figure, runs: list[SagaRun]) -> None:
    """Every FAILED run is a problem."""
    for run in runs:
        if run.status is SagaStatus.FAILED:
            figure.wrong_status += 1
            figure.problems.append(f"FAILED: {run.id}: {run.error}")


def bounded(seconds: float) -> Callable[[Callable[..., Awaitable[None]]],
                                       Callable[..., Awaitable[None]]]:
    """A test that has not finished after ``seconds`` fails (TimeoutError), never hangs.

    Cancellation unwinds the test's ``finally`` blocks, so a stopped broker is started again.
    """

    def decorate(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        @functools.wraps(test)
        async def run(*args: Any, **kwargs: Any) -> None:
            async with asyncio.timeout(seconds):
                await test(*args, **kwargs)

        return run

    return decorate


async def with_timeout(aw: Awaitable[Any], seconds: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(aw, seconds)
    except TimeoutError:
        raise AssertionError(f"timed out after {seconds}s: {what}") from None
