"""The runtime: the Orchestrator that drives saga runs against a store.

Each run this worker holds is driven by one task (an actor): it feeds one event at a time to
the pure decider, commits the decision (through the group committer) and only then carries
out the commands: invoke an action, invoke a compensation, arm a timer. Invocations run as
their own tasks and report back as events, so a run waiting on a slow step holds no thread.

Leases: every run a worker drives is leased to it in the store. One background task renews
all of this worker's leases in one statement; another polls for runs that are unowned or
whose lease expired (a worker died) and adopts them. A run started here is adopted at once,
with no polling on the hot path.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import inspect
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagaway.definition.http import HttpCall
from sagaway.definition.saga import Command as CommandSpec
from sagaway.definition.saga import Saga, StepContext, idempotency_key
from sagaway.engine.clock import Clock, SystemClock
from sagaway.engine.committer import GroupCommitter
from sagaway.engine.decider import OPERATOR_ALLOWED, decide
from sagaway.engine.listener import Invocation, Listener, Transition
from sagaway.engine.payload import DEFAULT_MAX_PAYLOAD_BYTES, encode, fingerprint
from sagaway.engine.relay import OutboxRelay, command_message, domain_event, parse_reply
from sagaway.engine.state import (
    ActionFailed,
    ActionSucceeded,
    Command,
    CompensationFailed,
    CompensationSucceeded,
    Event,
    InvokeAction,
    InvokeCompensation,
    Operator,
    Recover,
    RunState,
    Start,
    StepStatus,
    TimerFired,
)
from sagaway.errors import (
    DefinitionError,
    IdempotencyConflict,
    InvalidPayload,
    InvalidTransition,
    LeaseLost,
    OrchestratorClosed,
    RunNotFound,
    SagawayError,
    StoreError,
    TransportError,
    UnknownSaga,
    WaitTimeout,
)
from sagaway.invokers import InvocationFailed
from sagaway.messaging.base import Delivery, Subscription, Transport
from sagaway.run import ACTIVE_STATUSES, HistoryEntry, SagaRun, SagaStatus
from sagaway.store import open_store
from sagaway.store.base import NewRun, OutboxMessage, RunRecord, RunUpdate, Store

if TYPE_CHECKING:
    from sagaway.invokers.http import HttpInvoker

__all__ = ["NonRetryableError", "Orchestrator", "RunHandle"]

log = logging.getLogger("sagaway.engine")


class NonRetryableError(Exception):
    """Raise from a step to fail it at once, without further attempts (a business "no")."""


def new_run_id() -> str:
    """A UUIDv7: time-ordered, so ids sort roughly by start time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64
    value |= (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(eq=False)
class _Driver:
    """A run held by this worker: its state in memory and the task that drives it."""

    run_id: str
    saga: Saga
    state: RunState
    row_version: int
    input: Any
    idempotency_key: str | None
    created_at: float
    updated_at: float
    history: builtins.list[HistoryEntry] | None
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    timer: asyncio.Task[None] | None = None
    timer_at: float | None = None
    invocations: set[asyncio.Task[None]] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    committed: bool = False
    """Its first write (creation or claim) is durable: the lease is really ours."""
    claim_seq: int = 0
    """When it became ours, on this worker's claim counter (see _renew_loop)."""
    transitions: int = 0
    releasing: bool = False
    """Its final transition, which also drops the lease, is being committed."""
    clear_request: bool = False
    """It was claimed to carry out an operator request; the next write clears it."""


class RunHandle:
    """What ``Orchestrator.start`` returns: the run's id and a way to wait for its end."""

    def __init__(self, orchestrator: Orchestrator, run_id: str, saga: str, *,
                 created: bool) -> None:
        self._orch = orchestrator
        self.id = run_id
        self.saga = saga
        self.created = created
        """False when ``start(key=…)`` found an existing run with that key."""

    def __repr__(self) -> str:
        return f"<RunHandle {self.saga} {self.id}>"

    async def wait(self, timeout: float | None = None) -> SagaRun:
        """Wait until the run finishes; return its final snapshot.

        Raises:
            WaitTimeout: the run had not finished after ``timeout`` seconds.
        """
        return await self._orch.wait(self.id, timeout=timeout)

    async def get(self) -> SagaRun:
        """The run's current snapshot."""
        return await self._orch.get(self.id)


class Orchestrator:
    """Runs sagas durably against a store.

    Use as ``async with Orchestrator("sqlite:///sagas.db", sagas=[order]) as orch:``.

    Args:
        store: a store URL (``sqlite:///sagas.db``, ``memory://``) or a Store object.
        sagas: the definitions this worker can run; several versions of one name may be
            registered (``start`` uses the newest; older runs keep their version).
        lease_seconds: how long a run stays leased to this worker without renewal; after a
            crash, other workers (or this one restarted) resume the run once it expires.
        poll_interval: how often to look for runs whose lease expired or that are unowned.
        max_payload_bytes: the limit for an input or a step result, encoded as JSON.
        worker_id: this worker's lease owner name (default: host:pid:random).
        listeners: observers of committed transitions (metrics, tracing, logs).
        max_threads: threads for synchronous (plain ``def``) steps.
        max_runs: the most runs this worker drives at once; recovery claims no more.
        clock: the time source (the testing kit passes a virtual one).
        worker: False makes this a client: ``start`` only records the run (PENDING,
            unowned) and the worker processes sharing the store drive it; nothing is
            claimed or recovered here. For API services that start sagas.
        transport: the message broker for command steps (``amqp://…``, ``nats://…``,
            ``redis://…``, ``memory://``, or a Transport): commands go out through the
            store's outbox, replies come back on ``reply_to``, which all workers share.
        services: base URLs of the services HTTP steps name (``{"inventory":
            "http://10.0.0.5:8001"}``); a service missing here is read from the
            ``SAGAWAY_SERVICE_<NAME>`` environment variable; ``open()`` raises
            DefinitionError for one found in neither.
        http_connections: the most HTTP connections open at once to one service (each
            service has its own pool, shared by every HTTP step of this worker); more
            requests than this wait for a free connection within their timeout. httpx's
            pool checks every idle connection on every request, so a large pool costs
            CPU (see the README's figures); raise it for slow services.
        run_ids: makes the id of each run started here (default: a UUIDv7); the testing
            kit passes a deterministic one, so a schedule replays identically.
    """

    def __init__(
        self,
        store: str | Store = "sqlite:///sagas.db",
        *,
        sagas: Iterable[Saga] = (),
        lease_seconds: float = 30.0,
        poll_interval: float = 1.0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        worker_id: str | None = None,
        listeners: Iterable[Listener] = (),
        max_threads: int = 32,
        max_runs: int = 100_000,
        clock: Clock | None = None,
        worker: bool = True,
        transport: str | Transport | None = None,
        reply_to: str = "sagaway.replies",
        services: Mapping[str, str] | None = None,
        http_connections: int = 16,
        run_ids: Callable[[], str] | None = None,
    ) -> None:
        if lease_seconds <= 0 or poll_interval <= 0:
            raise ValueError("lease_seconds and poll_interval must be > 0")
        self._definitions: dict[tuple[str, int], Saga] = {}
        self._latest: dict[str, Saga] = {}
        for saga in sagas:
            self.register(saga)
        self.store: Store = open_store(store) if isinstance(store, str) else store
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.max_payload_bytes = max_payload_bytes
        self.worker_id = worker_id or default_worker_id()
        self.listeners = list(listeners)
        self.max_runs = max_runs
        self.clock: Clock = clock or SystemClock()
        self.worker = worker
        if isinstance(transport, str):
            from sagaway.messaging import open_transport

            transport = open_transport(transport)
        self.transport: Transport | None = transport
        self.reply_to = reply_to
        self._new_run_id = run_ids or new_run_id
        self._relay: OutboxRelay | None = None
        self._replies: Subscription | None = None
        self.services = dict(services or {})
        self._http_connections = http_connections
        self._http: HttpInvoker | None = None
        if worker and transport is None:
            remote = [f"{s.name}.{st.name}" for s in self.sagas for st in s.steps
                      if st.remote or st.remote_compensation]
            remote += [f"{s.name} (events)" for s in self.sagas if s.events]
            if remote:
                raise DefinitionError(
                    f"{', '.join(remote)} send messages: pass transport=… (amqp://, "
                    f"nats://, redis:// or memory://) to the Orchestrator"
                )
        self._max_threads = max_threads
        self._threads: ThreadPoolExecutor | None = None
        self._drivers: dict[str, _Driver] = {}
        self._committer: GroupCommitter | None = None
        self._background: list[asyncio.Task[None]] = []
        self._poll_now = asyncio.Event()
        self._open = False
        self._claim_seq = 0
        self._warned_unknown: set[str] = set()

    # -- registration -------------------------------------------------------------------

    def register(self, saga: Saga) -> None:
        """Register a definition (validated now). Raises DefinitionError."""
        if not isinstance(saga, Saga):
            raise DefinitionError(f"sagas must be Saga definitions, got {saga!r}")
        saga.validate()
        key = (saga.name, saga.version)
        if key in self._definitions and self._definitions[key] is not saga:
            raise DefinitionError(
                f"saga {saga.name!r} version {saga.version} is registered twice; bump the "
                f"version of the newer definition"
            )
        # (register also runs inside __init__, before _open exists; open() checks those.)
        if getattr(self, "_open", False) and self.worker:
            self._open_http([saga])
        self._definitions[key] = saga
        latest = self._latest.get(saga.name)
        if latest is None or saga.version > latest.version:
            self._latest[saga.name] = saga

    @property
    def sagas(self) -> list[Saga]:
        return list(self._definitions.values())

    def definition(self, name: str, version: int | None = None) -> Saga:
        """The registered definition (newest version unless one is named)."""
        saga = self._latest.get(name) if version is None else self._definitions.get((name,
                                                                                     version))
        if saga is None:
            known = ", ".join(sorted(self._latest)) or "none"
            which = name if version is None else f"{name} v{version}"
            raise UnknownSaga(
                f"no saga named {which!r} is registered with this orchestrator "
                f"(registered: {known}); pass it in Orchestrator(..., sagas=[...])"
            )
        return saga

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Orchestrator:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open the store, then start recovering runs whose lease expired."""
        if self._open:
            return
        if self.worker:
            self._open_http(self.sagas)
        await self.store.open()
        self._threads = ThreadPoolExecutor(self._max_threads, thread_name_prefix="sagaway-step")
        self._committer = GroupCommitter(
            self.store, owner=self.worker_id, lease_seconds=self.lease_seconds,
            lanes=self.store.commit_lanes,
        )
        self._committer.start()
        self._open = True
        if self.transport is not None and self.worker:
            await self.transport.open()
            self._relay = OutboxRelay(self.store, self.transport, owner=self.worker_id,
                                      lease_seconds=self.lease_seconds,
                                      poll_interval=self.poll_interval)
            self._relay.start()
            self._replies = await self.transport.subscribe(self.reply_to, self._on_reply)
        if self.worker:
            self._background = [
                asyncio.create_task(self._poll_loop(), name="sagaway-recovery"),
                asyncio.create_task(self._renew_loop(), name="sagaway-leases"),
            ]

    async def aclose(self) -> None:
        """Stop driving runs and release their leases so another worker resumes them at once.

        Attempts in flight are cut; they count as attempts and are re-invoked, with the same
        idempotency key, by whichever worker resumes the run.
        """
        if not self._open:
            return
        self._open = False
        if self._replies is not None:
            with contextlib.suppress(Exception):
                await self._replies.stop(grace=1.0)
            self._replies = None
        for task in self._background:
            task.cancel()
        drivers = list(self._drivers.values())
        for d in drivers:
            self._stop_driver(d)
        await asyncio.gather(*self._background, *(d.task for d in drivers if d.task),
                             return_exceptions=True)
        self._background = []
        if self._committer is not None:
            await self._committer.aclose()
            self._committer = None
        try:
            await self.store.release_leases(owner=self.worker_id)
        except StoreError as exc:
            log.warning("could not release leases on close (they expire in %.0fs): %s",
                        self.lease_seconds, exc)
        self._drivers.clear()
        if self._relay is not None:
            await self._relay.aclose()
            self._relay = None
        if self.transport is not None and self.worker:
            with contextlib.suppress(Exception):
                await self.transport.aclose()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        await self.store.aclose()

    def _open_http(self, sagas: Iterable[Saga]) -> None:
        """Resolve the base URLs HTTP steps need (DefinitionError if one is missing) and
        open the HTTP invoker (its connection pools) on first need."""
        if not any(s.http or isinstance(s.compensation_fn, HttpCall)
                   for saga in sagas for s in saga.steps):
            return
        from sagaway.invokers.http import HttpInvoker, resolve_services

        services = resolve_services(sagas, self.services)
        if self._http is None:
            self._http = HttpInvoker(services, max_connections=self._http_connections)
        else:
            self._http.add_services(services)

    def _require_open(self) -> GroupCommitter:
        if not self._open or self._committer is None:
            raise OrchestratorClosed(
                "the orchestrator is not open: use `async with Orchestrator(...) as orch:` "
                "or `await orch.open()`"
            )
        return self._committer

    # -- public API -------------------------------------------------------------------------

    async def start(self, saga: str, input: Any = None, *, key: str | None = None) -> RunHandle:
        """Start a run of the newest registered version of ``saga``.

        With ``key``, starting twice returns the same run; the same key with a different
        input raises IdempotencyConflict. Nothing is written when this raises.

        Raises:
            UnknownSaga, InvalidPayload, PayloadTooLarge, IdempotencyConflict.
        """
        committer = self._require_open()
        definition = self.definition(saga)
        if key is not None and (not isinstance(key, str) or not key or len(key) > 512):
            raise InvalidPayload("key must be a non-empty string of at most 512 characters")
        plain, text = encode(input, what=f"the input of saga {saga!r}",
                             limit=self.max_payload_bytes)
        run_id = self._new_run_id()
        now = self.clock.now()
        if not self.worker:
            return await self._submit(committer, definition, run_id, now, plain, text, key)
        decision = decide(definition, run_id, RunState(), Start(now))
        park = self._parks(definition, decision.state, decision.commands, busy=False)
        new = NewRun(
            id=run_id,
            saga=definition.name,
            version=definition.version,
            status=decision.state.status,
            input_json=text,
            input_hash=fingerprint(text),
            state=decision.state.to_json(),
            idempotency_key=key,
            wake_at=decision.state.wake_at,
            now=now,
            history=decision.history,
            leased=not park,
            outbox=self._outbox_for(run_id, definition, plain, decision.commands),
        )
        # Registered before the write, so a lease renewal racing the creation never takes
        # this run for an orphan.
        driver = _Driver(run_id, definition, decision.state, 1, plain, key, now, now,
                         list(decision.history))
        self._drivers[run_id] = driver
        try:
            created = await committer.create(new)
        except BaseException:
            self._drivers.pop(run_id, None)
            raise
        if not created.created:
            self._drivers.pop(run_id, None)
            existing = created.record
            self._check_same_input(existing, new.input_hash, saga, key)
            return RunHandle(self, existing.id, existing.saga, created=False)
        self._claim_seq += 1
        driver.claim_seq = self._claim_seq
        driver.committed = True
        driver.transitions = 1
        self._notify(driver, decision.history)
        if new.outbox and self._relay is not None:
            self._relay.poke()
        if park:
            self._park(driver)
            return RunHandle(self, run_id, definition.name, created=True)
        driver.task = asyncio.create_task(self._drive(driver, decision.commands),
                                          name=f"sagaway-run-{run_id}")
        return RunHandle(self, run_id, definition.name, created=True)

    async def _submit(self, committer: GroupCommitter, definition: Saga, run_id: str,
                      now: float, plain: Any, text: str, key: str | None) -> RunHandle:
        """Client mode: record the run PENDING and unowned; a worker claims and starts it."""
        created = await committer.create(
            NewRun(
                id=run_id,
                saga=definition.name,
                version=definition.version,
                status=SagaStatus.PENDING,
                input_json=text,
                input_hash=fingerprint(text),
                state=RunState().to_json(),
                idempotency_key=key,
                wake_at=None,
                now=now,
                history=[HistoryEntry(now, "run.submitted")],
                leased=False,
            )
        )
        if not created.created:
            self._check_same_input(created.record, fingerprint(text), definition.name, key)
        return RunHandle(self, created.record.id, definition.name, created=created.created)

    @staticmethod
    def _check_same_input(existing: RunRecord, input_hash: str, saga: str, key: str | None
                          ) -> None:
        if existing.input_hash != input_hash:
            raise IdempotencyConflict(
                f"key {key!r} already started run {existing.id} of saga {saga!r} with a "
                f"different input; use a new key for a new run",
                run_id=existing.id,
                key=key or "",
            )

    # -- operator actions ---------------------------------------------------------------

    async def retry(self, run_id: str, *, reason: str, actor: str = "operator") -> SagaRun:
        """Retry a FAILED run: its failed compensations (or the forward step that gave up
        after the pivot) get a fresh retry budget. Raises InvalidTransition otherwise."""
        return await self._request(run_id, "retry", reason, actor)

    async def compensate(self, run_id: str, *, reason: str, actor: str = "operator"
                         ) -> SagaRun:
        """Force-compensate a PENDING, RUNNING or FAILED run: actions in flight are cut
        (possibly applied) and every step that may have taken effect is undone."""
        return await self._request(run_id, "compensate", reason, actor)

    async def resume(self, run_id: str, *, reason: str, actor: str = "operator") -> SagaRun:
        """Resume an active run now: take it from its worker, fire its timers at once."""
        return await self._request(run_id, "resume", reason, actor)

    async def resolve(self, run_id: str, *, reason: str, actor: str = "operator") -> SagaRun:
        """Mark a FAILED run RESOLVED: an operator settled it by hand."""
        return await self._request(run_id, "resolve", reason, actor)

    async def _request(self, run_id: str, action: str, reason: str, actor: str) -> SagaRun:
        """Record an operator action on the run; a worker with its definition carries it out.

        Recording fences the run's current worker (its next write is rejected) and frees
        the lease, so the action never races the run's own progress. A worker orchestrator
        claims the run at once; otherwise the workers' next poll does.
        """
        self._require_open()
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidPayload(f"{action}: a reason is required (it goes into the history)")
        if not isinstance(actor, str) or not actor.strip():
            raise InvalidPayload(f"{action}: the actor (who does it) is required")
        record = await self.store.get_run(run_id, history=False)
        if record is None:
            raise RunNotFound(f"no saga run with id {run_id!r}")
        allowed = OPERATOR_ALLOWED[action]
        now = self.clock.now()
        request = {"action": action, "reason": reason, "actor": actor, "at": now}
        updated = await self.store.request_operation(
            run_id,
            allowed=allowed,
            request=request,
            new_status=None,
            history=[HistoryEntry(now, "operator.requested",
                                  data={"action": action, "actor": actor, "reason": reason})],
            now=now,
        )
        if updated is None:
            current = await self.store.get_run(run_id, history=False)
            status = current.status.value if current else record.status.value
            pending = current.request if current else None
            why = (f"an operator request ({pending.get('action')}) is already pending"
                   if pending else f"the run is {status}")
            raise InvalidTransition(
                f"cannot {action} run {run_id}: {why}; {action} applies to "
                f"{', '.join(s.value for s in allowed)} runs",
                run_id=run_id, status=status,
            )
        driver = self._drivers.get(run_id)
        if driver is not None:
            self._stop_driver(driver)  # fenced already; stop its in-flight work now
            self._abandon(driver)
        if self.worker:
            self._poll_now.set()
        return self._snapshot(updated)

    async def get(self, run_id: str) -> SagaRun:
        """A snapshot of one run, from the store. Raises RunNotFound."""
        record = await self.store.get_run(run_id, history=True)
        if record is None:
            raise RunNotFound(f"no saga run with id {run_id!r}")
        return self._snapshot(record)

    async def list(
        self,
        *,
        status: SagaStatus | Iterable[SagaStatus] | None = None,
        saga: str | None = None,
        limit: int = 100,
        before: tuple[float, str] | None = None,
        created_from: float | None = None,
        created_to: float | None = None,
        stuck_for: float | None = None,
    ) -> builtins.list[SagaRun]:
        """Runs newest first, without their history (use ``get`` for a timeline).

        Args:
            status: one status or several.
            saga: only runs of this definition name.
            limit: the page size.
            before: a cursor, ``(created_at, id)`` of the last run of the previous page.
            created_from / created_to: started at or after / before these times.
            stuck_for: only active runs whose last transition is older than this many
                seconds (status defaults to the active ones).
        """
        statuses = [status] if isinstance(status, SagaStatus) else (
            None if status is None else builtins.list(status))
        updated_before = None
        if stuck_for is not None:
            updated_before = self.clock.now() - stuck_for
            if statuses is None:
                statuses = builtins.list(ACTIVE_STATUSES)
        records = await self.store.list_runs(
            status=statuses, saga=saga, limit=limit, before=before,
            created_from=created_from, created_to=created_to, updated_before=updated_before,
        )
        return [self._snapshot(r) for r in records]

    async def counts(self, *, saga: str | None = None) -> dict[SagaStatus, int]:
        """How many runs are in each status (all statuses present, zeros included)."""
        found = await self.store.count_runs(saga=saga)
        return {s: found.get(s, 0) for s in SagaStatus}

    async def wait(self, run_id: str, *, timeout: float | None = None) -> SagaRun:
        """Wait until a run finishes (driven here or by any other worker).

        A run driven here is awaited in memory; any other is polled in the store, and a
        store that is briefly unreachable (a database restart) is waited out, not raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(deadline - time.monotonic(), 0.0)

        driver = self._drivers.get(run_id)
        if driver is not None:
            try:
                async with asyncio.timeout(remaining()):
                    await driver.done.wait()
            except TimeoutError:
                raise WaitTimeout(f"run {run_id} did not finish within {timeout}s") from None
            if driver.state.status.finished and driver.history is not None:
                return self._snapshot_from_driver(driver)
            # Handed over (lease lost, store error) or recovered here: ask the store.
        while True:
            try:
                snap = await self.get(run_id)
            except StoreError as exc:
                log.debug("wait(%s): store unavailable, retrying: %s", run_id, exc)
            else:
                if snap.finished:
                    return snap
            left = remaining()
            if left is not None and left <= 0:
                raise WaitTimeout(f"run {run_id} did not finish within {timeout}s")
            driver = self._drivers.get(run_id)
            pause = 0.1 if left is None else min(0.1, left)
            if driver is not None:
                # Driven here now (adopted by recovery): its end wakes us sooner.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(pause, self.poll_interval)
                                               if left is None else left):
                        await driver.done.wait()
            else:
                await asyncio.sleep(pause)

    # -- snapshots --------------------------------------------------------------------------

    def _snapshot(self, record: RunRecord) -> SagaRun:
        state = RunState.from_json(record.state) if record.state else RunState()
        error = record.error
        # Only a worker that knows this saga by name, but not this version, can say so; a
        # reader with no definitions (the CLI) reports the run as stored.
        if (not record.status.finished and record.saga in self._latest
                and (record.saga, record.version) not in self._definitions):
            error = (
                f"saga {record.saga!r} version {record.version} is not registered in this "
                f"worker, so it cannot drive this run; deploy a worker that registers it"
            )
        return SagaRun(
            id=record.id,
            saga=record.saga,
            version=record.version,
            status=record.status,
            input=record.input,
            results=state.results,
            error=error,
            history=tuple(record.history or ()),
            created_at=record.created_at,
            updated_at=record.updated_at,
            idempotency_key=record.idempotency_key,
            steps={k: v.to_json() for k, v in state.steps.items()},
            owner=record.owner,
            lease_expires=record.lease_expires,
            wake_at=record.wake_at,
            request=record.request,
        )

    def _snapshot_from_driver(self, d: _Driver) -> SagaRun:
        return SagaRun(
            id=d.run_id,
            saga=d.saga.name,
            version=d.saga.version,
            status=d.state.status,
            input=d.input,
            results=d.state.results,
            error=d.state.error,
            history=tuple(d.history or ()),
            created_at=d.created_at,
            updated_at=d.updated_at,
            idempotency_key=d.idempotency_key,
            steps={k: v.to_json() for k, v in d.state.steps.items()},
            wake_at=d.state.wake_at,
        )

    # -- driving a run ----------------------------------------------------------------------

    async def _drive(self, d: _Driver, commands: builtins.list[Any],
                     first: Event | None = None) -> None:
        try:
            while True:
                local = [c for c in commands if not self._remote(d.saga, c)]
                if first is not None:
                    event, first = first, None
                elif (len(local) == 1 and not d.invocations and d.events.empty()
                        and d.state.wake_at is None):
                    # The common sequential case: nothing else can happen to this run until
                    # the one invocation returns, so run it here rather than as a task.
                    self._cancel_timer(d)
                    event = await self._invoke(d, local[0])
                else:
                    self._execute(d, local)
                    if d.state.status.finished:
                        break
                    event = await d.events.get()
                decision = decide(d.saga, d.run_id, d.state, event)
                commands = decision.commands
                if decision.history:
                    park = self._parks(d.saga, decision.state, commands, busy=bool(d.invocations))
                    await self._commit(d, decision.state, decision.history, commands, park=park)
                    if park:
                        self._park(d)
                        return
                if d.state.status.finished:
                    break
        except LeaseLost:
            log.warning("run %s: another worker took it over; this worker stops driving it",
                        d.run_id)
            for listener in self.listeners:
                with contextlib.suppress(Exception):
                    listener.on_lease_lost(d.run_id)
            self._abandon(d)
        except StoreError as exc:
            log.error("run %s: store error, releasing it for recovery: %s", d.run_id, exc)
            self._abandon(d)
            with contextlib.suppress(Exception):
                await self.store.release_leases(owner=self.worker_id, run_ids=[d.run_id])
        except OrchestratorClosed:
            self._abandon(d)
        except asyncio.CancelledError:
            self._abandon(d)
            raise
        else:
            self._cancel_timer(d)
            # Gone from memory at once: a wait() in progress holds the driver and reads the
            # final snapshot from it; a later one reads the store.
            if self._drivers.get(d.run_id) is d:
                del self._drivers[d.run_id]
            d.done.set()

    async def _commit(self, d: _Driver, state: RunState,
                      history: builtins.list[HistoryEntry],
                      commands: Iterable[Command] = (), *, park: bool = False) -> None:
        committer = self._require_open()
        now = history[-1].at if history else self.clock.now()
        # The write that finishes (or parks) the run drops its lease too: a renewal answered
        # while it is in flight must not take the run for lost.
        d.releasing = state.status.finished or park
        outbox = self._outbox_for(d.run_id, d.saga, d.input, commands)
        event_type = d.saga.events.get(state.status.value)
        if event_type and d.saga.events_destination and not d.state.status.finished:
            outbox.append(domain_event(
                run_id=d.run_id, saga=d.saga.name, event_type=event_type,
                destination=d.saga.events_destination,
                payload={"run_id": d.run_id, "saga": d.saga.name,
                         "status": state.status.value, "input": d.input,
                         "results": state.results},
            ))
        ok = await committer.update(
            RunUpdate(
                run_id=d.run_id,
                expected_version=d.row_version,
                status=state.status,
                state=state.to_json(),
                error=state.error,
                wake_at=state.wake_at,
                now=now,
                history=history,
                release=state.status.finished or park,
                clear_request=d.clear_request,
                outbox=outbox,
            )
        )
        if outbox and self._relay is not None:
            self._relay.poke()
        if not ok:
            raise LeaseLost(f"run {d.run_id} was taken over by another worker")
        d.row_version += 1
        d.clear_request = False
        d.state = state
        d.updated_at = now
        if d.history is not None:
            d.history.extend(history)
        d.transitions += 1
        self._notify(d, history)

    def _notify(self, d: _Driver, history: builtins.list[HistoryEntry]) -> None:
        if not self.listeners:
            return
        transition = Transition(d.run_id, d.saga.name, d.saga.version, d.state.status,
                                tuple(history), d.transitions)
        for listener in self.listeners:
            try:
                listener.on_transition(transition)
            except Exception:
                log.exception("listener %r failed on run %s", listener, d.run_id)

    # -- command steps ----------------------------------------------------------------------

    @staticmethod
    def _remote(saga: Saga, cmd: Command) -> bool:
        step = saga[cmd.step]
        return step.remote if isinstance(cmd, InvokeAction) else step.remote_compensation

    def _outbox_for(self, run_id: str, saga: Saga, data: Any, commands: Iterable[Command]
                    ) -> builtins.list[OutboxMessage]:
        """The command messages a transition emits (written in its own transaction)."""
        out = []
        for cmd in commands:
            if not self._remote(saga, cmd):
                continue
            step = saga[cmd.step]
            compensating = isinstance(cmd, InvokeCompensation)
            target = step.compensation_fn if compensating else step.action
            assert isinstance(target, CommandSpec)
            headers = self._headers_for(Invocation(run_id, saga.name, step.name, cmd.attempt,
                                                   compensating, "command"))
            out.append(command_message(
                run_id=run_id, step=step.name, attempt=cmd.attempt,
                key=idempotency_key(run_id, step.name, compensation=compensating),
                service=target.service, command=target.name, payload=data,
                reply_to=self.reply_to, headers=headers,
            ))
        return out

    def _headers_for(self, invocation: Invocation) -> dict[str, str]:
        """The headers listeners want this attempt to carry (trace context, mostly)."""
        headers: dict[str, str] = {}
        for listener in self.listeners:
            try:
                extra: Mapping[str, str] | None = listener.on_invoke(invocation)
            except Exception:
                log.exception("listener %r failed on invoke of %s/%s", listener,
                              invocation.run_id, invocation.step)
                continue
            if extra:
                headers.update(extra)
        return headers

    def _parks(self, saga: Saga, state: RunState, commands: Iterable[Command], *,
               busy: bool) -> bool:
        """Only replies (or timers) can move the run on: release it instead of holding it."""
        if state.status.finished or busy or self.transport is None:
            return False
        if any(not self._remote(saga, c) for c in commands):
            return False
        return any(
            (s.status is StepStatus.RUNNING and saga[name].remote)
            or (s.status is StepStatus.COMPENSATING and saga[name].remote_compensation)
            for name, s in state.steps.items()
        )

    def _park(self, d: _Driver) -> None:
        # No task waits for the reply: the run sits in the store, leased to nobody, until the
        # reply claims it (claim_run) or its deadline makes it due (claim_due).
        self._cancel_timer(d)
        if self._drivers.get(d.run_id) is d:
            del self._drivers[d.run_id]
        d.done.set()

    async def _on_reply(self, delivery: Delivery) -> None:
        """A participant answered: wake the run with the answer as its next event."""
        reply = parse_reply(delivery.envelope)
        event = reply.event(self.clock.now())
        # The run may be held for a moment (it is parking, or a worker drives a sibling
        # step): keep the reply and try again until a lease could have run out, rather than
        # handing it back and burning its deliveries.
        deadline = time.monotonic() + self.lease_seconds + self.poll_interval
        pause = 0.02
        while True:
            d = self._drivers.get(reply.run_id)
            if d is not None and not d.releasing and not d.done.is_set():
                d.events.put_nowait(event)
                return
            record = await self.store.claim_run(reply.run_id, owner=self.worker_id,
                                                lease_seconds=self.lease_seconds)
            if record is not None:
                break
            existing = await self.store.get_run(reply.run_id, history=False)
            if existing is None or existing.status.finished:
                log.info("reply for %s step %s: the run is %s; nothing to wake", reply.run_id,
                         reply.step, existing.status.value if existing else "unknown")
                return
            if time.monotonic() > deadline:
                raise TransportError(f"run {reply.run_id} is held by {existing.owner}; "
                                     f"redeliver")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)
        if (record.saga, record.version) not in self._definitions:
            await self.store.release_leases(owner=self.worker_id, run_ids=[record.id])
            raise UnknownSaga(f"a reply for run {record.id} of {record.saga} v{record.version}, "
                              f"which this worker does not register")
        self._adopt(record, first=event)

    def _execute(self, d: _Driver, commands: builtins.list[Any]) -> None:
        for cmd in commands:
            task = asyncio.create_task(self._invoke_into_queue(d, cmd))
            d.invocations.add(task)
            task.add_done_callback(d.invocations.discard)
        self._arm_timer(d)

    async def _invoke_into_queue(self, d: _Driver, cmd: Command) -> None:
        d.events.put_nowait(await self._invoke(d, cmd))

    async def _invoke(self, d: _Driver, cmd: Command) -> Event:
        if isinstance(cmd, InvokeAction):
            return await self._invoke_action(d, cmd)
        return await self._invoke_compensation(d, cmd)

    def _arm_timer(self, d: _Driver) -> None:
        wake_at = d.state.wake_at
        if wake_at == d.timer_at and d.timer is not None and not d.timer.done():
            return
        self._cancel_timer(d)
        if wake_at is None or d.state.status.finished:
            return

        async def fire() -> None:
            await self.clock.sleep(wake_at - self.clock.now())
            d.timer_at = None
            d.events.put_nowait(TimerFired(max(self.clock.now(), wake_at)))

        d.timer_at = wake_at
        d.timer = asyncio.create_task(fire())

    @staticmethod
    def _cancel_timer(d: _Driver) -> None:
        if d.timer is not None:
            d.timer.cancel()
        d.timer = None
        d.timer_at = None

    def _stop_driver(self, d: _Driver) -> None:
        self._cancel_timer(d)
        for task in list(d.invocations):
            task.cancel()
        if d.task is not None and not d.task.done():
            d.task.cancel()

    def _abandon(self, d: _Driver) -> None:
        self._cancel_timer(d)
        for task in list(d.invocations):
            task.cancel()
        if self._drivers.get(d.run_id) is d:
            del self._drivers[d.run_id]
        d.done.set()

    def _http_invoker(self) -> HttpInvoker:
        if self._http is None:
            raise OrchestratorClosed("the orchestrator is closed")
        return self._http

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        if self._threads is None:
            raise OrchestratorClosed("the orchestrator is closed")
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._threads, functools.partial(fn, *args))
        if asyncio.iscoroutine(result):  # a plain def that returned a coroutine
            return await result
        return result

    def _context(self, d: _Driver, step: str, attempt: int, *, compensating: bool,
                 http: bool = False) -> StepContext:
        headers = (self._headers_for(Invocation(d.run_id, d.saga.name, step, attempt,
                                                compensating, "http" if http else "local"))
                   if self.listeners else {})
        return StepContext(
            run_id=d.run_id,
            saga=d.saga.name,
            step=step,
            attempt=attempt,
            idempotency_key=idempotency_key(d.run_id, step, compensation=compensating),
            results=d.state.results,
            input=d.input,
            compensating=compensating,
            headers=headers,
        )

    async def _call_within(self, timeout: float | None, fn: Callable[..., Any], *args: Any
                           ) -> Any:
        if timeout is None:
            return await self._call(fn, *args)
        async with asyncio.timeout(timeout):
            return await self._call(fn, *args)

    async def _invoke_action(self, d: _Driver, cmd: InvokeAction) -> Event:
        step = d.saga[cmd.step]
        action = step.action
        ctx = self._context(d, step.name, cmd.attempt, compensating=False,
                            http=isinstance(action, HttpCall))
        event: Event
        try:
            if isinstance(action, HttpCall):
                result = await self._http_invoker().act(action, ctx, d.input)
            else:
                result = await self._call_within(step.timeout, step.action, ctx, d.input)
        except InvocationFailed as exc:
            event = ActionFailed(step.name, cmd.attempt, exc.message, self.clock.now(),
                                 retryable=exc.retryable, maybe_applied=exc.maybe_applied,
                                 retry_after=exc.retry_after)
        except TimeoutError as exc:
            # Our timeout, or the step's own (a client timeout): either way the effect may
            # have happened.
            what = f"timed out after {step.timeout}s" if step.timeout else _describe(exc)
            event = ActionFailed(step.name, cmd.attempt, f"{what} (may have taken effect)",
                                 self.clock.now(), retryable=True, maybe_applied=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            retryable = not (isinstance(exc, NonRetryableError | SagawayError)
                             or step.retry.is_non_retryable(exc))
            event = ActionFailed(step.name, cmd.attempt, _describe(exc), self.clock.now(),
                                 retryable=retryable)
        else:
            try:
                plain, _ = encode(result, what=f"the result of step {step.name!r}",
                                  limit=self.max_payload_bytes)
            except InvalidPayload as exc:
                # The action ran, so its effect may stand: fail it as possibly applied.
                event = ActionFailed(step.name, cmd.attempt, str(exc), self.clock.now(),
                                     retryable=False, maybe_applied=True)
            else:
                event = ActionSucceeded(step.name, cmd.attempt, plain, self.clock.now())
        return event

    async def _invoke_compensation(self, d: _Driver, cmd: InvokeCompensation) -> Event:
        step = d.saga[cmd.step]
        fn = step.compensation_fn
        assert fn is not None
        ctx = self._context(d, step.name, cmd.attempt, compensating=True,
                            http=isinstance(fn, HttpCall))
        state = d.state.steps.get(step.name)
        # The action's result if an attempt succeeded; None if it timed out or was cut.
        known = state is not None and state.succeeded
        result = state.result if state is not None and known else None
        event: Event
        try:
            if isinstance(fn, HttpCall):
                await self._http_invoker().undo(fn, ctx, d.input, result, known=known,
                                                action=step.action)
            else:
                await self._call_within(step.compensation_timeout, fn, ctx, d.input, result)
        except InvocationFailed as exc:
            event = CompensationFailed(step.name, cmd.attempt, exc.message, self.clock.now(),
                                       retryable=exc.retryable, retry_after=exc.retry_after)
        except TimeoutError as exc:
            what = (f"timed out after {step.compensation_timeout}s"
                    if step.compensation_timeout else _describe(exc))
            event = CompensationFailed(step.name, cmd.attempt, what, self.clock.now())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            retryable = not step.compensation_retry.is_non_retryable(exc)
            event = CompensationFailed(step.name, cmd.attempt, _describe(exc),
                                       self.clock.now(), retryable=retryable)
        else:
            event = CompensationSucceeded(step.name, cmd.attempt, self.clock.now())
        return event

    # -- recovery and leases ----------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self._claim_due()
            except StoreError as exc:
                log.warning("recovery poll failed, retrying in %.1fs: %s",
                            self.poll_interval, exc)
            except Exception:
                log.exception("recovery poll crashed; retrying")
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the event is set, and close() would then wait on this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._poll_now.wait()
            self._poll_now.clear()

    async def _claim_due(self) -> None:
        capacity = self.max_runs - len(self._drivers)
        if capacity <= 0 or not self._open:
            return
        records = await self.store.claim_due(
            owner=self.worker_id,
            lease_seconds=self.lease_seconds,
            limit=min(capacity, 500),
            definitions=list(self._definitions),
        )
        for record in records:
            self._adopt(record)

    def _adopt(self, record: RunRecord, first: Event | None = None) -> None:
        old = self._drivers.get(record.id)
        if old is not None:
            # Our own lease expired (renewal stalled) and we claimed the run again: the old
            # driver is fenced by the new row version, so replace it.
            self._stop_driver(old)
        saga = self._definitions[(record.saga, record.version)]
        d = _Driver(
            run_id=record.id,
            saga=saga,
            state=RunState.from_json(record.state),
            row_version=record.row_version,
            input=record.input,
            idempotency_key=record.idempotency_key,
            created_at=record.created_at,
            updated_at=record.updated_at,
            history=None,
            committed=True,
            claim_seq=self._claim_seq + 1,
        )
        self._claim_seq += 1
        self._drivers[record.id] = d
        if first is not None:
            pass
        elif record.request is not None:
            req = record.request
            log.info("run %s (%s v%s): carrying out operator %s's %r", record.id, record.saga,
                     record.version, req.get("actor"), req.get("action"))
            d.clear_request = True
            first = Operator(str(req.get("action")), str(req.get("reason", "")),
                             str(req.get("actor", "operator")), self.clock.now())
        else:
            log.info("run %s (%s v%s): resuming from %s", record.id, record.saga,
                     record.version, record.status.value)
            first = Recover(self.clock.now())
        d.task = asyncio.create_task(self._drive(d, [], first),
                                     name=f"sagaway-run-{record.id}")

    async def _renew_loop(self) -> None:
        interval = self.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            seq = self._claim_seq
            try:
                held = await self.store.renew_leases(owner=self.worker_id,
                                                     lease_seconds=self.lease_seconds)
            except StoreError as exc:
                log.warning("lease renewal failed: %s", exc)
                continue
            # Drivers whose lease is gone: another worker has the run. Only runs that were
            # ours before the renewal was sent count; later claims are not in its answer.
            lost = [d for rid, d in self._drivers.items()
                    if rid not in held and d.committed and d.claim_seq <= seq
                    and not d.done.is_set() and not d.state.status.finished
                    and not d.releasing]
            for d in lost:
                log.warning("run %s: lease lost; stopping", d.run_id)
                self._stop_driver(d)
                self._abandon(d)
            # Leases held with no driver (a driver that hit a store error): let them go.
            orphans = held - set(self._drivers)
            if orphans:
                with contextlib.suppress(StoreError):
                    await self.store.release_leases(owner=self.worker_id, run_ids=orphans)
                self._poll_now.set()
