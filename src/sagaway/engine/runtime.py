"""The runtime: the Orchestrator that drives saga runs against a store.

Each run this worker holds is driven by one task (an actor): it feeds one event at a time to
the pure decider, commits the decision (through the group committer) and only then carries
out the commands: invoke an action, invoke a compensation, arm a timer. Invocations run as
their own tasks and report back as events, so a run waiting on a slow step holds no thread.

Leases: every run a worker drives is leased to it in the store. One background task renews
all of this worker's leases in one statement; another polls for runs that are unowned or
whose lease expired (a worker died) and adopts them. A run started here is adopted at once,
with no polling on the hot path.

The Orchestrator is split by concern: this module holds its public API, its lifecycle and
the loop that drives a run; ``recovery`` (a base class) claims and adopts runs and renews
leases; ``invocation`` (the StepInvoker it owns) carries out local and HTTP attempts;
``commands`` (CommandSteps) writes command steps' messages and decides when a run parks;
``driver`` is the in-memory record of a run held here.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sagaway.definition.saga import Saga
from sagaway.engine.clock import Clock, SystemClock
from sagaway.engine.commands import CommandSteps, is_remote
from sagaway.engine.committer import GroupCommitter
from sagaway.engine.decider import OPERATOR_ALLOWED, decide
from sagaway.engine.driver import Driver, run_secrets
from sagaway.engine.invocation import NonRetryableError, StepInvoker
from sagaway.engine.listener import Listener, RunContext, Transition, current_run
from sagaway.engine.payload import DEFAULT_MAX_PAYLOAD_BYTES, encode, fingerprint
from sagaway.engine.recovery import Recovery
from sagaway.engine.relay import OutboxRelay, domain_event
from sagaway.engine.state import (
    ActionFailed,
    Command,
    CompensationFailed,
    Event,
    RunState,
    Start,
    TimerFired,
)
from sagaway.errors import (
    DefinitionError,
    IdempotencyConflict,
    InvalidPayload,
    InvalidTransition,
    LeaseLost,
    OrchestratorClosed,
    PayloadTooLarge,
    RateLimited,
    RunNotFound,
    StoreError,
    UnknownSaga,
    WaitTimeout,
)
from sagaway.messaging.base import Subscription, Transport
from sagaway.run import ACTIVE_STATUSES, HistoryEntry, SagaRun, SagaStatus
from sagaway.store import open_store
from sagaway.store.base import NewRun, RunRecord, RunUpdate, Store

if TYPE_CHECKING:
    from sagaway.protection.codec import PayloadCodec
    from sagaway.protection.signing import EnvelopeSigner

__all__ = ["DEFAULT_MAX_STEPS", "NonRetryableError", "Orchestrator", "RunHandle"]

DEFAULT_MAX_STEPS = 100
"""The most steps a registered definition may have unless ``max_steps`` says otherwise."""

log = logging.getLogger("sagaway.engine")


def new_run_id() -> str:
    """A UUIDv7: time-ordered, so ids sort roughly by start time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64
    value |= (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


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


class Orchestrator(Recovery):
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
        codec: encrypts payloads (inputs, results, error texts, message payloads) before
            they reach the store or the broker, e.g. ``AesGcmCodec(keys=…, active="k2")``
            (see ``sagaway.protection``). None reads ``SAGAWAY_KEYS`` from the environment
            (no encryption when unset); False turns it off whatever the environment says.
        max_steps: the most steps a definition may have (DefinitionError at registration).
        start_rate: starts per second allowed per saga name (a token bucket holding one
            second's worth): ``{"order": 100}``, or one number for every saga. Over it,
            ``start`` raises RateLimited with ``retry_after``.
        signer: signs the messages the transport publishes and checks the replies it
            receives (``EnvelopeSigner``; see ``sagaway.protection.signing``). None reads
            ``SAGAWAY_SIGNING_KEYS`` (no signing when unset); False turns it off.
        retention_days: a worker erases the payloads of runs that finished (COMPLETED,
            COMPENSATED, RESOLVED) more than this many days ago, checking every
            ``retention_interval`` seconds; their timelines stay. None keeps payloads.
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
        codec: PayloadCodec | bool | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        start_rate: float | Mapping[str, float] | None = None,
        retention_days: float | None = None,
        retention_interval: float = 3600.0,
        signer: EnvelopeSigner | bool | None = None,
        services: Mapping[str, str] | None = None,
        http_connections: int = 16,
        run_ids: Callable[[], str] | None = None,
    ) -> None:
        if retention_days is not None and not retention_days >= 0:
            raise ValueError("retention_days must be a number of days >= 0")
        self.retention_days = retention_days
        self.retention_interval = retention_interval
        if lease_seconds <= 0 or poll_interval <= 0:
            raise ValueError("lease_seconds and poll_interval must be > 0")
        self.max_steps = max_steps
        self.rejections: dict[str, int] = {"payload_too_large": 0, "rate_limited": 0,
                                           "too_many_steps": 0}
        """Plain counters of refused work, by reason (for metrics exporters)."""
        from sagaway.protection.limits import StartLimiter

        self._limiter = StartLimiter(start_rate) if start_rate is not None else None
        self._definitions: dict[tuple[str, int], Saga] = {}
        self._latest: dict[str, Saga] = {}
        for saga in sagas:
            self.register(saga)
        self.store: Store = open_store(store) if isinstance(store, str) else store
        self.codec: PayloadCodec | None = None
        if codec is None or codec is True:
            from sagaway.protection.codec import codec_from_env

            self.codec = codec_from_env()
        elif codec is not False:
            self.codec = codec
        self._sealer = None
        if self.codec is not None:
            from sagaway.protection.store import EncryptedStore

            wrapped = EncryptedStore(self.store, self.codec)
            self._sealer = wrapped.sealer
            self.store = wrapped
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
        if transport is not None and signer is not False:
            if signer is None or signer is True:
                from sagaway.protection.signing import signer_from_env

                signer = signer_from_env()
            if signer:
                transport.signer = signer
        self.reply_to = reply_to
        self._new_run_id = run_ids or new_run_id
        self._relay: OutboxRelay | None = None
        self._replies: Subscription | None = None
        self.services = dict(services or {})
        if worker and transport is None:
            remote = [f"{s.name}.{st.name}" for s in self.sagas for st in s.steps
                      if st.remote or st.remote_compensation]
            remote += [f"{s.name} (events)" for s in self.sagas if s.events]
            if remote:
                raise DefinitionError(
                    f"{', '.join(remote)} send messages: pass transport=… (amqp://, "
                    f"nats://, redis:// or memory://) to the Orchestrator"
                )
        self._invoker = StepInvoker(
            clock=self.clock, listeners=self.listeners, max_payload_bytes=max_payload_bytes,
            rejections=self.rejections, max_threads=max_threads,
            http_connections=http_connections,
        )
        self._commands = CommandSteps(transport=transport, reply_to=reply_to,
                                      headers_for=self._invoker.headers_for)
        self._drivers: dict[str, Driver] = {}
        self._committer: GroupCommitter | None = None
        self._background: list[asyncio.Task[None]] = []
        self._poll_now = asyncio.Event()
        self._open = False
        self._claim_seq = 0
        self._warned_unknown: set[str] = set()
        self._background_writes: set[asyncio.Task[None]] = set()

    # -- registration -------------------------------------------------------------------

    def register(self, saga: Saga) -> None:
        """Register a definition (validated now). Raises DefinitionError."""
        if not isinstance(saga, Saga):
            raise DefinitionError(f"sagas must be Saga definitions, got {saga!r}")
        saga.validate()
        if len(saga.steps) > self.max_steps:
            self.rejections["too_many_steps"] += 1
            raise DefinitionError(
                f"saga {saga.name!r} has {len(saga.steps)} steps, over the limit of "
                f"{self.max_steps}; split it, or raise Orchestrator(max_steps=…)"
            )
        key = (saga.name, saga.version)
        if key in self._definitions and self._definitions[key] is not saga:
            raise DefinitionError(
                f"saga {saga.name!r} version {saga.version} is registered twice; bump the "
                f"version of the newer definition"
            )
        # (register also runs inside __init__, before _open exists; open() checks those.)
        if getattr(self, "_open", False) and self.worker:
            self._invoker.open_http([saga], self.services)
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
            self._invoker.open_http(self.sagas, self.services)
        await self.store.open()
        self._invoker.open()
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
            if self.retention_days is not None:
                self._background.append(asyncio.create_task(
                    self._retention_loop(self.retention_days), name="sagaway-retention"))

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
        if self._background_writes:
            await asyncio.gather(*self._background_writes, return_exceptions=True)
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
        self._invoker.close_threads()
        await self._invoker.aclose_http()
        await self.store.aclose()

    @property
    def _threads(self) -> ThreadPoolExecutor | None:
        """The step invoker's thread pool (None unless open); tests that simulate a crash
        shut it down by hand."""
        return self._invoker.threads

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
        try:
            plain, text = encode(input, what=f"the input of saga {saga!r}",
                                 limit=self.max_payload_bytes)
        except PayloadTooLarge:
            self.rejections["payload_too_large"] += 1
            raise
        if self._limiter is not None:
            wait = self._limiter.take(definition.name)
            if wait > 0 and key is not None:
                # Asking again for a run that exists starts nothing: answer it, limit or not
                # (a client retrying a timed-out start must get its run, not a 429).
                existing = await self.store.find_run(definition.name, key)
                if existing is not None:
                    self._check_same_input(existing, fingerprint(text), saga, key)
                    return RunHandle(self, existing.id, existing.saga, created=False)
            if wait > 0:
                self.rejections["rate_limited"] += 1
                raise RateLimited(
                    f"saga {definition.name!r} is being started faster than its start_rate "
                    f"of {self._limiter.rate(definition.name):g}/s; retry in {wait:.3f}s",
                    saga=definition.name, retry_after=wait,
                )
        run_id = self._new_run_id()
        now = self.clock.now()
        if not self.worker:
            return await self._submit(committer, definition, run_id, now, plain, text, key)
        decision = decide(definition, run_id, RunState(), Start(now))
        park = self._commands.parks(definition, decision.state, decision.commands, busy=False)
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
            outbox=self._commands.outbox_for(run_id, definition, plain, decision.commands,
                                             decision.state.results),
        )
        # Registered before the write, so a lease renewal racing the creation never takes
        # this run for an orphan.
        driver = Driver(run_id, definition, decision.state, 1, plain, key, now, now,
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

    async def erase(self, run_id: str, *, reason: str, actor: str = "operator") -> SagaRun:
        """Erase a finished run's payloads (input, results, error texts, message payloads),
        keeping its timeline, and record ``run.erased`` with who and why.

        Raises:
            RunNotFound; InvalidTransition unless the run is COMPLETED, COMPENSATED or
            RESOLVED with no operator request pending; InvalidPayload without a reason.
        """
        from sagaway.protection.erasure import erase_run

        self._require_open()
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidPayload("erase: a reason is required (it goes into the history)")
        if not isinstance(actor, str) or not actor.strip():
            raise InvalidPayload("erase: the actor (who does it) is required")
        await erase_run(self.store, run_id, actor=actor, reason=reason, now=self.clock.now())
        return await self.get(run_id)

    async def _retention_loop(self, days: float) -> None:
        from sagaway.protection.erasure import purge_finished

        while True:
            try:
                erased = await purge_finished(self.store, older_than=days * 86400,
                                              now=self.clock.now())
                if erased:
                    log.info("retention: erased the payloads of %d run(s) finished more "
                             "than %g days ago", erased, days)
            except StoreError as exc:
                log.warning("retention pass failed, retrying later: %s", exc)
            except Exception:
                log.exception("retention pass crashed; retrying later")
            await asyncio.sleep(self.retention_interval)

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

    def _snapshot_from_driver(self, d: Driver) -> SagaRun:
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

    async def _drive(self, d: Driver, commands: builtins.list[Any],
                     first: Event | None = None) -> None:
        # Log records and spans of this task (and of the invocations it starts) name the run.
        current_run.set(RunContext(d.run_id, d.saga.name, secrets=run_secrets(d)))
        try:
            while True:
                local = [c for c in commands if not is_remote(d.saga, c)]
                if first is not None:
                    event, first = first, None
                elif (len(local) == 1 and not d.invocations and d.events.empty()
                        and d.state.wake_at is None):
                    # The common sequential case: nothing else can happen to this run until
                    # the one invocation returns, so run it here rather than as a task.
                    self._cancel_timer(d)
                    event = await self._invoker.invoke(d, local[0])
                else:
                    self._execute(d, local)
                    if d.state.status.finished:
                        break
                    event = await d.events.get()
                if d.saga.sensitive:
                    event = self._scrub(d, event)
                decision = decide(d.saga, d.run_id, d.state, event)
                commands = decision.commands
                if decision.history:
                    park = self._commands.parks(d.saga, decision.state, commands,
                                                busy=bool(d.invocations))
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

    async def _commit(self, d: Driver, state: RunState,
                      history: builtins.list[HistoryEntry],
                      commands: Iterable[Command] = (), *, park: bool = False) -> None:
        committer = self._require_open()
        now = history[-1].at if history else self.clock.now()
        # The write that finishes (or parks) the run drops its lease too: a renewal answered
        # while it is in flight must not take the run for lost.
        d.releasing = state.status.finished or park
        outbox = self._commands.outbox_for(d.run_id, d.saga, d.input, commands, state.results)
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

    def _scrub(self, d: Driver, event: Event) -> Event:
        """Cut the run's sensitive values out of an error (an exception may repeat them)
        before it reaches the history, the listeners and the operators' views."""
        if isinstance(event, ActionFailed | CompensationFailed):
            clean = d.saga.redactor.text(event.error, run_secrets(d))
            if clean != event.error:
                return dataclasses.replace(event, error=clean)
        return event

    def _notify(self, d: Driver, history: builtins.list[HistoryEntry]) -> None:
        if not self.listeners:
            return
        transition = Transition(d.run_id, d.saga.name, d.saga.version, d.state.status,
                                tuple(history), d.transitions, d.created_at)
        for listener in self.listeners:
            try:
                listener.on_transition(transition)
            except Exception:
                log.exception("listener %r failed on run %s", listener, d.run_id,
                              extra={"run_id": d.run_id, "saga": d.saga.name})

    # -- parking, invocations in flight, timers ---------------------------------------------

    def _park(self, d: Driver) -> None:
        # No task waits for the reply: the run sits in the store, leased to nobody, until the
        # reply claims it (claim_run) or its deadline makes it due (claim_due).
        self._cancel_timer(d)
        if self._drivers.get(d.run_id) is d:
            del self._drivers[d.run_id]
        d.done.set()

    def _execute(self, d: Driver, commands: builtins.list[Any]) -> None:
        for cmd in commands:
            task = asyncio.create_task(self._invoke_into_queue(d, cmd))
            d.invocations.add(task)
            task.add_done_callback(d.invocations.discard)
        self._arm_timer(d)

    async def _invoke_into_queue(self, d: Driver, cmd: Command) -> None:
        d.events.put_nowait(await self._invoker.invoke(d, cmd))

    def _arm_timer(self, d: Driver) -> None:
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
    def _cancel_timer(d: Driver) -> None:
        if d.timer is not None:
            d.timer.cancel()
        d.timer = None
        d.timer_at = None

    def _stop_driver(self, d: Driver) -> None:
        self._cancel_timer(d)
        for task in list(d.invocations):
            task.cancel()
        if d.task is not None and not d.task.done():
            d.task.cancel()

    def _abandon(self, d: Driver) -> None:
        self._cancel_timer(d)
        for task in list(d.invocations):
            task.cancel()
        if self._drivers.get(d.run_id) is d:
            del self._drivers[d.run_id]
        d.done.set()
