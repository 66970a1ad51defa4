"""The data the decider works on: run state, the events it consumes and the commands it emits.

Pure data, no I/O. Run state round-trips through JSON (the store keeps it as a document).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sagaway.run import SagaStatus

__all__ = [
    "ActionFailed",
    "ActionSucceeded",
    "CompensationFailed",
    "CompensationSucceeded",
    "Event",
    "InvokeAction",
    "InvokeCompensation",
    "Operator",
    "Recover",
    "RunState",
    "Start",
    "StepState",
    "StepStatus",
    "TimerFired",
]


class StepStatus(StrEnum):
    PENDING = "PENDING"  # not started
    RUNNING = "RUNNING"  # an action attempt is in flight (its intent is durable)
    WAITING = "WAITING"  # the action failed; the next attempt is due at wake_at
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # the action gave up (or was cancelled because the run compensates)
    COMPENSATING = "COMPENSATING"  # a compensation attempt is in flight
    COMPENSATION_WAITING = "COMPENSATION_WAITING"
    COMPENSATED = "COMPENSATED"


@dataclass(slots=True)
class StepState:
    """One step's progress inside a run."""

    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    """Action attempts made so far (an attempt whose intent is durable counts)."""
    maybe_applied: bool = False
    """Some attempt may have taken effect: it succeeded, timed out, or was cut by a crash."""
    result: Any = None
    error: str | None = None
    compensation_attempts: int = 0
    wake_at: float | None = None
    succeeded: bool = False
    """An action attempt succeeded; ``result`` is its result."""
    attempts_before: int = 0
    """Action attempts made before an operator's retry; the policy counts the rest."""
    compensation_attempts_before: int = 0
    """The same for the compensation."""

    def clone(self) -> StepState:
        return StepState(
            self.status,
            self.attempts,
            self.maybe_applied,
            self.result,
            self.error,
            self.compensation_attempts,
            self.wake_at,
            self.succeeded,
            self.attempts_before,
            self.compensation_attempts_before,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status.value, "attempts": self.attempts}
        if self.maybe_applied:
            out["maybe_applied"] = True
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        if self.compensation_attempts:
            out["compensation_attempts"] = self.compensation_attempts
        if self.wake_at is not None:
            out["wake_at"] = self.wake_at
        if self.succeeded:
            out["succeeded"] = True
        if self.attempts_before:
            out["attempts_before"] = self.attempts_before
        if self.compensation_attempts_before:
            out["compensation_attempts_before"] = self.compensation_attempts_before
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepState:
        return cls(
            status=StepStatus(data["status"]),
            attempts=data.get("attempts", 0),
            maybe_applied=data.get("maybe_applied", False),
            result=data.get("result"),
            error=data.get("error"),
            compensation_attempts=data.get("compensation_attempts", 0),
            wake_at=data.get("wake_at"),
            succeeded=data.get("succeeded", False),
            attempts_before=data.get("attempts_before", 0),
            compensation_attempts_before=data.get("compensation_attempts_before", 0),
        )


@dataclass(slots=True)
class RunState:
    """The decider's view of a run: status, current stage and every step's state."""

    status: SagaStatus = SagaStatus.PENDING
    stage: int = 0
    steps: dict[str, StepState] = field(default_factory=dict)
    error: str | None = None

    def clone(self) -> RunState:
        return RunState(
            self.status, self.stage, {k: v.clone() for k, v in self.steps.items()}, self.error
        )

    @property
    def wake_at(self) -> float | None:
        """The earliest time a waiting attempt is due, if any."""
        times = [s.wake_at for s in self.steps.values() if s.wake_at is not None]
        return min(times) if times else None

    @property
    def results(self) -> dict[str, Any]:
        return {name: s.result for name, s in self.steps.items() if s.succeeded}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status.value,
            "stage": self.stage,
            "steps": {k: v.to_json() for k, v in self.steps.items()},
        }
        if self.error is not None:
            out["error"] = self.error
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        return cls(
            status=SagaStatus(data["status"]),
            stage=data.get("stage", 0),
            steps={k: StepState.from_json(v) for k, v in data.get("steps", {}).items()},
            error=data.get("error"),
        )


# -- events (decider inputs) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    now: float


@dataclass(frozen=True, slots=True)
class ActionSucceeded:
    step: str
    attempt: int
    result: Any
    now: float


@dataclass(frozen=True, slots=True)
class ActionFailed:
    step: str
    attempt: int
    error: str
    now: float
    retryable: bool = True
    maybe_applied: bool = False
    """True when the attempt's outcome is unknown (a timeout): it may have taken effect."""
    retry_after: float | None = None
    """Seconds the service asked to wait before another attempt (HTTP ``Retry-After``);
    the next attempt waits at least this long, up to the policy's ``max_backoff``."""


@dataclass(frozen=True, slots=True)
class CompensationSucceeded:
    step: str
    attempt: int
    now: float


@dataclass(frozen=True, slots=True)
class CompensationFailed:
    step: str
    attempt: int
    error: str
    now: float
    retryable: bool = True
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class TimerFired:
    now: float


@dataclass(frozen=True, slots=True)
class Operator:
    """An operator's action, carried out by the worker that claimed the run.

    ``retry`` a FAILED run (its compensations, or the forward step that gave up, with a fresh
    retry budget); ``compensate`` a running or FAILED run now; ``resume`` an active run now
    (timers fire at once; attempts cut by the takeover count as interrupted).
    """

    action: str
    reason: str
    actor: str
    now: float


@dataclass(frozen=True, slots=True)
class Recover:
    """A worker took the run over (after a crash or a lost lease): in-flight attempts were cut."""

    now: float


Event = (
    Start
    | ActionSucceeded
    | ActionFailed
    | CompensationSucceeded
    | CompensationFailed
    | TimerFired
    | Recover
    | Operator
)


# -- commands (decider outputs) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvokeAction:
    step: str
    attempt: int


@dataclass(frozen=True, slots=True)
class InvokeCompensation:
    step: str
    attempt: int


Command = InvokeAction | InvokeCompensation
