"""How the tracker turns a flow's events into a run record. Pure: no I/O, no clock.

A run's status is a function of the **set** of events seen (and which failure came first),
not of their order, so events that overtake each other on the way (each consumer has its own
queue, and an outbox relays rows concurrently) project to the same record:

* a ``compensation_failure`` event seen → FAILED (an operator settles it);
* every ``completed`` event seen, and every event on the way to them (the start, each
  step's success), and no failure → COMPLETED;
* a failure seen → COMPENSATING, then COMPENSATED once every step the flow undoes after
  that failure has emitted its ``compensated`` event and the events that led to the failing
  step have been seen too (see :meth:`Choreography.required_for_end`);
* otherwise RUNNING.

The state document has the engine's shape (``status``, ``steps`` with each step's status and
result), so every reader renders it like an orchestrated run's, plus a ``choreography``
section: the events seen (type and envelope id, in arrival order), when the last one came,
and whether the run was reported stuck.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sagaway.choreography.flow import Choreography, FlowStep
from sagaway.engine.state import RunState, StepState, StepStatus
from sagaway.run import HistoryEntry, SagaStatus

__all__ = ["MAX_IGNORED", "Projection", "awaited", "project", "stuck_reason"]

MAX_IGNORED = 100
"""Envelope ids of ignored events remembered per run (so a redelivery is not logged twice)."""

_MAX_ERROR = 2000


@dataclass(frozen=True, slots=True)
class Projection:
    """A run record after one event."""

    state: dict[str, Any]
    status: SagaStatus
    error: str | None
    entries: list[HistoryEntry]
    """Timeline lines this event adds (empty: a duplicate, nothing to write)."""


def _section(state: dict[str, Any] | None) -> dict[str, Any]:
    section = dict((state or {}).get("choreography") or {})
    section.setdefault("events", [])
    section.setdefault("ignored", [])
    return section


def _error_of(payload: Any) -> str | None:
    if isinstance(payload, dict) and payload.get("error") is not None:
        text = str(payload["error"])
        return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 1] + "…"
    return None


def project(
    flow: Choreography,
    state: dict[str, Any] | None,
    *,
    event: str,
    event_id: str,
    payload: Any,
    at: float,
    received_at: float,
) -> Projection:
    """The run after the event ``event`` (envelope ``event_id``, sent ``at``).

    ``state`` is the run's state document (None for a new run). A repeated envelope id adds
    nothing; another envelope of an event type already seen, or an event not in the flow,
    adds an ``event.ignored`` line.
    """
    section = _section(state)
    seen_events: list[list[Any]] = [list(e) for e in section["events"]]
    ignored: list[str] = list(section["ignored"])
    old = RunState.from_json(state) if state else RunState(status=SagaStatus.RUNNING)
    old_status = SagaStatus(old.status) if state else SagaStatus.PENDING

    def done(entries: list[HistoryEntry], status: SagaStatus, error: str | None
             ) -> Projection:
        new_section = dict(section, events=seen_events, ignored=ignored[-MAX_IGNORED:],
                           last_event_at=received_at, flow=flow.name)
        if entries and not (len(entries) == 1 and entries[0].kind == "event.ignored"):
            new_section["stuck"] = False
        doc = _state_doc(flow, seen_events, status, error)
        doc["choreography"] = new_section
        return Projection(doc, status, error, entries)

    if any(e[1] == event_id for e in seen_events) or event_id in ignored:
        return Projection(dict(state or {}), old_status, (state or {}).get("error"), [])
    producer = flow.producer(event)
    if producer is None or any(e[0] == event for e in seen_events):
        ignored.append(event_id)
        reason = (f"{event!r} is not an event of choreography {flow.name!r}"
                  if producer is None else f"{event!r} was seen before (another message)")
        entry = HistoryEntry(at=at, kind="event.ignored",
                             data={"event": event, "id": event_id, "reason": reason})
        status = old_status if state else SagaStatus.RUNNING
        return done([entry], status, (state or {}).get("error"))

    step, role = producer
    # Only a success event's payload is kept: it is the step's result.
    seen_events.append([event, event_id, _error_of(payload),
                        payload if role == "success" else None])
    entries = [_entry(flow, step, role, event, event_id, payload, at)]
    status, error = _status(flow, seen_events)
    if status is not old_status and status is SagaStatus.COMPENSATING:
        entries.append(HistoryEntry(at=at, kind="run.compensating",
                                    data={"reason": error or f"{event} was emitted"}))
    entries.extend(_started(flow, event, {e[0] for e in seen_events}, at))
    if status is not old_status and status.finished:
        data: dict[str, Any] = {"status": status.value}
        if error:
            data["error"] = error
        entries.append(HistoryEntry(at=at, kind="run.finished", data=data))
    return done(entries, status, error)


def _started(flow: Choreography, event: str, types: set[str], at: float
             ) -> list[HistoryEntry]:
    """The steps ``event`` sets going: actions it starts and compensations it triggers
    (unless their outcome overtook it). A step starts when its trigger is emitted; the time
    it spends in its service's queue counts as part of the step, as a command's does."""
    out: list[HistoryEntry] = []
    for step in flow.steps:
        outcomes = {step.success, step.failure} - {None}
        if step.on == event and not outcomes & types:
            out.append(HistoryEntry(at=at, kind="step.started", step=step.name, attempt=1,
                                    data={"on": event}))
        undo = {step.compensated, step.compensation_failure} - {None}
        if event in step.compensate_on and step.success in types and not undo & types:
            out.append(HistoryEntry(at=at, kind="compensation.started", step=step.name,
                                    attempt=1, data={"on": event}))
    return out


def _entry(flow: Choreography, step: FlowStep | None, role: str, event: str, event_id: str,
           payload: Any, at: float) -> HistoryEntry:
    data: dict[str, Any] = {"event": event, "id": event_id}
    error = _error_of(payload)
    if role == "start":
        return HistoryEntry(at=at, kind="run.started",
                            data={"saga": flow.name, "version": flow.version, **data})
    assert step is not None
    if error and role in ("failure", "compensation_failure"):
        data["error"] = error
    kind = {"success": "step.succeeded", "failure": "step.failed",
            "compensated": "compensation.succeeded",
            "compensation_failure": "compensation.failed"}[role]
    # attempt=1: a choreographed step is one attempt as far as the tracker can see (its
    # service's redeliveries are the broker's); it pairs each outcome with its start.
    return HistoryEntry(at=at, kind=kind, step=step.name, attempt=1, data=data)


def _status(flow: Choreography, seen: list[list[Any]]) -> tuple[SagaStatus, str | None]:
    types = {e[0] for e in seen}
    first_failure: list[Any] | None = None
    for e in seen:
        producer = flow.producer(e[0])
        if producer is None:
            continue
        step, role = producer
        if role == "compensation_failure":
            assert step is not None
            return SagaStatus.FAILED, (
                f"compensation of {step.name!r} failed ({e[0]}): {e[2] or 'no reason given'}"
            )
        if role == "failure" and first_failure is None:
            first_failure = e
    if first_failure is not None:
        producer = flow.producer(first_failure[0])
        assert producer is not None and producer[0] is not None
        failed = producer[0]
        error = f"{failed.name} failed ({first_failure[0]})"
        if first_failure[2]:
            error += f": {first_failure[2]}"
        done = flow.required_for_end(first_failure[0]) <= types
        return (SagaStatus.COMPENSATED if done else SagaStatus.COMPENSATING), error
    if flow.required_for_end() <= types:
        return SagaStatus.COMPLETED, None
    return SagaStatus.RUNNING, None


def _state_doc(flow: Choreography, seen: list[list[Any]], status: SagaStatus,
               error: str | None) -> dict[str, Any]:
    types = {e[0]: e for e in seen}
    run = RunState(status=status, error=error)
    for step in flow.steps:
        s = StepState()
        if step.on in types:
            s.status, s.attempts = StepStatus.RUNNING, 1
        if step.success in types:
            s.status, s.succeeded, s.attempts = StepStatus.SUCCEEDED, True, 1
            s.result = types[step.success][3]
        if step.failure and step.failure in types:
            s.status, s.attempts = StepStatus.FAILED, 1
            s.error = types[step.failure][2]
        if s.succeeded and any(e in types for e in step.compensate_on):
            s.status, s.compensation_attempts = StepStatus.COMPENSATING, 1
        if step.compensated and step.compensated in types:
            s.status, s.compensation_attempts = StepStatus.COMPENSATED, 1
        if step.compensation_failure and step.compensation_failure in types:
            s.status = StepStatus.COMPENSATING
            s.error = types[step.compensation_failure][2]
        run.steps[step.name] = s
    return run.to_json()


def awaited(flow: Choreography, state: dict[str, Any]) -> list[tuple[FlowStep, tuple[str, ...]]]:
    """The steps the run waits on, each with the events that would move it on."""
    types = {e[0] for e in _section(state)["events"]}
    status = SagaStatus(state.get("status", SagaStatus.RUNNING.value))
    out: list[tuple[FlowStep, tuple[str, ...]]] = []
    if status is SagaStatus.COMPENSATING:
        for step in flow.steps:
            if (step.compensated and step.compensated not in types
                    and any(e in types for e in step.compensate_on)):
                out.append((step, (step.compensated,)))
        return out
    for step in flow.steps:
        outcomes = (step.success,) + ((step.failure,) if step.failure else ())
        if step.on in types and not any(e in types for e in outcomes):
            out.append((step, outcomes))
    if not types & {flow.start} and not out:
        first = [s for s in flow.steps if s.on == flow.start]
        out = [(s, (s.success,) + ((s.failure,) if s.failure else ())) for s in first]
    return out


def stuck_reason(flow: Choreography, state: dict[str, Any], silent_for: float) -> str:
    """Why a run is reported stuck: how long it has been silent and what it waits for."""
    section = _section(state)
    last = section["events"][-1][0] if section["events"] else None
    waits = awaited(flow, state)
    what = "; ".join(
        f"{step.service} ({' or '.join(events)})" for step, events in waits
    ) or "an event the flow does not name"
    after = f" after {last}" if last else ""
    return (f"stuck: no event for {silent_for:.0f}s{after} (deadline {flow.deadline:g}s); "
            f"waiting for {what}")
