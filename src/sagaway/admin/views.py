"""How runs look in the admin API: summaries, the per-step view and the timeline.

Everything here reads the public snapshot (``SagaRun``) and the timeline it carries; the
per-step attempts and durations are derived from the history's timestamps, never from a
second record. Payload data is masked on the way through.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, cast

from sagaway import HistoryEntry, Saga, SagaRun, SagaStatus
from sagaway.admin.masking import Masker
from sagaway.admin.schemas import (
    Action,
    Attempt,
    IdempotencyKeys,
    RunDetail,
    RunSummary,
    StepSummary,
    TimelineEntry,
)
from sagaway.engine.decider import OPERATOR_ALLOWED

__all__ = ["ALLOWED", "detail", "iso", "summary"]

ALLOWED: Mapping[Action, tuple[SagaStatus, ...]] = {
    action: OPERATOR_ALLOWED[action] for action in ("retry", "resume", "compensate", "resolve")
}
"""Which statuses each action applies to: a hint for clients (which buttons to show, in
this order). The engine's own table; the orchestrator decides."""

_ACTIVE = (SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING)
_ENDINGS = {"succeeded": "succeeded", "failed": "failed", "interrupted": "interrupted"}
StepKindName = Literal["compensatable", "pivot", "retriable", "unknown"]


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def summary(run: SagaRun, masker: Masker, *, now: float, stuck_after: float,
            secrets: frozenset[str] | None = None) -> RunSummary:
    """A run as listings show it."""
    return RunSummary(**_summary_fields(run, masker, now=now, stuck_after=stuck_after,
                                        secrets=secrets))


def _summary_fields(run: SagaRun, masker: Masker, *, now: float, stuck_after: float,
                    secrets: frozenset[str] | None) -> dict[str, Any]:
    if secrets is None:
        secrets = masker.secrets(run.input, run.results)
    allowed: list[Action] = [] if run.request is not None else [
        action for action, statuses in ALLOWED.items() if run.status in statuses
    ]
    return {
        "id": run.id,
        "saga": run.saga,
        "version": run.version,
        "status": run.status,
        "created_at": run.created_at,
        "created": iso(run.created_at),
        "updated_at": run.updated_at,
        "updated": iso(run.updated_at),
        "error": None if run.error is None else masker.text(run.error, secrets),
        "start_key": run.idempotency_key,
        "owner": run.owner,
        "lease_expires": run.lease_expires,
        "wake_at": run.wake_at,
        "request": None if run.request is None else masker.data(run.request, secrets),
        "stuck": run.status in _ACTIVE and run.updated_at < now - stuck_after,
        "allowed_actions": allowed,
    }


def detail(run: SagaRun, masker: Masker, *, now: float, stuck_after: float,
           definition: Saga | None) -> RunDetail:
    """One run with payloads, the per-step view and the timeline, masked."""
    history_data = [h.data for h in run.history if h.data]
    secrets = masker.secrets(run.input, run.results, run.steps or {}, history_data)
    t0 = run.history[0].at if run.history else run.created_at
    timeline = [
        TimelineEntry(
            at=h.at, time=iso(h.at), offset_ms=_ms(h.at - t0), kind=h.kind, step=h.step,
            attempt=h.attempt,
            data=None if not h.data else masker.data(h.data, secrets),
        )
        for h in run.history
    ]
    finished = run.status.finished and run.request is None and bool(run.history)
    return RunDetail(
        **_summary_fields(run, masker, now=now, stuck_after=stuck_after, secrets=secrets),
        input=masker.data(run.input, secrets),
        results=masker.data(run.results, secrets),
        duration_ms=_ms(run.history[-1].at - t0) if finished else None,
        steps=[_mask_step(s, masker, secrets) for s in _steps(run, definition)],
        history=timeline,
    )


def _mask_step(step: StepSummary, masker: Masker, secrets: frozenset[str]) -> StepSummary:
    if step.last_error is not None:
        step.last_error = masker.text(step.last_error, secrets)
    for attempt in step.timeline:
        if attempt.error is not None:
            attempt.error = masker.text(attempt.error, secrets)
    return step


def _steps(run: SagaRun, definition: Saga | None) -> list[StepSummary]:
    """Each step's attempts (from the timeline) and state, in definition order if known."""
    states = run.steps or {}
    attempts: dict[str, list[Attempt]] = {}
    open_: dict[tuple[str, str, int], Attempt] = {}
    next_at: dict[str, float | None] = {}
    for h in run.history:
        if h.step is None or h.attempt is None:
            continue
        phase, _, what = h.kind.partition(".")
        if phase == "step":
            phase = "action"
        if phase not in ("action", "compensation"):
            continue  # event.ignored: a late result that was not applied
        key = (h.step, phase, h.attempt)
        if what == "started":
            open_[key] = Attempt(phase=cast(Literal["action", "compensation"], phase),
                                 attempt=h.attempt, started_at=h.at, ended_at=None,
                                 duration_ms=None, outcome="running")
            attempts.setdefault(h.step, []).append(open_[key])
            next_at[h.step] = None
        elif what in _ENDINGS and key in open_:
            _end(open_.pop(key), h, what)
        elif what == "retry_scheduled":
            delay = (h.data or {}).get("delay")
            next_at[h.step] = h.at + delay if isinstance(delay, int | float) else None
        elif what in ("gave_up", "cancelled"):
            next_at[h.step] = None

    if definition is not None:
        names = [s.name for s in definition.steps]
    else:
        names = list(dict.fromkeys([*attempts, *states]))
    names += [n for n in (*attempts, *states) if n not in names]
    out: list[StepSummary] = []
    for name in names:
        tried = attempts.get(name, [])
        state = states.get(name, {})
        errors = [a.error for a in tried if a.error]
        out.append(StepSummary(
            name=name,
            kind=_kind(definition, name),
            status=state.get("status"),
            attempts=int(state.get("attempts", 0)) or sum(a.phase == "action" for a in tried),
            compensation_attempts=int(state.get("compensation_attempts", 0))
            or sum(a.phase == "compensation" for a in tried),
            last_error=errors[-1] if errors else state.get("error"),
            maybe_applied=bool(state.get("maybe_applied")),
            action_ms=_ms(sum((a.duration_ms or 0) for a in tried if a.phase == "action")
                          / 1000),
            compensation_ms=_ms(sum((a.duration_ms or 0) for a in tried
                                    if a.phase == "compensation") / 1000),
            next_attempt_at=next_at.get(name),
            idempotency_keys=IdempotencyKeys(
                action=f"{run.id}:{name}:action",
                compensation=(f"{run.id}:{name}:compensation"
                              if _compensates(definition, name) else None),
            ),
            timeline=tried,
        ))
    return out


def _end(attempt: Attempt, h: HistoryEntry, what: str) -> None:
    attempt.ended_at = h.at
    attempt.duration_ms = _ms(h.at - attempt.started_at)
    attempt.outcome = cast(Literal["succeeded", "failed", "interrupted"], _ENDINGS[what])
    data = h.data or {}
    if what == "failed":
        attempt.error = str(data.get("error")) if data.get("error") is not None else None
    attempt.maybe_applied = attempt.phase == "action" and (
        bool(data.get("maybe_applied")) or what == "interrupted")


def _kind(definition: Saga | None, name: str) -> StepKindName:
    if definition is None:
        return "unknown"
    try:
        return definition[name].kind.value
    except KeyError:
        return "unknown"


def _compensates(definition: Saga | None, name: str) -> bool:
    if definition is None:
        return True  # unknown: the key a compensation would carry, if there is one
    try:
        return definition[name].compensation_fn is not None
    except KeyError:
        return True
