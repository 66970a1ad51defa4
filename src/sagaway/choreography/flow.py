"""A choreography written down once: the events, who reacts to them, and what undoes what.

Pure data, no I/O. A :class:`Choreography` is validated when it is built (a typed
:class:`~sagaway.errors.DefinitionError` naming the fix), and everything else reads it: the
services (which events they react to, where their events go), the tracker (which event means
what for the run's status) and the drawing.

::

    flow = Choreography(
        "order",
        start="OrderCreated",
        steps=[
            FlowStep("reserve_stock", service="inventory", on="OrderCreated",
                     success="StockReserved", failure="StockRejected",
                     compensate_on=("PaymentFailed", "PaymentRefunded"),
                     compensated="StockReleased"),
            FlowStep("charge_payment", service="payment", on="StockReserved",
                     success="PaymentCharged", failure="PaymentFailed",
                     compensate_on="ShippingFailed", compensated="PaymentRefunded"),
            FlowStep("arrange_shipping", service="shipping", on="PaymentCharged",
                     success="ShippingArranged", failure="ShippingFailed"),
        ],
        deadline=30.0,
    )

**Topology.** Every consumer of a flow has its own durable queue, ``{prefix}.{service}``,
and the tracker has ``{prefix}.tracker``. An event is written to the emitting service's
outbox once per consumer (services whose steps start on it, are undone by it, or who are
notified of it; and the tracker), in the same transaction as the business change. So every
transport (RabbitMQ, NATS JetStream, Redis Streams, memory) carries choreography unchanged,
a consumer that is down finds its events waiting in its own queue, and one consumer's
backlog never holds back another.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sagaway.errors import DefinitionError

__all__ = ["TRACKER", "Choreography", "FlowStep", "Reaction"]

TRACKER = "tracker"
"""The name of the tracker's queue in a flow: ``{prefix}.tracker``."""

_WORD = re.compile(r"[A-Za-z0-9_-]+")
_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")

Role = Literal["action", "compensation", "notify"]


def _names(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclass(frozen=True, slots=True, init=False)
class FlowStep:
    """One step of a choreography: a service reacts to an event and reports its outcome.

    Args:
        name: the step's name (shown in the timeline, like an orchestrated step's).
        service: the service that carries it out.
        on: the event that starts it (the flow's start event, or another step's success).
        success: the event the service emits when the step is done.
        failure: the event it emits when it refuses (a business "no"; its changes are rolled
            back). ``None``: the step cannot fail (its handler is retried until it succeeds).
        compensate_on: the event(s) on which the service undoes the step.
        compensated: the event it emits once the step is undone.
        compensation_failure: the event it emits when undoing is impossible (the run ends
            FAILED, for an operator). ``None``: the compensation is retried until it succeeds.
    """

    name: str
    service: str
    on: str
    success: str
    failure: str | None
    compensate_on: tuple[str, ...]
    compensated: str | None
    compensation_failure: str | None

    def __init__(
        self,
        name: str,
        *,
        service: str,
        on: str,
        success: str,
        failure: str | None = None,
        compensate_on: str | Iterable[str] | None = None,
        compensated: str | None = None,
        compensation_failure: str | None = None,
    ) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "service", service)
        object.__setattr__(self, "on", on)
        object.__setattr__(self, "success", success)
        object.__setattr__(self, "failure", failure)
        object.__setattr__(self, "compensate_on", _names(compensate_on))
        object.__setattr__(self, "compensated", compensated)
        object.__setattr__(self, "compensation_failure", compensation_failure)

    @property
    def can_fail(self) -> bool:
        return self.failure is not None

    @property
    def compensatable(self) -> bool:
        return self.compensated is not None


@dataclass(frozen=True, slots=True)
class Reaction:
    """What one service does with one event of a flow."""

    event: str
    role: Role
    """``action`` (a step starts), ``compensation`` (a step is undone) or ``notify``."""
    step: FlowStep | None
    """The step it carries out or undoes (None for ``notify``)."""
    emits: tuple[str, ...]
    """The events it may emit: success first, then failure (empty for ``notify``)."""

    @property
    def default_event(self) -> str | None:
        """The event a handler that returns normally emits."""
        return self.emits[0] if self.emits else None

    @property
    def failure_event(self) -> str | None:
        """The event a handler that raises NonRetryableError emits (None: it is retried)."""
        return self.emits[1] if len(self.emits) > 1 else None


@dataclass(frozen=True, slots=True)
class _Producer:
    step: FlowStep | None  # None: the flow's start event
    role: Literal["start", "success", "failure", "compensated", "compensation_failure"]


@dataclass(slots=True)
class Choreography:
    """A choreographed saga, written down once and validated.

    Args:
        name: the flow's name; its runs are listed under it (``sagaway runs --saga NAME``).
            Don't give an orchestrated saga in the same store the same name.
        start: the event that starts a run (emitted by whoever starts the saga).
        steps: the steps, each a :class:`FlowStep`.
        completed: the event(s) that end a run COMPLETED, all of them needed (default: the
            success events of the steps whose success starts no other step).
        deadline: seconds without an event after which the tracker reports a run as stuck.
        version: the flow's version, recorded on each run.
        notify: services that react to events without carrying out a step (an order
            service marking an order confirmed): ``{"orders": ("ShippingArranged", …)}``.
        prefix: the first part of the flow's queue names (default ``name``).

    Raises:
        DefinitionError: the flow is malformed; the message says what to change.
    """

    name: str
    start: str
    steps: Sequence[FlowStep]
    completed: str | Sequence[str] | None = None
    deadline: float = 60.0
    version: int = 1
    notify: Mapping[str, Sequence[str]] = field(default_factory=dict)
    prefix: str | None = None
    _producers: dict[str, _Producer] = field(init=False, repr=False)
    _by_name: dict[str, FlowStep] = field(init=False, repr=False)
    _reactions: dict[str, dict[str, Reaction]] = field(init=False, repr=False)
    _subscribers: dict[str, tuple[str, ...]] = field(init=False, repr=False)
    _completed: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.steps = tuple(self.steps)
        self.notify = {k: _names(v) for k, v in dict(self.notify).items()}
        self._validate_shape()
        self._producers = self._index_producers()
        self._by_name = {s.name: s for s in self.steps}
        self._validate_events()
        self._validate_reachable()
        self._completed = self._resolve_completed()
        self._validate_compensations()
        self._reactions = self._index_reactions()
        self._subscribers = self._index_subscribers()

    # -- validation -------------------------------------------------------------------------

    def _validate_shape(self) -> None:
        if not isinstance(self.name, str) or not _WORD.fullmatch(self.name):
            raise DefinitionError(
                f"choreography name {self.name!r}: use letters, digits, '_' and '-' "
                f"(such as 'order')"
            )
        prefix = self.name if self.prefix is None else self.prefix
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix) or len(prefix) > 150:
            raise DefinitionError(
                f"choreography {self.name!r}: prefix {prefix!r} must be dot-separated words of "
                f"letters, digits, '_' and '-' (such as 'shop.order')"
            )
        if not self.steps:
            raise DefinitionError(f"choreography {self.name!r} has no steps: give it steps=[…]")
        if not isinstance(self.version, int) or isinstance(self.version, bool) \
                or self.version < 1:
            raise DefinitionError(
                f"choreography {self.name!r}: version must be an integer >= 1, "
                f"got {self.version!r}"
            )
        if isinstance(self.deadline, bool) or not isinstance(self.deadline, int | float) \
                or not self.deadline > 0:
            raise DefinitionError(
                f"choreography {self.name!r}: deadline must be a number of seconds > 0, "
                f"got {self.deadline!r}"
            )
        if not isinstance(self.start, str) or not self.start:
            raise DefinitionError(
                f"choreography {self.name!r}: start must name the event that starts a run"
            )
        seen: set[str] = set()
        for step in self.steps:
            if not isinstance(step, FlowStep):
                raise DefinitionError(
                    f"choreography {self.name!r}: steps must be FlowStep(...), got "
                    f"{type(step).__name__}"
                )
            where = f"choreography {self.name!r}, step {step.name!r}"
            if not isinstance(step.name, str) or not _WORD.fullmatch(step.name):
                raise DefinitionError(
                    f"choreography {self.name!r}: step name {step.name!r}: use letters, "
                    f"digits, '_' and '-'"
                )
            if step.name in seen:
                raise DefinitionError(
                    f"choreography {self.name!r} has two steps named {step.name!r}: rename one"
                )
            seen.add(step.name)
            self._check_service(step.service, where)
            for label, value in (("on", step.on), ("success", step.success),
                                 ("failure", step.failure), ("compensated", step.compensated),
                                 ("compensation_failure", step.compensation_failure),
                                 *(("compensate_on", e) for e in step.compensate_on)):
                if value is not None and (not isinstance(value, str) or not value):
                    raise DefinitionError(f"{where}: {label} must be an event name, "
                                          f"got {value!r}")
            if step.compensate_on and step.compensated is None:
                raise DefinitionError(
                    f"{where} is undone on {list(step.compensate_on)} but emits nothing when "
                    f"undone: give it compensated='<Event>' (the event that says it is undone)"
                )
            if step.compensated is not None and not step.compensate_on:
                raise DefinitionError(
                    f"{where} has compensated={step.compensated!r} but nothing undoes it: "
                    f"give it compensate_on=('<FailureEvent>', ...)"
                )
            if step.compensation_failure is not None and step.compensated is None:
                raise DefinitionError(
                    f"{where} has compensation_failure but no compensation: give it "
                    f"compensate_on=... and compensated=..."
                )
        for service, events in self.notify.items():
            self._check_service(service, f"choreography {self.name!r}, notify")
            if not events:
                raise DefinitionError(
                    f"choreography {self.name!r}: notify[{service!r}] lists no events"
                )

    def _check_service(self, service: object, where: str) -> None:
        if not isinstance(service, str) or not _WORD.fullmatch(service):
            raise DefinitionError(
                f"{where}: service {service!r} must be a word of letters, digits, '_' and '-' "
                f"(it names the service's queue)"
            )
        if service == TRACKER:
            raise DefinitionError(
                f"{where}: {TRACKER!r} is the tracker's queue; name the service otherwise"
            )

    def _index_producers(self) -> dict[str, _Producer]:
        producers: dict[str, _Producer] = {self.start: _Producer(None, "start")}

        def describe(p: _Producer) -> str:
            if p.step is None:
                return "the flow's start"
            return f"step {p.step.name!r} ({p.role})"

        for step in self.steps:
            for role, event in (("success", step.success), ("failure", step.failure),
                                ("compensated", step.compensated),
                                ("compensation_failure", step.compensation_failure)):
                if event is None:
                    continue
                new = _Producer(step, role)  # type: ignore[arg-type]
                if event in producers:
                    raise DefinitionError(
                        f"choreography {self.name!r}: event {event!r} is emitted by both "
                        f"{describe(producers[event])} and {describe(new)}; give each outcome "
                        f"its own event so the tracker can tell them apart"
                    )
                producers[event] = new
        return producers

    def _validate_events(self) -> None:
        known = sorted(self._producers)
        for step in self.steps:
            where = f"choreography {self.name!r}, step {step.name!r}"
            producer = self._producers.get(step.on)
            if producer is None:
                raise DefinitionError(
                    f"{where} starts on {step.on!r}, an unknown event (no step emits it): "
                    f"use the start event or another step's success event; known events: "
                    f"{known}"
                )
            if producer.role not in ("start", "success"):
                raise DefinitionError(
                    f"{where} starts on {step.on!r}, the {producer.role.replace('_', ' ')} "
                    f"event of step {producer.step.name if producer.step else '?'!r}: steps "
                    f"start on the start event or on another step's success event"
                )
            for event in step.compensate_on:
                producer = self._producers.get(event)
                if producer is None:
                    raise DefinitionError(
                        f"{where} is undone on {event!r}, an unknown event (no step emits it); "
                        f"known events: {known}"
                    )
                if producer.role not in ("failure", "compensated"):
                    raise DefinitionError(
                        f"{where} is undone on {event!r}, a {producer.role} event: a step is "
                        f"undone on a failure event or on another step's compensated event"
                    )
                if producer.step is step:
                    raise DefinitionError(f"{where} is undone on its own event {event!r}")
        for service, events in self.notify.items():
            for event in events:
                if event not in self._producers:
                    raise DefinitionError(
                        f"choreography {self.name!r}: notify[{service!r}] lists {event!r}, an "
                        f"unknown event; known events: {known}"
                    )

    def _starts(self, event: str) -> list[FlowStep]:
        return [s for s in self.steps if s.on == event]

    def _descendants(self, step: FlowStep) -> set[str]:
        found: set[str] = set()
        todo = [step.success]
        while todo:
            for nxt in self._starts(todo.pop()):
                if nxt.name not in found:
                    found.add(nxt.name)
                    todo.append(nxt.success)
        return found

    def _validate_reachable(self) -> None:
        reached: set[str] = set()
        todo = [self.start]
        while todo:
            for step in self._starts(todo.pop()):
                if step.name not in reached:
                    reached.add(step.name)
                    todo.append(step.success)
        for step in self.steps:
            if step.name not in reached:
                raise DefinitionError(
                    f"choreography {self.name!r}: step {step.name!r} is unreachable: it starts "
                    f"on {step.on!r}, which is never emitted on the way from {self.start!r} "
                    f"(a cycle?); start it on {self.start!r} or on a reachable step's success "
                    f"event"
                )

    def _resolve_completed(self) -> tuple[str, ...]:
        if self.completed is None:
            leaves = tuple(s.success for s in self.steps if not self._starts(s.success))
            return leaves
        events = _names(self.completed)
        if not events:
            raise DefinitionError(f"choreography {self.name!r}: completed names no event")
        for event in events:
            producer = self._producers.get(event)
            if producer is None or producer.role != "success":
                raise DefinitionError(
                    f"choreography {self.name!r}: completed event {event!r} is not the success "
                    f"event of a step; use one of "
                    f"{[s.success for s in self.steps]}"
                )
        return events

    def _validate_compensations(self) -> None:
        for step in self.steps:
            if step.failure is None:
                continue
            undone = {s.name for s in self.cascade(step.failure)}
            may_have_run = [
                s for s in self.steps
                if s is not step and s.name not in self._descendants(step)
            ]
            for other in may_have_run:
                if other.name in undone:
                    continue
                where = (f"choreography {self.name!r}: when step {step.name!r} fails "
                         f"({step.failure!r}), step {other.name!r} may already have taken effect")
                if not other.compensatable:
                    raise DefinitionError(
                        f"{where} and has no compensation: give {other.name!r} "
                        f"compensate_on=({step.failure!r},) and compensated='<Event>', or let "
                        f"{step.name!r} not fail (failure=None)"
                    )
                chain = [step.failure, *(s.compensated for s in self.cascade(step.failure))]
                raise DefinitionError(
                    f"{where} but nothing undoes it: add one of {chain} to the "
                    f"compensate_on of {other.name!r}"
                )

    def _index_reactions(self) -> dict[str, dict[str, Reaction]]:
        reactions: dict[str, dict[str, Reaction]] = {}

        def add(service: str, reaction: Reaction) -> None:
            mine = reactions.setdefault(service, {})
            if reaction.event in mine:
                names = [r.step.name if r.step else "notify"
                         for r in (mine[reaction.event], reaction)]
                raise DefinitionError(
                    f"choreography {self.name!r}: service {service!r} reacts to "
                    f"{reaction.event!r} twice ({names[0]!r} and {names[1]!r}); one handler "
                    f"per event and service: split the service or give the steps distinct "
                    f"events"
                )
            mine[reaction.event] = reaction

        for step in self.steps:
            emits = (step.success,) + ((step.failure,) if step.failure else ())
            add(step.service, Reaction(step.on, "action", step, emits))
            if step.compensated is not None:
                undo = (step.compensated,) + (
                    (step.compensation_failure,) if step.compensation_failure else ())
                for event in step.compensate_on:
                    add(step.service, Reaction(event, "compensation", step, undo))
        for service, events in self.notify.items():
            for event in events:
                add(service, Reaction(event, "notify", None, ()))
        return reactions

    def _index_subscribers(self) -> dict[str, tuple[str, ...]]:
        subs: dict[str, list[str]] = {event: [] for event in self._producers}
        for service, mine in self._reactions.items():
            for event in mine:
                subs[event].append(self.destination(service))
        tracker = self.destination(TRACKER)
        return {event: (*sorted(set(d)), tracker) for event, d in subs.items()}

    # -- reading the flow -------------------------------------------------------------------

    @property
    def events(self) -> list[str]:
        """Every event of the flow, start first."""
        return list(self._producers)

    @property
    def services(self) -> list[str]:
        """Every service that reacts to an event of the flow."""
        return sorted(self._reactions)

    @property
    def completed_events(self) -> tuple[str, ...]:
        """The events that together end a run COMPLETED."""
        return self._completed

    def step(self, name: str) -> FlowStep:
        """The step called ``name`` (KeyError if none)."""
        return self._by_name[name]

    def producer(self, event: str) -> tuple[FlowStep | None, str] | None:
        """(step, role) of the event: role is ``start``, ``success``, ``failure``,
        ``compensated`` or ``compensation_failure``; None for an event not in the flow."""
        p = self._producers.get(event)
        return None if p is None else (p.step, p.role)

    def reactions(self, service: str) -> dict[str, Reaction]:
        """What ``service`` does, by event.

        Raises:
            DefinitionError: the service takes no part in the flow.
        """
        mine = self._reactions.get(service)
        if mine is None:
            raise DefinitionError(
                f"service {service!r} takes no part in choreography {self.name!r}; its "
                f"services are {self.services}"
            )
        return dict(mine)

    def destination(self, consumer: str) -> str:
        """The queue of a consumer of the flow (a service, or :data:`TRACKER`)."""
        return f"{self.name if self.prefix is None else self.prefix}.{consumer}"

    @property
    def tracker_destination(self) -> str:
        return self.destination(TRACKER)

    def subscribers(self, event: str) -> tuple[str, ...]:
        """The queues an event is written to: every service reacting to it, then the
        tracker's. Empty for an event not in the flow."""
        return self._subscribers.get(event, ())

    def ancestors(self, step: FlowStep) -> list[FlowStep]:
        """The steps whose success started ``step``, nearest first (they all succeeded
        before it ran)."""
        chain: list[FlowStep] = []
        producer = self._producers.get(step.on)
        while producer is not None and producer.step is not None and producer.step not in chain:
            chain.append(producer.step)
            producer = self._producers.get(producer.step.on)
        return chain

    def required_for_end(self, failure: str | None = None) -> set[str]:
        """The events a run must have seen to be finished: with no failure, the start, the
        completed events and every success on the way to them; after ``failure``, the start,
        the successes that led to the failing step, and the compensations it sets off.

        The tracker waits for all of them, so an event overtaken on the way (each consumer
        has its own queue) still lands in the timeline before the run is finished.
        """
        needed = {self.start}
        if failure is None:
            needed.update(self._completed)
            for event in self._completed:
                step = self._producers[event].step
                assert step is not None
                needed.update(s.success for s in self.ancestors(step))
            return needed
        failed = self._producers[failure].step
        assert failed is not None
        needed.add(failure)
        needed.update(s.success for s in self.ancestors(failed))
        needed.update(s.compensated for s in self.cascade(failure) if s.compensated)
        return needed

    def cascade(self, failure: str) -> list[FlowStep]:
        """The steps undone, in order, once ``failure`` (a failure event) is emitted."""
        events = [failure]
        undone: list[FlowStep] = []
        i = 0
        while i < len(events):
            for step in self.steps:
                if events[i] in step.compensate_on and step not in undone:
                    undone.append(step)
                    assert step.compensated is not None
                    events.append(step.compensated)
            i += 1
        return undone

    # -- drawing ----------------------------------------------------------------------------

    def to_mermaid(self) -> str:
        """The flow as a Mermaid flowchart: events are rounded nodes, steps are boxes
        labelled with their service; failure paths are dashed, compensations dotted."""

        def ev(name: str) -> str:
            return "e_" + re.sub(r"[^A-Za-z0-9_]", "_", name)

        def st(step: FlowStep, suffix: str = "") -> str:
            return "s_" + re.sub(r"[^A-Za-z0-9_]", "_", step.name) + suffix

        lines = ["flowchart LR", f"  %% choreography {self.name} v{self.version}"]
        for event, producer in self._producers.items():
            shape = f'(["{event}"])'
            if producer.role == "start":
                shape = f'[/"{event}"/]'
            elif event in self._completed:
                shape = f'(["{event} ✔"])'
            lines.append(f"  {ev(event)}{shape}")
        for step in self.steps:
            lines.append(f'  {st(step)}["{step.name}<br/><i>{step.service}</i>"]')
            lines.append(f"  {ev(step.on)} --> {st(step)}")
            lines.append(f"  {st(step)} -->|ok| {ev(step.success)}")
            if step.failure:
                lines.append(f"  {st(step)} -.->|fails| {ev(step.failure)}")
            if step.compensated:
                undo = st(step, "_undo")
                lines.append(f'  {undo}{{{{"undo {step.name}<br/><i>{step.service}</i>"}}}}')
                for event in step.compensate_on:
                    lines.append(f"  {ev(event)} -.-> {undo}")
                lines.append(f"  {undo} -.->|undone| {ev(step.compensated)}")
                if step.compensation_failure:
                    lines.append(f"  {undo} -.->|fails| {ev(step.compensation_failure)}")
        for service, events in self.notify.items():
            node = "n_" + re.sub(r"[^A-Za-z0-9_]", "_", service)
            lines.append(f'  {node}[("{service}")]')
            for event in events:
                lines.append(f"  {ev(event)} -.-> {node}")
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        """The flow as plain text, one line per reaction (what ``draw --text`` prints)."""
        out = [f"choreography {self.name} v{self.version} (deadline {self.deadline:g}s)",
               f"  start: {self.start}"]
        for step in self.steps:
            line = f"  {step.name} [{step.service}]: on {step.on} -> {step.success}"
            if step.failure:
                line += f" | fails -> {step.failure}"
            out.append(line)
            if step.compensated:
                undo = (f"    undo on {' or '.join(step.compensate_on)} -> "
                        f"{step.compensated}")
                if step.compensation_failure:
                    undo += f" | fails -> {step.compensation_failure}"
                out.append(undo)
        for step in self.steps:
            if step.failure:
                chain = " -> ".join(s.name for s in self.cascade(step.failure)) or "nothing"
                out.append(f"  if {step.name} fails: undo {chain}")
        for service, events in self.notify.items():
            out.append(f"  {service} is notified of {', '.join(events)}")
        out.append(f"  completed: {' + '.join(self._completed)}")
        return "\n".join(out) + "\n"
