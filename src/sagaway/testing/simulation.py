"""Seeded simulation for message-driven sagas: a network that drops, duplicates, delays and
reorders commands and replies, in virtual time.

A :class:`FaultPlan` decides the fate of each message published (commands going out through
the orchestrator's outbox relay, replies coming back from participants): delivered, dropped,
duplicated, or delayed by some seconds (which reorders it behind later ones). A plan comes
from a seed (``FaultPlan.from_seed(7)``) or lists the faults outright
(``FaultPlan(faults=("deliver", "duplicate"))``); either way it prints as code, and
``simulate`` with the same plan replays the same run. :func:`fault_plans` is a Hypothesis
strategy over explicit plans, so Hypothesis shrinks a failing plan to the fewest faults.

Participants are your :class:`~sagaway.participant.Participant` s (each built on the
transport it is given) or :class:`FakeService` s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagaway.definition.saga import Saga
from sagaway.engine.listener import Listener, Transition
from sagaway.engine.relay import REPLY_TYPE
from sagaway.engine.runtime import Orchestrator
from sagaway.messaging.base import Delivery, Subscription, Transport
from sagaway.messaging.envelope import Envelope
from sagaway.messaging.memory import MemoryBroker, MemoryTransport
from sagaway.run import SagaRun, SagaStatus
from sagaway.testing.explorer import SafetyError
from sagaway.testing.harness import OrderedMemoryStore, stable_id
from sagaway.testing.virtual import VirtualClock, run_virtual

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = ["ChaosTransport", "FakeService", "FaultPlan", "SimulationReport",
           "assert_simulation_safe", "fault_plans", "seeds", "simulate"]

FAULTS = ("deliver", "drop", "duplicate", "delay_1", "delay_5", "delay_30")
"""What can happen to one message. ``delay_N`` delivers it N virtual seconds late."""


@dataclass(frozen=True)
class FaultPlan:
    """The fate of each published message, in publish order.

    Attributes:
        faults: explicit fates for the first messages (the rest are delivered).
        seed: with no explicit faults, fates are drawn from ``random.Random(seed)`` with
            the rates below.
        drop, duplicate, delay: the rates (0..1) used with a seed.
    """

    faults: tuple[str, ...] | None = None
    seed: int | None = None
    drop: float = 0.1
    duplicate: float = 0.1
    delay: float = 0.2

    def __post_init__(self) -> None:
        if self.faults is None and self.seed is None:
            object.__setattr__(self, "faults", ())
        for f in self.faults or ():
            if f not in FAULTS:
                raise ValueError(f"unknown fault {f!r}; use one of {FAULTS}")
        if not 0 <= self.drop + self.duplicate + self.delay <= 1:
            raise ValueError("drop + duplicate + delay must be within 0..1")

    @classmethod
    def from_seed(cls, seed: int, *, drop: float = 0.1, duplicate: float = 0.1,
                  delay: float = 0.2) -> FaultPlan:
        return cls(seed=seed, drop=drop, duplicate=duplicate, delay=delay)

    def __repr__(self) -> str:
        if self.faults is not None:
            return f"FaultPlan(faults={self.faults!r})"
        return (f"FaultPlan.from_seed({self.seed}, drop={self.drop}, "
                f"duplicate={self.duplicate}, delay={self.delay})")

    def fates(self) -> Callable[[], str]:
        """A function giving the next message's fate, each call."""
        if self.faults is not None:
            given = iter(self.faults)
            return lambda: next(given, "deliver")
        rng = random.Random(self.seed)

        def draw() -> str:
            x = rng.random()
            if x < self.drop:
                return "drop"
            if x < self.drop + self.duplicate:
                return "duplicate"
            if x < self.drop + self.duplicate + self.delay:
                return rng.choice(("delay_1", "delay_5", "delay_30"))
            return "deliver"

        return draw


class _Network:
    """The fates of every message on every chaos transport of one simulation."""

    def __init__(self, plan: FaultPlan) -> None:
        self.next_fate = plan.fates()
        self.log: list[str] = []
        self.pending: set[asyncio.Task[None]] = set()


class ChaosTransport(MemoryTransport):
    """A memory transport whose messages meet the simulation's :class:`FaultPlan`.

    A dropped message is confirmed to the publisher and then lost (a network that loses what
    the broker accepted is the worst case the engine must survive).
    """

    def __init__(self, broker: MemoryBroker, network: _Network) -> None:
        super().__init__(broker)
        self._network = network

    async def _publish(self, destination: str, body: bytes, *, message_id: str | None) -> None:
        net = self._network
        fate = net.next_fate()
        net.log.append(f"#{len(net.log)} {destination}: {_describe(body)} -> {fate}")
        if fate == "drop":
            return
        if fate.startswith("delay_"):
            seconds = float(fate.removeprefix("delay_"))

            async def later() -> None:
                await asyncio.sleep(seconds)
                await MemoryTransport._publish(self, destination, body, message_id=message_id)

            task = asyncio.get_running_loop().create_task(later())
            net.pending.add(task)
            task.add_done_callback(net.pending.discard)
            return
        await super()._publish(destination, body, message_id=message_id)
        if fate == "duplicate":
            await super()._publish(destination, body, message_id=message_id)


def _describe(body: bytes) -> str:
    try:
        env = Envelope.from_bytes(body)
    except Exception:
        return "?"
    what = "reply" if env.type == REPLY_TYPE else env.type
    return f"{what} {env.step or ''} {(env.idempotency_key or '').rsplit(':', 1)[-1]}".strip()


class FakeService:
    """A service that answers commands over a transport, for simulations.

    Args:
        service: the destination it consumes (the command step's ``service``).
        transport: the transport (the simulation passes a chaos transport).
        handlers: command type → ``fn(payload, key) -> result``; raise
            ``sagaway.NonRetryableError`` for a business "no".
        idempotent: keep an inbox (idempotency key → reply) and answer a repeated key with
            the recorded reply; ``False`` runs the handler on every delivery (a participant
            built without an inbox: what duplicates break).
        fence: a compensation also records its action's key as "not applied", so an action
            command that arrives after its compensation (delayed in the network) is refused
            rather than applied for good — as :class:`~sagaway.participant.Participant`
            does. ``False``: what late commands break.
    """

    def __init__(self, service: str, transport: Transport,
                 handlers: Mapping[str, Callable[[Any, str], Any]], *,
                 idempotent: bool = True, fence: bool = True) -> None:
        self.service = service
        self.transport = transport
        self.handlers = dict(handlers)
        self.idempotent = idempotent
        self.fence = fence
        self.inbox: dict[str, dict[str, Any]] = {}
        self._subscription: Subscription | None = None

    async def open(self) -> None:
        await self.transport.open()
        self._subscription = await self.transport.subscribe(self.service, self._on_command)

    async def aclose(self) -> None:
        if self._subscription is not None:
            await self._subscription.stop(grace=0.0)
        await self.transport.aclose()

    async def _on_command(self, delivery: Delivery) -> None:
        from sagaway.engine.runtime import NonRetryableError

        env = delivery.envelope
        key = env.idempotency_key or ""
        reply = self.inbox.get(key) if self.idempotent else None
        if reply is None and self.fence and key.endswith(":compensation"):
            action = key.removesuffix(":compensation") + ":action"
            self.inbox.setdefault(action, {"ok": False, "retryable": False,
                                           "error": "compensated before it was applied"})
        if reply is None:
            try:
                result = self.handlers[env.type](env.payload, key)
            except NonRetryableError as exc:
                reply = {"ok": False, "error": str(exc), "retryable": False}
            else:
                reply = {"ok": True, "result": result}
            self.inbox[key] = reply
        if env.reply_to:
            await self.transport.publish(env.reply_to, Envelope(
                type=REPLY_TYPE, payload=reply, run_id=env.run_id, step=env.step,
                idempotency_key=env.idempotency_key, correlation_id=env.correlation_id))


@dataclass
class SimulationReport:
    """What a simulation did: every run's end, the network log, and what broke."""

    plan: FaultPlan
    runs: list[SagaRun]
    messages: list[str]
    violations: list[str]
    virtual_seconds: float
    seconds: float
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def __str__(self) -> str:
        ends = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        lines = [f"simulation {self.plan!r}: {len(self.runs)} runs ({ends}), "
                 f"{len(self.messages)} messages, {len(self.violations)} violations "
                 f"({self.virtual_seconds:.0f} virtual s in {self.seconds:.2f} s)"]
        lines += [f"  - {v}" for v in self.violations]
        if self.violations:
            lines.append("  messages:")
            lines += [f"    {m}" for m in self.messages]
            lines.append(f"  replay: simulate(..., plan={self.plan!r})")
        return "\n".join(lines)


def assert_simulation_safe(report: SimulationReport) -> None:
    """Fail the test with the report (the plan to replay included) if anything broke."""
    if not report.ok:
        raise SafetyError("\n" + str(report))


class _Ends(Listener):
    def __init__(self) -> None:
        self.finished: set[str] = set()
        self.changed = asyncio.Event()

    def on_transition(self, transition: Transition) -> None:
        if transition.status.finished:
            self.finished.add(transition.run_id)
            self.changed.set()


def simulate(
    saga: Saga,
    inputs: Iterable[Any],
    *,
    services: Iterable[Callable[[Transport], Any]],
    plan: FaultPlan,
    check: Callable[[SimulationReport], Any] | None = None,
    max_virtual_seconds: float = 24 * 3600.0,
    lease_seconds: float = 10.0,
) -> SimulationReport:
    """Run one saga per input, concurrently, over a chaos network; check every run.

    Args:
        saga: a saga with command steps.
        inputs: one run per input.
        services: factories ``f(transport)`` of the participants (a
            :class:`~sagaway.participant.Participant` or a :class:`FakeService`), each given
            its own chaos transport on the shared broker.
        plan: what the network does to each message.
        check: called with the report once every run has ended; raise ``AssertionError`` if
            your participants' state is inconsistent (e.g. charged twice).

    Every run must end COMPLETED or COMPENSATED (a FAILED run whose pivot's outcome was left
    unknown is allowed: sagaway hands it to an operator by design).
    """
    return run_virtual(_simulate(saga, list(inputs), list(services), plan, check,
                                 max_virtual_seconds, lease_seconds))


async def _simulate(saga: Saga, inputs: list[Any], services: list[Callable[[Transport], Any]],
                    plan: FaultPlan, check: Callable[[SimulationReport], Any] | None,
                    max_virtual_seconds: float, lease_seconds: float) -> SimulationReport:
    started = time.perf_counter()
    clock = VirtualClock()
    begun = clock.now()
    broker = MemoryBroker()
    network = _Network(plan)
    participants = [factory(ChaosTransport(broker, network)) for factory in services]
    for p in participants:
        await p.open()
    ends = _Ends()
    new_ids = (stable_id(saga.name, saga.version, repr(plan), n) for n in itertools.count())
    orch = Orchestrator(OrderedMemoryStore(clock=clock), sagas=[saga], clock=clock,
                        run_ids=lambda: next(new_ids),
                        transport=ChaosTransport(broker, network), listeners=[ends],
                        lease_seconds=lease_seconds, poll_interval=1.0)
    violations: list[str] = []
    runs: list[SagaRun] = []
    try:
        await orch.open()
        handles = [await orch.start(saga.name, data) for data in inputs]
        ids = {h.id for h in handles}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_virtual_seconds):
                while not ids <= ends.finished:
                    ends.changed.clear()
                    await ends.changed.wait()
        runs = [await orch.get(h.id) for h in handles]
    finally:
        await orch.aclose()
        for task in list(network.pending):
            task.cancel()
        for p in participants:
            await p.aclose()
    statuses: dict[str, int] = {}
    for run in runs:
        statuses[run.status.value] = statuses.get(run.status.value, 0) + 1
        if not run.status.finished:
            violations.append(f"run {run.id} did not end: still {run.status.value} after "
                              f"{max_virtual_seconds:.0f} virtual seconds")
        elif run.status is SagaStatus.FAILED and "unknown outcome" not in (run.error or ""):
            violations.append(f"run {run.id} ended FAILED: {run.error}")
    report = SimulationReport(plan, runs, network.log, violations, clock.now() - begun,
                              time.perf_counter() - started, statuses)
    if check is not None and not violations:
        try:
            check(report)
        except AssertionError as exc:
            violations.append(f"check: {exc}")
    return report


def fault_plans(max_messages: int = 40) -> SearchStrategy[FaultPlan]:
    """A Hypothesis strategy over explicit :class:`FaultPlan` s (so failures shrink to the
    fewest faults), needs ``pip install sagaway[testing]``."""
    try:
        from hypothesis import strategies as st
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fault_plans() needs Hypothesis: pip install 'sagaway[testing]'"
                          ) from exc
    return st.lists(st.sampled_from(FAULTS), max_size=max_messages).map(
        lambda faults: FaultPlan(faults=tuple(faults)))


def seeds(*, drop: float = 0.1, duplicate: float = 0.1, delay: float = 0.2
          ) -> SearchStrategy[FaultPlan]:
    """A Hypothesis strategy over seeded plans: every message meets a fault at these rates
    (wide coverage of long runs; a failure shrinks only as far as its seed)."""
    from hypothesis import strategies as st

    return st.integers(min_value=0, max_value=2**32 - 1).map(
        lambda seed: FaultPlan.from_seed(seed, drop=drop, duplicate=duplicate, delay=delay))
