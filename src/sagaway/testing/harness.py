"""SagaHarness: run a saga on the memory store, in virtual time, with fakes and crashes.

Each run gets a fresh memory store (:class:`OrderedMemoryStore`) on a
:class:`~sagaway.testing.virtual.VirtualTimeLoop`, so backoffs, timeouts, lease expiry and
long waits take no real time, and a run id derived from the schedule, so the same
:class:`Schedule` gives the same timeline.

The saga runs as a copy of its definition: same name, version, steps, kinds, retry policies
and timeouts, with every local function (and every faked step, whatever its kind) wrapped so
the harness sees each invocation, can inject a failure and can crash the process right after
the effect. Command steps that are not faked go out for real, over a memory transport that
the participants registered with :meth:`SagaHarness.service` consume; HTTP steps must be
faked (virtual time cannot wait on a real network).

A **crash** kills one orchestrator "process" (a *generation*): its store connection and its
calls to participants are cut at once, so nothing it does afterwards becomes durable or takes
effect, its leases are left to expire, and a new orchestrator on the same store recovers the
run. The harness crashes right after the *k*-th durable transition is committed (a
listener's ``on_transition`` runs after the commit and before the commands are carried
out), or right after the *k*-th effect is applied (before its result is committed).
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import hashlib
import inspect
import json
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagaway.definition.saga import Command, Saga, Step, StepContext
from sagaway.engine.listener import Invocation, Listener, Transition
from sagaway.engine.runtime import Orchestrator
from sagaway.errors import DefinitionError, SagawayError
from sagaway.messaging.memory import MemoryBroker, MemoryTransport
from sagaway.run import SagaRun, SagaStatus
from sagaway.store.base import (
    BatchResult,
    NewRun,
    OutboxMessage,
    OutboxRecord,
    RunUpdate,
    Store,
)
from sagaway.store.memory import MemoryStore
from sagaway.testing.faults import Call, Failure, Fake, InjectedFailure
from sagaway.testing.faults import Outcome as CallOutcome
from sagaway.testing.virtual import VirtualClock, run_virtual

__all__ = ["HarnessError", "Outcome", "SagaHarness", "Schedule"]

DEFAULT_MAX_VIRTUAL_SECONDS = 7 * 24 * 3600.0


class HarnessError(SagawayError):
    """The harness cannot run this saga as configured (the message says what to change)."""


_GENERATION: contextvars.ContextVar[_Generation | None] = contextvars.ContextVar(
    "sagaway_testing_generation", default=None)


@dataclass(frozen=True, slots=True)
class Schedule:
    """Everything that makes one harness run what it is: replay it to see it again.

    Attributes:
        failure: the step that fails (a name, or a :class:`Failure` saying how), or several
            at once as a tuple (``("ship", Failure("charge", compensation=True))``: the pivot
            fails, then the refund too); ``None``: no injected failure (fakes still do what
            they were scripted to).
        crash_after: crash right after the run's n-th durable transition is committed.
        crash_after_effect: crash right after the n-th effect (an action or compensation that
            applied) and before its result is committed.
        double_invoke: invoke every action and compensation twice.
    """

    failure: Failure | str | tuple[Failure | str, ...] | None = None
    crash_after: int | None = None
    crash_after_effect: int | None = None
    double_invoke: bool = False

    def __post_init__(self) -> None:
        # One value per meaning: a step name is that step's default Failure, and a tuple of
        # one is its element.
        failure = self.failure
        if isinstance(failure, tuple | list):
            parts = tuple(Failure(f) if isinstance(f, str) else f for f in failure)
            failure = parts[0] if len(parts) == 1 else (parts or None)
        elif isinstance(failure, str):
            failure = Failure(failure)
        object.__setattr__(self, "failure", failure)

    @property
    def faults(self) -> tuple[Failure, ...]:
        """The injected failures (none, one, or several)."""
        f = self.failure
        if f is None:
            return ()
        if isinstance(f, tuple):
            return tuple(Failure(x) if isinstance(x, str) else x for x in f)
        return (Failure(f) if isinstance(f, str) else f,)

    def __repr__(self) -> str:
        def one(f: Failure) -> str:
            return repr(f.step) if repr(f) == f"Failure({f.step!r})" else repr(f)

        parts = []
        faults = self.faults
        if len(faults) == 1:
            parts.append(f"failure={one(faults[0])}")
        elif faults:
            parts.append(f"failure=({', '.join(one(f) for f in faults)})")
        if self.crash_after is not None:
            parts.append(f"crash_after={self.crash_after}")
        if self.crash_after_effect is not None:
            parts.append(f"crash_after_effect={self.crash_after_effect}")
        if self.double_invoke:
            parts.append("double_invoke=True")
        return f"Schedule({', '.join(parts)})"


@dataclass
class Outcome:
    """What one harness run did.

    Attributes:
        schedule: what was injected.
        run: the run's final snapshot (with its history), or ``None`` if it never started.
        status: its final status (``None`` if it never started).
        calls: every invocation, in order.
        transitions: durable transitions committed.
        effects: invocations that applied an effect.
        crashes: processes crashed (0 or 1).
        virtual_seconds: how long the run took in virtual time.
        ended: the run finished before the harness's virtual time limit.
        violations: what the invariant checks found (empty: all held).
        notes: findings of the double-invoke mode and of the author's ``check``.
    """

    schedule: Schedule
    run: SagaRun | None
    status: SagaStatus | None
    calls: list[Call]
    transitions: int
    effects: int
    crashes: int
    virtual_seconds: float
    ended: bool
    violations: list[str] = field(default_factory=list)
    notes: list[tuple[str | None, str]] = field(default_factory=list)
    """``(step, message)`` findings recorded while running (double-invoke mode)."""
    fakes: dict[str, str] = field(default_factory=dict)
    """Each faked step's participant at the end: untouched, applied or compensated."""

    @property
    def ok(self) -> bool:
        return not self.violations

    def timeline(self) -> list[str]:
        """The run's history, one line per entry (as ``sagaway show`` prints it)."""
        if self.run is None:
            return []
        start = self.run.created_at
        lines = []
        for e in self.run.history:
            what = e.kind + (f" {e.step}" if e.step else "") + (
                f" #{e.attempt}" if e.attempt else "")
            detail = ""
            if e.data:
                detail = " " + ", ".join(f"{k}={v}" for k, v in e.data.items())
            lines.append(f"+{e.at - start:8.1f}s {what}{detail}")
        return lines


# -- processes ----------------------------------------------------------------------------


class _Generation:
    """One orchestrator 'process'. Killing it cuts its store and participant calls."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.dead = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.orchestrator: Orchestrator | None = None

    def kill(self) -> None:
        self.dead = True
        for task in list(self.tasks):
            if not task.done():
                task.cancel()


async def _forever() -> None:
    """A dead process: nothing after this point happens."""
    await asyncio.get_running_loop().create_future()


def _task_factory(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
                  context: contextvars.Context | None = None) -> asyncio.Task[Any]:
    # Every task belongs to the generation it was created in (tasks inherit the context), so
    # a crash can cancel all the work of one process and nothing else.
    ctx = context if context is not None else contextvars.copy_context()
    task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, context=ctx)
    gen = ctx.get(_GENERATION)
    if gen is not None:
        gen.tasks.add(task)
        task.add_done_callback(gen.tasks.discard)
        if gen.dead:
            task.cancel()
    return task


class _FencedStore(Store):
    """One process's connection to the shared store; a dead process's calls never return."""

    def __init__(self, inner: Store, gen: _Generation) -> None:
        self._inner = inner
        self._gen = gen
        self.url = inner.url
        self.commit_lanes = inner.commit_lanes

    async def _gate(self) -> None:
        if self._gen.dead:
            await _forever()

    async def open(self) -> None:
        await self._gate()

    async def aclose(self) -> None:
        return None

    async def now(self) -> float:
        await self._gate()
        return await self._inner.now()

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.commit(*args, **kwargs)

    async def claim_due(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.claim_due(*args, **kwargs)

    async def claim_run(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.claim_run(*args, **kwargs)

    async def request_operation(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.request_operation(*args, **kwargs)

    async def claim_outbox(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.claim_outbox(*args, **kwargs)

    async def mark_sent(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.mark_sent(*args, **kwargs)

    async def outbox_backlog(self) -> tuple[int, float | None]:
        await self._gate()
        return await self._inner.outbox_backlog()

    async def renew_leases(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.renew_leases(*args, **kwargs)

    async def release_leases(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.release_leases(*args, **kwargs)

    async def get_run(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.get_run(*args, **kwargs)

    async def list_runs(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.list_runs(*args, **kwargs)

    async def count_runs(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.count_runs(*args, **kwargs)

    async def find_run(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.find_run(*args, **kwargs)

    async def open_counts(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.open_counts(*args, **kwargs)

    async def load_payloads(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.load_payloads(*args, **kwargs)

    async def rewrite_payloads(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.rewrite_payloads(*args, **kwargs)

    async def payload_run_ids(self, *args: Any, **kwargs: Any) -> Any:
        await self._gate()
        return await self._inner.payload_run_ids(*args, **kwargs)


def stable_id(*parts: Any) -> str:
    """A run id that is a function of ``parts``: the same schedule gets the same id, so its
    retry jitter (derived from the idempotency key) and its timeline replay identically."""
    text = json.dumps(parts, sort_keys=True, default=repr)
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return str(uuid.UUID(bytes=digest, version=4))


class OrderedMemoryStore(MemoryStore):
    """A memory store whose outbox is claimed in the order messages were written.

    The memory store breaks ties between messages written at the same instant by their
    random ids; in virtual time many are written at the same instant, so the harness and
    the simulation use this one, and a schedule (or a fault plan) replays identically.
    """

    def __init__(self, *, clock: Callable[[], float]) -> None:
        super().__init__(clock=clock)
        self._written: dict[str, int] = {}
        self.messages: list[OutboxMessage] = []
        """Every message written to the outbox, in order."""

    async def commit(self, creates: Sequence[NewRun], updates: Sequence[RunUpdate], *,
                     owner: str, lease_seconds: float) -> BatchResult:
        for messages in [c.outbox for c in creates] + [u.outbox for u in updates]:
            for message in messages:
                if message.id not in self._written:
                    self._written[message.id] = len(self._written)
                    self.messages.append(message)
        return await super().commit(creates, updates, owner=owner,
                                    lease_seconds=lease_seconds)

    async def claim_outbox(self, *, owner: str, lease_seconds: float, limit: int
                           ) -> list[OutboxRecord]:
        claimed = await super().claim_outbox(owner=owner, lease_seconds=lease_seconds,
                                             limit=limit)
        return sorted(claimed, key=lambda r: (r.created_at, self._written.get(r.id, -1)))


# -- one run --------------------------------------------------------------------------------


StateFn = Callable[[], Any]


class _Trace(Listener):
    """One harness run: its ledger, its crash schedule and its processes."""

    def __init__(self, harness: SagaHarness, schedule: Schedule, clock: VirtualClock,
                 state: StateFn | None, run_id: str) -> None:
        self.harness = harness
        self.planned_id = run_id
        self.schedule = schedule
        self.faults = schedule.faults
        self.clock = clock
        self.state = state
        self.calls: list[Call] = []
        self.notes: list[tuple[str | None, str]] = []
        self.transitions = 0
        self.effects = 0
        self.crashes = 0
        self.run_id: str | None = None
        self.finished = asyncio.Event()
        self.generations: list[_Generation] = []
        self.spawning: set[asyncio.Task[Any]] = set()
        self.store = OrderedMemoryStore(clock=clock)
        self.broker = MemoryBroker()
        self.saga = harness._instrument(self)
        self.harness_context = contextvars.copy_context()

    # -- listener hooks ------------------------------------------------------------------

    def on_transition(self, transition: Transition) -> None:
        gen = _GENERATION.get()
        if gen is None:
            return
        if gen.dead:
            # Only a commit that went through calls this: a crashed process wrote.
            self.notes.append((None, f"process {gen.number} committed a transition after it "
                                     f"crashed: {[e.kind for e in transition.entries]}"))
            return
        self.run_id = self.run_id or transition.run_id
        self.transitions += 1
        if transition.status.finished:
            self.finished.set()
        if self.schedule.crash_after == self.transitions and not self.crashes:
            self.crash(gen)

    def on_invoke(self, invocation: Invocation) -> Mapping[str, str] | None:
        gen = _GENERATION.get()
        if invocation.kind == "local" or gen is None or gen.dead:
            return None
        # A command (or HTTP request) to a real participant: it may take effect.
        # Its key is read from the message itself once the run is over (see sent_keys).
        self.record(gen, invocation.run_id, invocation.step, invocation.compensating,
                    invocation.attempt, invocation.kind, "sent", effect=True, key="")
        return None

    # -- processes ------------------------------------------------------------------------

    def crash(self, gen: _Generation) -> None:
        """Kill ``gen`` now and start the next process (it recovers when the lease expires)."""
        self.crashes += 1
        gen.kill()
        task = asyncio.get_running_loop().create_task(self.spawn(),
                                                      context=self.harness_context)
        self.spawning.add(task)
        task.add_done_callback(self.spawning.discard)

    async def spawn(self) -> _Generation:
        gen = _Generation(len(self.generations) + 1)
        self.generations.append(gen)
        h = self.harness
        transport = MemoryTransport(self.broker) if h._needs_transport(self.saga) else None
        orch = Orchestrator(
            _FencedStore(self.store, gen), sagas=[self.saga], listeners=[self, *h.listeners],
            clock=self.clock, lease_seconds=h.lease_seconds, poll_interval=h.poll_interval,
            worker_id=f"harness-process-{gen.number}", transport=transport,
            run_ids=lambda: self.planned_id, **h.orchestrator_options,
        )
        gen.orchestrator = orch
        await self.in_generation(gen, orch.open())
        return gen

    async def in_generation(self, gen: _Generation, coro: Coroutine[Any, Any, Any]) -> Any:
        ctx = contextvars.copy_context()
        ctx.run(_GENERATION.set, gen)
        task = asyncio.get_running_loop().create_task(coro, context=ctx)
        await asyncio.wait([task])
        if task.cancelled():
            return None
        return task.result()

    def live(self) -> _Generation | None:
        alive = [g for g in self.generations if not g.dead]
        return alive[-1] if alive else None

    # -- the ledger -------------------------------------------------------------------------

    def record(self, gen: _Generation, run_id: str, step: str, compensating: bool,
               attempt: int, kind: Any, outcome: CallOutcome, *, effect: bool, key: str
               ) -> Call:
        call = Call(len(self.calls), self.clock.now(), gen.number, run_id, step, compensating,
                    attempt, key, kind, outcome, effect)
        self.calls.append(call)
        return call

    def replace(self, call: Call, outcome: CallOutcome, effect: bool) -> None:
        self.calls[call.seq] = Call(call.seq, call.at, call.generation, call.run_id, call.step,
                                    call.compensating, call.attempt, call.key, call.kind,
                                    outcome, effect)

    def fill_sent_keys(self) -> None:
        """Give each command the harness saw go out the key its message really carried."""
        sent: dict[tuple[str, str, str], str] = {}
        for message in self.store.messages:
            try:
                doc = json.loads(message.body)
                key = str(doc.get("idempotency_key") or "")
                _, step, kind, attempt = str(doc["correlation_id"]).rsplit(":", 3)
            except (ValueError, KeyError, TypeError):
                continue  # not a command (a domain event)
            sent[(step, kind, attempt)] = key
        for call in list(self.calls):
            if call.outcome == "sent":
                kind = "compensation" if call.compensating else "action"
                key = sent.get((call.step, kind, str(call.attempt)), "(no message written)")
                self.calls[call.seq] = Call(call.seq, call.at, call.generation, call.run_id,
                                            call.step, call.compensating, call.attempt, key,
                                            call.kind, call.outcome, call.effect)

    async def effect_applied(self, gen: _Generation, call: Call) -> None:
        """An effect just applied: crash here if the schedule says so."""
        self.effects += 1
        if self.schedule.crash_after_effect == self.effects and not self.crashes:
            self.replace(call, "crashed", True)
            self.crash(gen)
            await _forever()


# -- wrapping steps -------------------------------------------------------------------------


def _placeholder(ctx: StepContext, data: Any) -> None:
    """Registered first, then replaced, so a copied step may hold any kind of action."""


def _is_function(fn: Any) -> bool:
    """A function the harness can call in-process (not a Command or HTTP marker)."""
    if fn is None:
        return False
    return not type(fn).__module__.startswith("sagaway.definition")


async def _call_user(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


class _Invoker:
    """The function the harness puts in place of one step's action or compensation."""

    def __init__(self, trace: _Trace, step: Step, *, compensating: bool,
                 real: Callable[..., Any] | None, fake: Fake | None) -> None:
        self.trace = trace
        self.step = step
        self.compensating = compensating
        self.real = real
        self.fake = fake
        self.__name__ = f"{step.name}_{'compensation' if compensating else 'action'}"

    def function(self) -> Callable[..., Coroutine[Any, Any, Any]]:
        """A plain ``async def`` (the runtime awaits those on the loop, not on a thread)."""

        async def invoke(ctx: StepContext, data: Any, *rest: Any) -> Any:
            return await self(ctx, data, *rest)

        invoke.__name__ = invoke.__qualname__ = self.__name__
        return invoke

    def _timeout(self) -> float | None:
        return self.step.compensation_timeout if self.compensating else self.step.timeout

    async def __call__(self, ctx: StepContext, data: Any, *rest: Any) -> Any:
        trace = self.trace
        gen = _GENERATION.get()
        if gen is None or gen.dead:
            await _forever()
        assert gen is not None
        kind: Any = "fake" if self.fake is not None else "local"
        behaviour = self._injected(ctx)
        if behaviour is None and self.fake is not None:
            behaviour = self.fake.behaviour(ctx.idempotency_key, compensating=self.compensating)
        if behaviour == "fail":
            trace.record(gen, ctx.run_id, self.step.name, self.compensating, ctx.attempt, kind,
                         "failed", effect=False, key=ctx.idempotency_key)
            raise InjectedFailure(self.fake.error() if self.fake else
                                  f"{self.step.name} failed (injected)")
        if behaviour == "timeout":
            trace.record(gen, ctx.run_id, self.step.name, self.compensating, ctx.attempt, kind,
                         "timed_out", effect=False, key=ctx.idempotency_key)
            timeout = self._timeout()
            if timeout is None:
                raise TimeoutError(f"{self.step.name}: no answer (injected)")
            await asyncio.sleep(timeout * 2 + 1)
            raise TimeoutError(f"{self.step.name}: no answer (injected)")
        call = trace.record(gen, ctx.run_id, self.step.name, self.compensating, ctx.attempt,
                            kind, "ok", effect=True, key=ctx.idempotency_key)
        try:
            result = await self._apply(ctx, data, *rest)
        except asyncio.CancelledError:
            trace.replace(call, "cut", True)
            raise
        except TimeoutError:
            trace.replace(call, "timed_out", True)
            raise
        except Exception:
            trace.replace(call, "failed", False)
            raise
        await trace.effect_applied(gen, call)
        if behaviour == "effect_lost":
            trace.replace(call, "effect_lost", True)
            timeout = self._timeout()
            if timeout is None:
                raise TimeoutError(f"{self.step.name}: the reply was lost (injected)")
            await asyncio.sleep(timeout * 2 + 1)
            raise TimeoutError(f"{self.step.name}: the reply was lost (injected)")
        return result

    def _injected(self, ctx: StepContext) -> Any:
        fault = next((f for f in self.trace.faults if f.step == self.step.name
                      and f.compensation == self.compensating), None)
        if fault is None:
            return None
        # After the pivot a step is retried until it succeeds: fail it twice, not forever.
        if self.step.kind.value == "retriable" and not self.compensating and ctx.attempt > 2:
            return None
        return {"fails": "fail", "times_out": "timeout"}.get(fault.mode, "effect_lost")

    async def _apply(self, ctx: StepContext, data: Any, *rest: Any) -> Any:
        if self.fake is not None:
            if self.compensating:
                self.fake.undo(ctx.idempotency_key, ctx.run_id)
                return None
            return self.fake.apply(ctx.idempotency_key, ctx.run_id)
        assert self.real is not None
        if not self.trace.schedule.double_invoke:
            return await _call_user(self.real, ctx, data, *rest)
        return await self._twice(ctx, data, *rest)

    async def _twice(self, ctx: StepContext, data: Any, *rest: Any) -> Any:
        """Double-invoke mode: a second invocation with the same key must change nothing."""
        assert self.real is not None
        state = self.trace.state
        what = "compensation" if self.compensating else "action"
        first = await _call_user(self.real, ctx, data, *rest)
        after_first = copy.deepcopy(state()) if state is not None else None
        try:
            second = await _call_user(self.real, ctx, data, *rest)
        except Exception as exc:
            self.trace.notes.append((self.step.name, (
                f"{what} of {self.step.name!r} is not idempotent: invoked again with the same "
                f"key {ctx.idempotency_key!r} it raised {type(exc).__name__}: {exc}")))
            return first
        if state is not None:
            after_second = state()
            if after_second != after_first:
                self.trace.notes.append((self.step.name, (
                    f"{what} of {self.step.name!r} is not idempotent: invoked again with the "
                    f"same key {ctx.idempotency_key!r} it changed the state from "
                    f"{after_first!r} to {after_second!r}")))
        elif second != first:
            self.trace.notes.append((self.step.name, (
                f"{what} of {self.step.name!r} is not idempotent: invoked again with the same "
                f"key {ctx.idempotency_key!r} it returned {second!r} instead of {first!r}")))
        return first


# -- the harness ---------------------------------------------------------------------------


class SagaHarness:
    """Run one saga definition in virtual time, with fakes, failures and crashes.

    Example::

        harness = SagaHarness(order)
        harness.fake("charge_payment").fails(times=2)
        outcome = harness.run({"order_id": 7})
        assert outcome.status is SagaStatus.COMPLETED and outcome.ok

    Args:
        saga: the definition (it is copied, never modified).
        lease_seconds: the orchestrators' lease, in virtual seconds: how long after a crash
            the next process takes the run over.
        poll_interval: how often (virtual seconds) workers look for runs to recover: a
            crashed process's run is taken over within lease_seconds + poll_interval.
        max_virtual_seconds: a run that has not ended after this long counts as stuck.
        listeners: more listeners for the orchestrators (your metrics, your assertions).
        orchestrator_options: more keyword arguments for every ``Orchestrator`` the harness
            builds (e.g. ``reply_to`` or ``max_payload_bytes``).
    """

    def __init__(self, saga: Saga, *, lease_seconds: float = 10.0, poll_interval: float = 5.0,
                 max_virtual_seconds: float = DEFAULT_MAX_VIRTUAL_SECONDS,
                 listeners: Iterable[Listener] = (),
                 orchestrator_options: Mapping[str, Any] | None = None) -> None:
        if not isinstance(saga, Saga):
            raise DefinitionError(f"SagaHarness needs a Saga definition, got {saga!r}")
        saga.validate()
        self.saga = saga
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.max_virtual_seconds = max_virtual_seconds
        self.listeners = list(listeners)
        self.orchestrator_options = dict(orchestrator_options or {})
        self.fakes: dict[str, Fake] = {}
        self.services: list[Callable[[MemoryTransport], Any]] = []
        self._runs: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<SagaHarness {self.saga.name} fakes={sorted(self.fakes)}>"

    def fake(self, step: str) -> Fake:
        """The fake participant for ``step`` (created on first use), replacing its action
        and compensation whatever their kind: local function, command or HTTP call."""
        if step not in {s.name for s in self.saga.steps}:
            known = ", ".join(s.name for s in self.saga.steps)
            raise DefinitionError(f"saga {self.saga.name!r} has no step {step!r} (steps: "
                                  f"{known})")
        if step not in self.fakes:
            self.fakes[step] = Fake(step)
        return self.fakes[step]

    def fake_all(self) -> SagaHarness:
        """Fake every step (the explorer then checks the definition, not your code)."""
        for s in self.saga.steps:
            self.fake(s.name)
        return self

    def service(self, factory: Callable[[MemoryTransport], Any]) -> None:
        """Run a participant for the saga's command steps in every harness run.

        ``factory(transport)`` returns an unopened :class:`~sagaway.participant.Participant`
        (build it with a fresh database each time); the harness opens it before the run and
        closes it after. It is another service, so the harness's crashes do not touch it.
        """
        self.services.append(factory)

    # -- running ------------------------------------------------------------------------------

    def run(self, input: Any = None, schedule: Schedule | None = None, *,
            state: StateFn | None = None) -> Outcome:
        """Run the saga once (in virtual time) and check the invariants.

        Args:
            input: the run's input.
            schedule: the failure and crash to inject (default: none).
            state: for double-invoke mode, a function returning a comparable snapshot of
                your participants' state (``lambda: dict(db)``).
        """
        return run_virtual(self.arun(input, schedule or Schedule(), state=state))

    async def arun(self, input: Any, schedule: Schedule, *, state: StateFn | None = None,
                   run_id: str | None = None) -> Outcome:
        """:meth:`run` on the running loop, which must be a ``VirtualTimeLoop``.

        ``run_id`` defaults to one derived from the saga, the input, the schedule and how
        many times this harness ran them: two calls are two runs, and a fresh harness
        replays the same ids.
        """
        from sagaway.testing.invariants import violations

        if run_id is None:
            key = stable_id(self.saga.name, self.saga.version, input, repr(schedule))
            seen = self._runs.get(key, 0)
            self._runs[key] = seen + 1
            run_id = stable_id(key, seen)

        self._check_reachable()
        loop = asyncio.get_running_loop()
        previous = loop.get_task_factory()
        loop.set_task_factory(_task_factory)  # type: ignore[arg-type]
        for fake in self.fakes.values():
            fake.reset()
        try:
            outcome = await self._execute(input, schedule, state, run_id)
        finally:
            loop.set_task_factory(previous)
        outcome.violations = violations(self.saga, outcome)
        return outcome

    async def _execute(self, input: Any, schedule: Schedule, state: StateFn | None,
                       run_id: str) -> Outcome:
        clock = VirtualClock()
        started = clock.now()
        trace = _Trace(self, schedule, clock, state, run_id)
        services = []
        for factory in self.services:
            participant = factory(MemoryTransport(trace.broker))
            await participant.open()
            services.append(participant)
        try:
            first = await trace.spawn()
            assert first.orchestrator is not None
            await trace.in_generation(first, first.orchestrator.start(self.saga.name, input))
            ended = True
            try:
                async with asyncio.timeout(self.max_virtual_seconds):
                    await trace.finished.wait()
            except TimeoutError:
                ended = False
            if schedule.double_invoke and trace.run_id is not None:
                await self._undo_nothing(trace, input)
            run = await self._final(trace)
        finally:
            for gen in trace.generations:
                if gen.dead or gen.orchestrator is None:
                    gen.kill()
                    continue
                await trace.in_generation(gen, gen.orchestrator.aclose())
            for task in list(trace.spawning):
                task.cancel()
            for participant in services:
                await participant.aclose()
        trace.fill_sent_keys()
        fakes: dict[str, str] = {}
        if run is not None:
            fakes = {name: fake.state(run.id) for name, fake in self.fakes.items()}
        return Outcome(schedule, run, run.status if run else None, trace.calls,
                       trace.transitions, trace.effects, trace.crashes,
                       clock.now() - started, ended, notes=trace.notes, fakes=fakes)

    async def _final(self, trace: _Trace) -> SagaRun | None:
        if trace.run_id is None:
            return None
        reader = Orchestrator(trace.store, sagas=[trace.saga], worker=False, clock=trace.clock)
        await reader.open()
        try:
            return await reader.get(trace.run_id)
        finally:
            await reader.aclose()

    async def _undo_nothing(self, trace: _Trace, input: Any) -> None:
        """Double-invoke mode: compensations must tolerate steps whose action never ran."""
        assert trace.run_id is not None
        # Steps that took no effect and were not compensated by the run itself.
        touched = {c.step for c in trace.calls if c.effect or c.compensating}
        for step in self.saga.steps:
            fn = step.compensation_fn
            if step.name in touched or step.name in self.fakes or not _is_function(fn):
                continue
            assert fn is not None
            ctx = StepContext(run_id=trace.run_id, saga=self.saga.name, step=step.name,
                              attempt=1,
                              idempotency_key=f"{trace.run_id}:{step.name}:compensation",
                              results={}, input=input, compensating=True)
            before = copy.deepcopy(trace.state()) if trace.state is not None else None
            try:
                await _call_user(fn, ctx, input, None)
            except Exception as exc:
                trace.notes.append((step.name, (
                    f"compensation of {step.name!r} fails when its action never ran (nothing "
                    f"to undo): {type(exc).__name__}: {exc}")))
                continue
            if trace.state is not None and trace.state() != before:
                trace.notes.append((step.name, (
                    f"compensation of {step.name!r} changed the state although its action "
                    f"never ran (nothing to undo): {before!r} became {trace.state()!r}")))

    # -- the definition copy ----------------------------------------------------------------

    def _needs_transport(self, saga: Saga) -> bool:
        return bool(saga.events) or any(
            isinstance(s.action, Command) or isinstance(s.compensation_fn, Command)
            for s in saga.steps)

    def _check_reachable(self) -> None:
        """Steps that are neither faked, local, nor commands cannot run in virtual time."""
        for s in self.saga.steps:
            if s.name in self.fakes:
                continue
            for fn in (s.action, s.compensation_fn):
                if fn is not None and not _is_function(fn) and not isinstance(fn, Command):
                    raise HarnessError(
                        f"step {s.name!r} is a {type(fn).__name__} ({getattr(fn, '__name__', fn)})"
                        f": the harness runs in virtual time and cannot wait on a real network;"
                        f" fake it with harness.fake({s.name!r}) (or fakes='all')")

    def _instrument(self, trace: _Trace) -> Saga:
        """A copy of the definition whose steps report to ``trace``."""
        src = self.saga
        out = Saga(src.name, version=src.version, description=src.description)
        for s in src.steps:
            fake = self.fakes.get(s.name)
            action: Any = s.action
            if fake is not None or _is_function(action):
                action = _Invoker(trace, s, compensating=False,
                                  real=None if fake else action, fake=fake).function()
            new = out.step(name=s.name, retry=s.declared_retry, timeout=s.timeout,
                           pivot=s.pivot, retriable=s.declared_retriable,
                           read_only=s.read_only)(_placeholder)
            new.action = action  # a marker (command, HTTP call) need not be callable
            # Whatever else a step carries (policies, and fields other step kinds add).
            for attr, value in vars(s).items():
                if attr not in ("saga", "action", "compensation_fn", "kind"):
                    setattr(new, attr, value)
            comp = s.compensation_fn
            if comp is not None and (fake is not None or _is_function(comp)):
                comp = _Invoker(trace, s, compensating=True, real=None if fake else comp,
                                fake=fake).function()
            new.compensation_fn = comp
        for stage in src.stages:
            if len(stage) > 1:
                out.parallel(*(out[s.name] for s in stage))
        if src.events and src.events_destination:
            out.events = dict(src.events)
            out.events_destination = src.events_destination
        out.validate()
        return out

